"""CLIP ViT-L/14 text encoder at full size: our Flax encoder vs transformers' PyTorch one.

    python launch/bench_text_encoder.py --batch_size 64 [--iters 3] [--dtype float32|bfloat16]

Builds a random `CLIPTextModel` with ViT-L/14's text shapes (123M parameters) in PyTorch, imports
its state dict with `clip_text_from_state_dict` (the importer the extraction uses), and runs both
on the same random 77-token captions (start token, words, end-token padding). Prints captions/s
of each, the compile time of ours and the relative error of the last hidden state, which is what
an MS-COCO extraction spends its text-encoding time on (tokenisation is transformers' either way).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uvit_jax.models.clip_text import CLIP_VIT_L14  # noqa: E402
from uvit_jax.parallel.host import describe_host  # noqa: E402


def random_ids(batch: int, seed: int = 0) -> np.ndarray:
    """int32 [batch, 77]: start token, 5-40 random word ids, end token, end-token padding."""
    rng = np.random.default_rng(seed)
    bos, eos = CLIP_VIT_L14.vocab_size - 2, CLIP_VIT_L14.vocab_size - 1
    ids = np.full((batch, CLIP_VIT_L14.max_position_embeddings), eos, np.int32)
    for row in ids:
        n = int(rng.integers(5, 40))
        row[0], row[1 : n + 1] = bos, rng.integers(0, bos, n)
    return ids


def timed(fn, iters: int) -> tuple[float, float]:
    """(first call seconds, mean seconds of `iters` further calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return first, (time.perf_counter() - t0) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    import torch
    import transformers
    from flax import nnx

    from uvit_jax.convert.clip_text import clip_text_from_state_dict

    c = CLIP_VIT_L14
    torch.manual_seed(0)
    reference = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            max_position_embeddings=c.max_position_embeddings,
            hidden_act=c.hidden_act,
        )
    ).eval()
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    model = clip_text_from_state_dict(state, c, source="random ViT-L/14", dtype=args.dtype)
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids))

    ids = random_ids(args.batch_size)
    ours = {}

    def run_ours():
        ours["out"] = np.asarray(forward(params, ids))

    compile_s, ours_s = timed(run_ours, args.iters)
    theirs = {}

    def run_torch():
        with torch.inference_mode():
            theirs["out"] = reference(input_ids=torch.from_numpy(ids).long()).last_hidden_state

    _, torch_s = timed(run_torch, args.iters)
    want = theirs["out"].numpy().astype(np.float64)
    err = np.abs(ours["out"] - want).max() / np.abs(want).max()
    print(f"host: {describe_host()}")
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; torch threads "
          f"{torch.get_num_threads()}; batch {args.batch_size}; dtype {args.dtype}")  # fmt: skip
    print(f"{'':>12} {'captions/s':>11} {'ms/batch':>9}")
    print(f"{'ours (jax)':>12} {args.batch_size / ours_s:11.1f} {1e3 * ours_s:9.1f}")
    print(f"{'torch':>12} {args.batch_size / torch_s:11.1f} {1e3 * torch_s:9.1f}")
    print(f"first call (compile + run) {compile_s:.1f} s; max rel. error vs torch {err:.2e}")


if __name__ == "__main__":
    main()
