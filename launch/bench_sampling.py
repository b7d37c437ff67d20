"""Benchmark: a jitted guided 50-step sample vs 50 guided network evaluations.

The sampler's own work (coefficients, linear combinations, the scan) should cost at most ~5% on
top of the network: this script times both programs on the same model, batch and guidance, and
checks that new batches (other noise, other labels) reuse the compiled programs.

  python launch/bench_sampling.py                       # Fashion-MNIST-sized U-ViT, batch 8
  python launch/bench_sampling.py --sampler dpm_solver++_3s --formulation sd_discrete
  python launch/bench_sampling.py --sampler unipc_bh2 --formulation sd_discrete   # any registered

With no U-ViT available it falls back to a stand-in MLP noise function.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from uvit_jax.diffusion.schedules import schedule_for  # noqa: E402
from uvit_jax.sampling import dpm_solver, euler_maruyama  # noqa: E402
from uvit_jax.sampling.guidance import guided_noise_fn  # noqa: E402
from uvit_jax.sampling.samplers import SAMPLERS  # noqa: E402


def build_model(args):
    """(apply(params, x, t_net, y, context), params, description)."""
    try:
        from flax import nnx

        from uvit_jax.models.uvit import UViT, apply_fn
    except ImportError:
        UViT = None
    if UViT is not None:
        model = UViT(
            img_size=args.img_size,
            patch_size=args.patch_size,
            in_chans=args.in_chans,
            embed_dim=args.embed_dim,
            depth=args.depth,
            num_heads=args.num_heads,
            mlp_ratio=4.0,
            qkv_bias=False,
            mlp_time_embed=False,
            num_classes=args.num_classes,
            conv=True,
            skip=True,
            dtype=args.dtype,
            rngs=nnx.Rngs(0),
        )
        graphdef, params = nnx.split(model)
        n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
        return (
            apply_fn(graphdef),
            params,
            f"U-ViT D={args.embed_dim} depth={args.depth} ({n:,} params)",
        )

    d = args.img_size * args.img_size * args.in_chans
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": jax.random.normal(k1, (d, 1024)) / np.sqrt(d),
        "w2": jax.random.normal(k2, (1024, d)) / 32.0,
        "emb": jax.random.normal(k3, (args.num_classes, 1024)),
    }

    def apply(p, x, t, y, context):
        h = jnp.tanh(x.reshape(x.shape[0], -1) @ p["w1"] + p["emb"][y] + t[:, None] / 1000.0)
        return (h @ p["w2"]).reshape(x.shape)

    return apply, params, "stand-in MLP (uvit_jax.models.uvit not importable)"


def time_once(fn, *args) -> float:
    jax.block_until_ready(args)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sampler", default="dpm_solver_fast")
    p.add_argument("--formulation", default="vp_continuous")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cfg", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=11)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()

    apply, params, what = build_model(args)
    ns = schedule_for(args.formulation)
    null = args.num_classes - 1
    shape = (args.batch, args.img_size, args.img_size, args.in_chans)
    if args.sampler not in SAMPLERS:
        raise SystemExit(f"--sampler must be one of {sorted(SAMPLERS)}")
    sampler = SAMPLERS[args.sampler]
    if isinstance(sampler, dpm_solver.TableSampler):  # DPM-Solver, UniPC, Heun
        times_eval = sampler.program(args.formulation, args.steps).t
    else:
        pf = args.sampler == "probability_flow"
        times_eval = euler_maruyama.coefficients(ns, steps=args.steps, probability_flow=pf)[0]

    def guided(prm, labels):
        return guided_noise_fn(
            lambda x, t, y, c: apply(prm, x, t, y, c),
            ns,
            y=labels,
            cfg_scale=args.cfg,
            null_class=null,
        )

    def trivial(prm, labels):
        # A free "network": what remains is the sampler's own work.
        return lambda x, t: 0.5 * x

    def programs(noise_fn_for):
        """(jitted sampler, jitted scan of the same NFEs alone) around a noise function."""

        @jax.jit
        def sample(prm, x_T, labels, key):
            noise_fn = noise_fn_for(prm, labels)
            return sampler(noise_fn, x_T, args.formulation, steps=args.steps, key=key)

        @jax.jit
        def network_only(prm, x_T, labels, key):
            # The same evaluations at the same times, each feeding the next (nothing hoisted).
            noise_fn = noise_fn_for(prm, labels)
            t = jnp.asarray(times_eval, jnp.float32)

            def body(x, t_i):
                return noise_fn(x, jnp.full((x.shape[0],), t_i)), None

            return jax.lax.scan(body, x_T, t)[0]

        return sample, network_only

    sample, network_only = programs(guided)

    def x_of(i):
        return jax.random.normal(jax.random.key(100 + i), shape, jnp.float32)

    def y_of(i):
        return jax.random.randint(jax.random.key(200 + i), (args.batch,), 0, null)

    def k_of(i):
        return jax.random.key(300 + i)

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, model: {what}")
    print(
        f"sampler {args.sampler} ({args.formulation}), NFE {len(times_eval)}, batch {args.batch}, "
        f"CFG s={args.cfg} (network batch {2 * args.batch if args.cfg else args.batch})"
    )
    for name, fn in (("sample", sample), ("network", network_only)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, x_of(0), y_of(0), k_of(0)))
        print(f"compile+first run {name}: {time.perf_counter() - t0:.2f} s")

    # Interleave the two so that load changes on a shared machine hit both alike.
    ts_sample, ts_net = [], []
    for r in range(1, args.repeats + 1):  # a new batch (noise, labels, key) each time
        batch = (params, x_of(r), y_of(r), k_of(r))
        ts_sample.append(time_once(sample, *batch))
        ts_net.append(time_once(network_only, *batch))
    s_min, n_min = min(ts_sample), min(ts_net)
    s_med, n_med = float(np.median(ts_sample)), float(np.median(ts_net))
    n = len(times_eval)
    print(
        f"{args.steps}-step guided sample: min {s_min * 1e3:8.1f} ms, median {s_med * 1e3:8.1f} ms"
    )
    print(f"{n} guided network evals: min {n_min * 1e3:8.1f} ms, median {n_med * 1e3:8.1f} ms")
    print(
        f"ratio sample / network: min {s_min / n_min:.3f}, median {s_med / n_med:.3f} "
        "(target <= 1.05)"
    )
    # The sampler's own cost per NFE, measured with a free network.
    sample_0, network_0 = programs(trivial)
    batch = (params, x_of(0), y_of(0), k_of(0))
    for fn in (sample_0, network_0):
        jax.block_until_ready(fn(*batch))
    t_s0 = min(time_once(sample_0, *batch) for _ in range(30))
    t_n0 = min(time_once(network_0, *batch) for _ in range(30))
    per_nfe = (t_s0 - t_n0) / n
    print(
        f"sampler-only cost (free network): {t_s0 * 1e3:.2f} ms vs {t_n0 * 1e3:.2f} ms "
        f"=> {per_nfe * 1e6:.1f} us per NFE = {per_nfe / (n_min / n) * 100:.2f}% of one guided "
        "network evaluation"
    )
    caches = {"sample": sample._cache_size(), "network": network_only._cache_size()}
    print(f"compiled programs after {args.repeats + 1} batches: {caches}")
    if any(v != 1 for v in caches.values()):
        raise SystemExit("recompilation across batches")


if __name__ == "__main__":
    main()
