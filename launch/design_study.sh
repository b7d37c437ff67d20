#!/usr/bin/env bash
# The paper's design study (Figure 2 a-e: skip fusion, time, conv placement, patch and position
# embeddings; Figure 3: depth, width, patch size) rerun at small scale on Fashion-MNIST with
# --mode ablate: every variant trained with the default's recipe for STEPS steps, then FID of
# 2,048 samples against the 2,048 first test images (the real FID Inception:
# pip install -e ".[eval]"). The default trains with three seeds (0, 1, 2: variants default,
# default_s1, default_s2): their spread is the noise every other difference must exceed.
#
#   launch/design_study.sh [OUT] [STEPS] [SEEDS]
#
# OUT:   where everything goes (default workdirs/design_study); rerun to resume.
# STEPS: training steps of every variant (default 3000).
# SEEDS: training seeds of every variant, a Python tuple (default "(0,)").
# EVERY (env): evaluate every EVERY steps as well as the last (default 0: the last step only).
# Writes OUT/test2048.npz (reference), OUT/ablate/ (results.csv, results.json, fid.png,
# TensorBoard) and OUT/times.txt (wall seconds).
# Extra arguments go to every main.py call (e.g. --config.eval.min_samples=64 for a smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-workdirs/design_study}
STEPS=${2:-3000}
SEEDS=${3:-"(0,)"}
shift $(($# < 3 ? $# : 3))
C=configs/fashion_mnist_uvit.py:sd_noise  # the default when the study ran: noise target, learned positions
mkdir -p "$OUT"
REF=$OUT/test2048.npz
N=${N:-2048}  # samples per FID (N and B: smaller for a smoke run)
B=${B:-256}
common=(--config "$C" --config.data.latent_dir="$OUT/latent_dataset" --config.eval.ref_stats="$REF"
        --config.eval.num_samples="$N" --config.eval.batch_size="$B"
        --config.train.num_steps="$STEPS" --config.ablate.eval_every="${EVERY:-0}"
        "--config.ablate.seeds=$SEEDS" "$@")

timed() {  # timed NAME COMMAND...: runs COMMAND, logs its wall time
  local name=$1 start=$SECONDS
  shift
  "$@"
  echo "$name $((SECONDS - start)) s" | tee -a "$OUT/times.txt"
}

[ -e "$REF" ] || timed "fid_stats test $N" python main.py --mode fid_stats --workdir "$OUT" \
  "${common[@]}" --config.data.split=test --config.eval.ref_num_images="$N"

# Figure 2: the default (patch embedding linear, 1D learned positions, time token, long skips
# joined by Linear(Concat), conv after the projection) and one change at a time; Figure 3: depth,
# width and patch size around the default (depth 6, width 96, patch 4 of 28).
timed ablate python main.py --mode ablate --workdir "$OUT" "${common[@]}" \
  "--config.ablate.variants=(
    'default:',
    'default_s1: seed=1',
    'default_s2: seed=2',
    'skip_add: model.skip_fusion=add',
    'skip_add_linear_skip: model.skip_fusion=add_linear_skip',
    'skip_linear_add: model.skip_fusion=linear_add',
    'no_skip: model.skip=False',
    'time_adaln: model.time_conditioning=adaln',
    'conv_before: model.conv_position=before_projection',
    'no_conv: model.conv=False',
    'patch_conv_stack: model.patch_embed=conv_stack',
    'pos_sinusoidal_2d: model.pos_embed=sinusoidal_2d',
    'depth4: model.depth=4',
    'depth8: model.depth=8',
    'depth10: model.depth=10',
    'width64: model.embed_dim=64',
    'width128: model.embed_dim=128',
    'patch7: model.patch_size=7',
    'patch2: model.patch_size=2',
  )"
