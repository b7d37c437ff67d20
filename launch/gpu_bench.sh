#!/usr/bin/env bash
# The GPU table of issue 7 on one H100/H200, in one go (about 6-8 minutes, mostly compiles):
# ImageNet-256 latent U-ViT-L/2 and U-ViT-H/2 train steps at batch 128 (ours and the bare
# value_and_grad + adamw step), the guided sampling forward at batch 256, MFU against a measured
# bf16 matmul peak, and H/2's peak memory with and without remat.
#
#   launch/gpu_bench.sh [output folder]        # default: ./bench_out; one log per run
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${OUT:-bench_out}}"
mkdir -p "$out"
cd "$repo"
# shellcheck source=xla_gpu_flags.sh
source launch/xla_gpu_flags.sh
export TF_CPP_MIN_LOG_LEVEL=3
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt" || true
python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  | tee -a "$out/gpu.txt"

run() {  # name, then bench_train.py arguments
  local name="$1"; shift
  echo "== $name: $*"
  python launch/bench_train.py "$@" 2>"$out/$name.err" | tee "$out/$name.txt" \
    || { echo "FAILED: $name (see $out/$name.err)"; tail -20 "$out/$name.err"; }
}

common=(--measure_peak --steps 10 --warmup 3)
run l2_train --config configs/imagenet256_uvit_large.py --batch 128 --what train "${common[@]}"
run h2_train --config configs/imagenet256_uvit_huge.py --batch 128 --what train "${common[@]}"
run l2_sample --config configs/imagenet256_uvit_large.py --what sample --sample_batch 256 \
  "${common[@]}"
run h2_sample --config configs/imagenet256_uvit_huge.py --what sample --sample_batch 256 \
  "${common[@]}"
# Peak memory of our step alone (the runs above also hold the bare step's buffers).
run h2_mem --config configs/imagenet256_uvit_huge.py --batch 128 --what train --nobare \
  --steps 3 --warmup 1
run h2_mem_remat --config configs/imagenet256_uvit_huge.py --batch 128 --what train --nobare \
  --steps 3 --warmup 1 --config.model.remat=full
grep -h -A1 "^program\|our step\|peak memory\|MFU against" "$out"/*.txt || true
