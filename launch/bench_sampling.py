"""Benchmark: a config's jitted guided sample vs its network evaluations, and the CFG layout.

On the config's U-ViT (random weights: time does not depend on them), batch and guidance:
  - the sampler's program vs the same NFEs alone: the sampler's own work (coefficients, linear
    combinations, the scan) should cost at most ~5% on top of the network;
  - the sampler's own cost per NFE, measured with a free network;
  - one-pass vs two-pass classifier-free guidance: one network call on 2B images (conditional
    and null stacked, as our samplers guide) vs two calls on B, and the whole guided sample
    in either layout;
and it checks that new batches (other noise, other labels) reuse the compiled programs.

  python launch/bench_sampling.py                 # configs/fashion_mnist_uvit.py, batch 8
  python launch/bench_sampling.py --sampler unipc_bh2 --steps 20   # any registered sampler
  python launch/bench_sampling.py --config configs/fashion_mnist_uvit.py:paper_recipe \\
      --sampler dpm_solver_fast --formulation vp_continuous

`summary()` gives the default config's guided sampling images/s beside the official PyTorch
network's (two passes per NFE) and beside our own two-pass layout, as rows for
`launch/bench_all.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from uvit_jax.parallel.xla_flags import add_cpu_flags  # noqa: E402

add_cpu_flags()  # as main.py: the numbers are those of the sample job

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from alternate import alternate, emit  # noqa: E402

from uvit_jax.parallel.host import describe_host  # noqa: E402
from uvit_jax.parallel.mesh import batch_sharding, make_mesh, replicated  # noqa: E402
from uvit_jax.sampling import dpm_solver, euler_maruyama  # noqa: E402
from uvit_jax.sampling.generate import SamplerSpec, configured_sampler  # noqa: E402
from uvit_jax.sampling.guidance import guided_noise_fn  # noqa: E402

DEFAULT_CONFIG = "configs/fashion_mnist_uvit.py"


def load_config(config_file: str) -> Any:
    """The config of `config_file[:arg]` (a path relative to the repository or absolute)."""
    path, _, arg = config_file.partition(":")
    spec = importlib.util.spec_from_file_location("bench_config", os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@dataclasses.dataclass(frozen=True)
class Bench:
    """The programs timed, all on one model, batch and guidance (jitted; args in `batch`)."""

    what: str  # the model and sampler, for the printout
    spec: SamplerSpec
    nfe: int
    params: Any
    batch: Callable[[int], tuple]  # i -> (x_T [B,H,W,C], labels [B], key), a new batch per i
    sample: Callable  # (params, x_T, labels, key) -> x_0: the sampler, one-pass guidance
    sample_two_pass: Callable  # the same with guidance as two network calls of B
    network: Callable  # (params, x_T, labels, key) -> x: the sampler's NFEs alone
    sample_free: Callable  # the sampler on a free network (its own work only)
    network_free: Callable  # the free network's NFEs alone
    one_call: Callable  # (params, x_T, labels) -> eps [2B, ...]: one call on 2B
    two_calls: Callable  # (params, x_T, labels) -> (eps_c, eps_u): two calls on B


def evaluation_times(spec: SamplerSpec) -> Any:
    """The times [NFE] at which `spec`'s sampler evaluates the network, in order."""
    sampler = configured_sampler(spec)
    if isinstance(sampler, dpm_solver.TableSampler):  # DPM-Solver, UniPC, Heun
        return sampler.program(spec.formulation, spec.steps).t
    ns = spec.formulation.schedule
    pf = spec.sampler == "probability_flow"
    return euler_maruyama.coefficients(ns, steps=spec.steps, probability_flow=pf, t_max=ns.T)[0]


def build(config: Any, batch_size: int) -> Bench:
    """The benchmark programs for `config`'s model and sampling settings at `batch_size`."""
    from flax import nnx

    from uvit_jax.models.uvit import apply_fn, build_uvit, count_params

    spec = SamplerSpec.from_config(config)
    if spec.cfg_scale == 0 or spec.conditioning.kind != "class":
        raise SystemExit("the benchmark times guided sampling of a class-conditional model")
    model = build_uvit(config.model)
    n_params = count_params(model)
    graphdef, params = nnx.split(model)
    apply = apply_fn(graphdef)
    ns = spec.formulation.schedule
    null = spec.conditioning.null_class
    sampler = configured_sampler(spec)
    times_eval = evaluation_times(spec)

    def guided(model_fn):
        def noise_fn_for(prm, labels):
            return guided_noise_fn(
                lambda x, t, y, c: model_fn(prm, x, t, y, c),
                ns,
                y=labels,
                cfg_scale=spec.cfg_scale,
                null_class=null,
                cfg_interval=spec.cfg_interval,
                cfg_schedule=spec.cfg_schedule,
            )

        return noise_fn_for

    def split_calls(prm, x, t, y, c):
        # The two-pass layout: a guided batch of 2B (conditional, then null) as two calls of B.
        if x.shape[0] != 2 * batch_size:
            return apply(prm, x, t, y, c)
        b = batch_size
        first, second = (apply(prm, x[s], t[s], y[s], c) for s in (slice(0, b), slice(b, None)))
        return jnp.concatenate([first, second])

    def free(prm, labels):
        return lambda x, t: 0.5 * x  # a free "network": what remains is the sampler's work

    def sampling(noise_fn_for):
        @jax.jit
        def run(prm, x_T, labels, key):
            noise_fn = noise_fn_for(prm, labels)
            return sampler(noise_fn, x_T, spec.formulation, steps=spec.steps, key=key)

        return run

    def network_only(noise_fn_for):
        @jax.jit
        def run(prm, x_T, labels, key):
            # The same evaluations at the same times, each feeding the next (nothing hoisted).
            noise_fn = noise_fn_for(prm, labels)
            t = jnp.asarray(times_eval, jnp.float32)

            def body(x, t_i):
                return noise_fn(x, jnp.full((x.shape[0],), t_i)), None

            return jax.lax.scan(body, x_T, t)[0]

        return run

    t_mid = float(ns.network_time(jnp.float32(0.5)))

    @jax.jit
    def one_call(prm, x, labels):
        t_net = jnp.full((2 * x.shape[0],), t_mid, jnp.float32)
        y2 = jnp.concatenate([labels, jnp.full_like(labels, null)])
        return apply(prm, jnp.concatenate([x, x]), t_net, y2, None)

    @jax.jit
    def two_calls(prm, x, labels):
        t_net = jnp.full((x.shape[0],), t_mid, jnp.float32)
        return apply(prm, x, t_net, labels, None), apply(
            prm, x, t_net, jnp.full_like(labels, null), None
        )

    shape = (batch_size, *spec.shape)
    # Placed as the sample job places them: the batch split over the mesh, weights replicated.
    mesh = make_mesh(config.mesh)
    params = jax.device_put(params, replicated(mesh))

    def batch(i: int) -> tuple:
        x = jax.random.normal(jax.random.key(100 + i), shape, jnp.float32)
        y = jax.random.randint(jax.random.key(200 + i), (batch_size,), 0, null)
        return jax.device_put((x, y), batch_sharding(mesh)) + (jax.random.key(300 + i),)

    m = config.model
    what = (
        f"U-ViT D={m.embed_dim} depth={m.depth} {m.img_size}x{m.img_size}x{m.in_chans} "
        f"patch {m.patch_size} ({n_params:,} params), sampler {spec.sampler} "
        f"({spec.formulation.path}{', ' + spec.grid + ' grid' if spec.grid else ''}), "
        f"NFE {len(times_eval)}, batch {batch_size}, CFG s={spec.cfg_scale:g} "
        f"({spec.cfg_schedule})"
    )
    return Bench(
        what=what,
        spec=spec,
        nfe=len(times_eval),
        params=params,
        batch=batch,
        sample=sampling(guided(apply)),
        sample_two_pass=sampling(guided(split_calls)),
        network=network_only(guided(apply)),
        sample_free=sampling(free),
        network_free=network_only(free),
        one_call=one_call,
        two_calls=two_calls,
    )


def time_once(fn: Callable, *args) -> float:
    """Seconds of one call of `fn` on ready arguments, until its outputs are ready."""
    jax.block_until_ready(args)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable], args_of: Callable[[int], tuple], repeats: int) -> dict:
    """{name: [seconds per repeat]}, the functions taking turns within each repeat so that load
    changes on a shared machine hit them alike; repeat r calls each on args_of(r)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(1, repeats + 1):
        args = args_of(r)
        for name, fn in fns.items():
            times[name].append(time_once(fn, *args))
    return times


def cfg_layout_ratio(bench: Bench, repeats: int) -> tuple[float, float, float]:
    """(median s of one call on 2B, median s of two calls on B, their ratio): < 1 means the
    one-pass layout is faster."""
    fns = {"one": bench.one_call, "two": bench.two_calls}
    args_of = lambda r: (bench.params, *bench.batch(r)[:2])  # noqa: E731
    for fn in fns.values():  # compile
        jax.block_until_ready(fn(*args_of(0)))
    ts = interleaved(fns, args_of, repeats)
    one, two = float(np.median(ts["one"])), float(np.median(ts["two"]))
    return one, two, one / two


def official_sampling_fn(config: Any, batch_size: int, nfe: int, official_dir: str = ""):
    """(fn, what): fn() samples `batch_size` images the way the official sample scripts guide:
    per NFE two calls of the official PyTorch U-ViT on B (conditional, then null label), then
    eps_c + s (eps_c - eps_u); the solver's arithmetic (a few axpys per step) left out, so the
    anchor is if anything flattered."""
    import torch
    from official_uvit import build_official_uvit

    model, source = build_official_uvit(config.model, official_dir)
    model.eval()
    m, scale = config.model, float(config.sample.cfg_scale)
    ts = torch.linspace(999.0, 1.0, nfe)
    null = torch.full((batch_size,), m.num_classes - 1, dtype=torch.long)

    @torch.no_grad()
    def sample(*_) -> None:  # called like our programs; the noise does not change the cost
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, m.in_chans, m.img_size, m.img_size, generator=g)
        y = torch.randint(0, m.num_classes - 1, (batch_size,), generator=g)
        for t in ts:
            tb = t.expand(batch_size)
            eps_c, eps_u = model(x, tb, y), model(x, tb, null)
            x = x - 0.01 * (eps_c + scale * (eps_c - eps_u))

    return sample, f"{source}, torch {torch.get_num_threads()} threads"


def solo_sampling(program: str, repeats: int) -> dict:
    """Seconds per guided sample of the default config (its sampler, steps, guidance and batch
    `config.sample.batch_size`), medians of `repeats`, timed alone in this process:
    `program` "ours" times our one-pass and two-pass CFG layouts alternately, "official" the
    official PyTorch network as the official sample scripts run it (`official_sampling_fn`;
    $UVIT_OFFICIAL_DIR names a clone of the official release, else the repository's stand-in)."""
    config = load_config(DEFAULT_CONFIG)
    b = int(config.sample.batch_size)
    if program == "official":
        nfe = len(evaluation_times(SamplerSpec.from_config(config)))
        official, source = official_sampling_fn(
            config, b, nfe, os.environ.get("UVIT_OFFICIAL_DIR", "")
        )
        fns, what = {"official": official}, source
        args_of = lambda r: ()  # noqa: E731
    else:
        bench = build(config, b)
        fns = {"one": bench.sample, "two": bench.sample_two_pass}
        args_of = lambda r: (bench.params, *bench.batch(r))  # noqa: E731
        s = bench.spec
        what = f"{s.sampler}, {bench.nfe} NFE, CFG {s.cfg_scale:g}, batch {b}, "
        what += f"{jax.device_count()} devices"
    for fn in fns.values():  # compile
        jax.block_until_ready(fn(*args_of(0)))
    ts = interleaved(fns, args_of, repeats)
    return dict(
        {name: float(np.median(t)) for name, t in ts.items()},
        batch=b,
        what=what,
        host=describe_host(),
    )


def summary(rounds: int = 3, repeats: int = 3) -> list[dict]:
    """bench_all's rows for the default config's guided sampling: ours vs the official PyTorch
    network (two passes per NFE), each alone in a fresh process, the median of `rounds`
    alternating rounds (launch/alternate.py); and our one-pass CFG layout vs the two-pass one,
    timed alternately in one process. Takes ~1 min on 2 CPU cores."""
    script = os.path.abspath(__file__)
    runs = alternate(
        {p: [script, f"--solo={p}", f"--repeats={repeats}"] for p in ("ours", "official")},
        rounds,
    )
    ours, official = runs["ours"], runs["official"]
    b = ours[0]["batch"]
    ratios = [o["official"] / u["one"] for u, o in zip(ours, official, strict=True)]
    layouts = [u["two"] / u["one"] for u in ours]
    med = lambda rows, k: float(np.median([r[k] for r in rows]))  # noqa: E731
    spread = ", ".join(f"{r:.2f}" for r in ratios)

    def row(job: str, anchor_s: float, ratio: float, note: str) -> dict:
        return dict(job=job, ours=b / med(ours, "one"), anchor=b / anchor_s, unit="img/s",
                    ratio=ratio, note=note, host=ours[-1]["host"])  # fmt: skip

    return [
        row(
            "guided sampling (default model)",
            med(official, "official"),
            float(np.median(ratios)),
            f"{ours[0]['what']}; anchor: {official[0]['what']}, two passes per NFE; median of "
            f"{rounds} alternating fresh processes (ratios {spread})",
        ),
        row(
            "guided sampling, one-pass CFG layout",
            med(ours, "two"),
            float(np.median(layouts)),
            "anchor: the same sampler guiding with two network calls of B, alternated in one "
            "process",
        ),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="configs/*.py[:arg]")
    p.add_argument("--sampler", help="default: the config's")
    p.add_argument("--formulation", help="default: the config's")
    p.add_argument("--steps", type=int, help="default: the config's")
    p.add_argument("--cfg", type=float, help="guidance scale; default: the config's")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--call-repeats", type=int, default=31, help="for the one/two-pass ratio")
    p.add_argument(
        "--solo", choices=("ours", "official"), help="time one side of `summary` and emit it"
    )
    args = p.parse_args()
    if args.solo:
        emit(solo_sampling(args.solo, args.repeats))
        return

    config = load_config(args.config)
    for field, value in (("sampler", args.sampler), ("steps", args.steps)):
        if value is not None:
            config.sample[field] = value
    if args.cfg is not None:
        config.sample.cfg_scale = args.cfg
    if args.formulation is not None:
        config.diffusion.formulation = args.formulation
    bench = build(config, args.batch)
    print(f"host: {describe_host()}")
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}")
    print(bench.what)

    timed = {
        "sample": bench.sample,
        "network": bench.network,
        "sample_two_pass": bench.sample_two_pass,
    }
    for name, fn in timed.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(bench.params, *bench.batch(0)))
        print(f"compile+first run {name}: {time.perf_counter() - t0:.2f} s")
    # A new batch (noise, labels, key) each repeat.
    ts = interleaved(timed, lambda r: (bench.params, *bench.batch(r)), args.repeats)
    mins = {k: min(v) for k, v in ts.items()}
    meds = {k: float(np.median(v)) for k, v in ts.items()}
    n, steps = bench.nfe, bench.spec.steps
    rows = [
        (f"{steps}-step guided sample", "sample"),
        (f"{n} guided network evals", "network"),
        (f"{steps}-step sample, two-pass CFG", "sample_two_pass"),
    ]
    for label, k in rows:
        print(f"{label:34s} min {mins[k] * 1e3:8.1f} ms, median {meds[k] * 1e3:8.1f} ms")
    print(
        f"ratio sample / network: min {mins['sample'] / mins['network']:.3f}, median "
        f"{meds['sample'] / meds['network']:.3f} (target <= 1.05)"
    )
    print(
        f"ratio sample one-pass / two-pass CFG: median "
        f"{meds['sample'] / meds['sample_two_pass']:.3f} (< 1: one pass is faster)"
    )
    one, two, ratio = cfg_layout_ratio(bench, args.call_repeats)
    print(
        f"one network call on 2B={2 * args.batch}: median {one * 1e3:.2f} ms; two calls on "
        f"B={args.batch}: median {two * 1e3:.2f} ms => one-pass / two-pass {ratio:.3f} "
        f"(median of {args.call_repeats} interleaved)"
    )
    # The sampler's own cost per NFE, measured with a free network.
    batch = (bench.params, *bench.batch(0))
    for fn in (bench.sample_free, bench.network_free):
        jax.block_until_ready(fn(*batch))
    t_s0 = min(time_once(bench.sample_free, *batch) for _ in range(30))
    t_n0 = min(time_once(bench.network_free, *batch) for _ in range(30))
    per_nfe = (t_s0 - t_n0) / n
    print(
        f"sampler-only cost (free network): {t_s0 * 1e3:.2f} ms vs {t_n0 * 1e3:.2f} ms "
        f"=> {per_nfe * 1e6:.1f} us per NFE = {per_nfe / (mins['network'] / n) * 100:.2f}% of "
        "one guided network evaluation"
    )
    caches = {k: fn._cache_size() for k, fn in timed.items()}
    print(f"compiled programs after {args.repeats + 1} batches: {caches}")
    if any(v != 1 for v in caches.values()):
        raise SystemExit("recompilation across batches")


if __name__ == "__main__":
    main()
