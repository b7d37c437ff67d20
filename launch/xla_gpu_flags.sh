# XLA and NCCL settings for NVIDIA GPUs; source it before launching (`. launch/xla_gpu_flags.sh`).
# They live here, not in library code: they depend on the machine, the XLA version and the run.
# Every flag below was checked to exist in jaxlib 0.10.2 (an unknown flag aborts at start-up).
#
#   latency_hiding_scheduler       overlap FSDP all-gathers / reduce-scatters and data-parallel
#                                  all-reduces with compute (the biggest multi-GPU win)
#   highest_priority_async_stream  run those collectives on a high-priority stream
#   *_combine_threshold_bytes      merge small per-parameter collectives into few large ones
#   enable_pipelined_*             issue the next layer's FSDP collectives during this layer
#   XLA_PYTHON_CLIENT_MEM_FRACTION let XLA take 90% of each GPU's memory up front
# Extra flags for one run: UVIT_EXTRA_XLA_FLAGS="--xla_gpu_autotune_level=4" . launch/xla_gpu_flags.sh

uvit_gpu_flags=(
  --xla_gpu_enable_latency_hiding_scheduler=true
  --xla_gpu_enable_highest_priority_async_stream=true
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
)
export XLA_FLAGS="${XLA_FLAGS:-} ${uvit_gpu_flags[*]} ${UVIT_EXTRA_XLA_FLAGS:-}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
unset uvit_gpu_flags
