"""Benchmark: the real train step (or the guided sampling forward) of any config.

  python launch/bench_train.py --config configs/fashion_mnist_uvit.py
  python launch/bench_train.py --config configs/imagenet256_uvit_large.py --batch 128 \
      --measure_peak                                    # one H100/H200: MFU vs a bf16 matmul
  python launch/bench_train.py --config configs/imagenet256_uvit_huge.py --what sample
  python launch/bench_train.py --config configs/cifar10_uvit_small.py --config.model.remat=full
  python launch/bench_train.py --batch 32 --vs_official --official_dir ~/U-ViT   # CPU, torch

`--what train` builds the state and step of `uvit_jax.train` (created sharded over the config's
mesh, AOT-compiled, state donated) and, beside it, a bare step of the same model: plain
`jax.jit(value_and_grad(loss) + optax.adamw)` with the same loss and shardings, no EMA, no
non-finite guard, no metrics; the ratio of their step times is our overhead. `--what sample`
times one classifier-free-guided network evaluation of `--sample_batch` images (conditional and
unconditional halves in one batch of 2x, as the samplers run it) with the EMA-shaped weights.
`--vs_official` times our step against the official PyTorch training step of the same model
(`libs/uvit.py` of the official release, from `--official_dir`, a clone you supply; without it,
the repository's own PyTorch U-ViT of tests/torch_uvit.py, checked against the official golden
outputs): noise at a level drawn as the config draws them, predict the config's target, its
weighted mean squared error, backward, `torch.optim.AdamW`, EMA update: the work of one
iteration of the official `train_ldm_discrete.py` / `train.py` loop minus data loading, with the
config's objective (flow matching's velocity too). Each runs alone in a fresh process
(`--solo`), the two alternating for `--rounds` rounds; the median of the rounds' ratios is
reported (launch/alternate.py says why not in one process).

Data are synthetic (the step's cost does not depend on their values). Printed per program:
compile seconds, step milliseconds (median and best of `--steps` timed steps after `--warmup`;
the JAX programs alternate step by step, so load from other processes falls on all alike), images/s,
model TFLOP/s per device (`uvit_jax.train.flops`: forward = 2 x matmul weights x tokens +
4 L^2 D per block; a train step = 3 x forward), MFU against `--peak_tflops`, a measured bf16
matmul peak (`--measure_peak`) or the device's known peak, and memory: XLA's compiled
argument + temporary bytes, and the process peak (`memory_stats()["peak_bytes_in_use"]` on
accelerators, max RSS on CPU).

Set XLA flags (e.g. `launch/xla_gpu_flags.sh`) in the environment, not here.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from uvit_jax.parallel.xla_flags import add_cpu_flags  # noqa: E402

add_cpu_flags()  # as main.py: the numbers are those of the training job

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from alternate import alternate, emit, without_flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from uvit_jax.parallel.distributed import initialize_distributed  # noqa: E402
from uvit_jax.parallel.host import describe_host  # noqa: E402
from uvit_jax.parallel.mesh import batch_sharding, make_mesh, replicated  # noqa: E402
from uvit_jax.train import flops  # noqa: E402
from uvit_jax.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from uvit_jax.train.state import (  # noqa: E402
    abstract_train_state,
    create_train_state,
    model_graphdef,
)
from uvit_jax.train.step import (  # noqa: E402
    compile_train_step,
    loss_weighting,
    make_loss_fn,
    make_train_step,
)

config_flags.DEFINE_config_file("config", "configs/fashion_mnist_uvit.py", "configs/*.py[:arg]")
flags.DEFINE_enum("what", "train", ["train", "sample", "both"], "Which program to time.")
flags.DEFINE_integer("batch", 0, "Global train batch (0: the config's train.batch_size).")
flags.DEFINE_integer("sample_batch", 256, "Images per guided sampling forward.")
flags.DEFINE_integer("steps", 10, "Timed steps per program.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per program after compiling.")
flags.DEFINE_float("peak_tflops", 0.0, "Device bf16 peak for MFU (0: measured or known).")
flags.DEFINE_bool("measure_peak", False, "Time a large jitted bf16 matmul for the MFU peak.")
flags.DEFINE_integer("peak_matmul_size", 0, "N of the N x N peak matmul (0: 8192, CPU 2048).")
flags.DEFINE_bool("bare", True, "Also time the bare value_and_grad + adamw step.")
flags.DEFINE_bool("vs_official", False, "Also time the official PyTorch train step (needs torch).")
flags.DEFINE_string("official_dir", "", "A clone of the official U-ViT (holds libs/uvit.py).")
flags.DEFINE_integer("rounds", 3, "--vs_official: rounds of the two fresh processes (median).")
flags.DEFINE_enum(
    "solo", "", ["", "ours", "official"], "Time one train step alone and emit it (--vs_official)."
)
FLAGS = flags.FLAGS


@dataclasses.dataclass
class Timing:
    name: str
    compile_s: float
    run: Callable[[], object]  # one step; returns the arrays it produced
    images: int  # per step
    flops: float  # model FLOPs per step, all devices
    memory_bytes: int | None  # compiled arguments + temporaries, per device
    times: list[float] = dataclasses.field(default_factory=list)  # seconds per timed step

    @property
    def step_s(self) -> float:
        return statistics.median(self.times)

    @property
    def best_s(self) -> float:
        return min(self.times)


def synthetic_batch(config, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Host arrays shaped like the training pipeline's global batch for `config`."""
    m = config.model
    rng = np.random.default_rng(seed)
    channels = m.in_chans if config.autoencoder.kind == "identity" else 2 * m.in_chans
    out = {"x": rng.standard_normal((batch, m.img_size, m.img_size, channels), np.float32)}
    if m.kind == "uvit_t2i":
        out["context"] = rng.standard_normal((batch, m.num_clip_token, m.clip_dim), np.float32)
        out["empty_context"] = rng.standard_normal((m.num_clip_token, m.clip_dim), np.float32)
    elif m.num_classes > 0:
        out["label"] = rng.integers(0, m.num_classes, batch).astype(np.int32)
    return out


def put(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Global arrays: the batch axis over the mesh's batch axes (`empty_context` replicated)."""
    return {
        k: jax.device_put(v, replicated(mesh) if k == "empty_context" else batch_sharding(mesh))
        for k, v in batch.items()
    }


def compiled_memory(compiled) -> int | None:
    """Per-device bytes XLA reserves for the program's arguments and temporaries."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def time_interleaved(rows: list[Timing], steps: int, warmup: int) -> None:
    """Fills each row's `times`, alternating the programs step by step so that load from other
    processes on a shared machine falls on all of them alike."""
    for _ in range(warmup):
        for r in rows:
            jax.block_until_ready(r.run())
    for _ in range(steps):
        for r in rows:
            t0 = time.perf_counter()
            jax.block_until_ready(r.run())
            r.times.append(time.perf_counter() - t0)


# ---- train: our step and the bare one ----------------------------------------------------------


def bench_our_step(config, mesh, batch: dict[str, jax.Array]) -> Timing:
    num_steps = int(config.train.num_steps)
    tx = make_optimizer(config.optim, num_steps)
    graphdef = model_graphdef(config.model)
    abstract, shardings = abstract_train_state(config.model, tx, mesh)
    step_fn = make_train_step(graphdef, tx, config, learning_rate_schedule(config.optim, num_steps))
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    compiled, compile_s = compile_train_step(step_fn, abstract, shardings, spec, mesh)
    holder = {"state": create_train_state(config.model, tx, mesh, config.seed)}
    key = jax.random.key_data(jax.random.key(0))

    def run():
        holder["state"], metrics = compiled(holder["state"], batch, key)
        return metrics["loss"]

    n = batch["x"].shape[0]
    return Timing(
        "train step (ours)",
        compile_s,
        run,
        n,
        flops.train_step_flops(config.model, n),
        compiled_memory(compiled),
    )


def bench_bare_step(config, mesh, batch: dict[str, jax.Array]) -> Timing:
    """value_and_grad + optax.adamw under one plain jax.jit, same model, loss and shardings."""
    num_steps = int(config.train.num_steps)
    o = config.optim
    tx = optax.adamw(
        learning_rate_schedule(o, num_steps),
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay=o.weight_decay,
    )
    graphdef = model_graphdef(config.model)
    abstract, shardings = abstract_train_state(config.model, tx, mesh)
    grad_fn = jax.value_and_grad(make_loss_fn(graphdef, config))

    def step(params, opt_state, batch, key):
        loss, grads = grad_fn(params, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    b_sh = {k: (replicated(mesh) if k == "empty_context" else batch_sharding(mesh)) for k in batch}
    jitted = jax.jit(
        step,
        in_shardings=(shardings.params, shardings.opt_state, b_sh, replicated(mesh)),
        out_shardings=(shardings.params, shardings.opt_state, replicated(mesh)),
        donate_argnums=(0, 1),
    )
    key = jax.random.key_data(jax.random.key(0))
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jitted.lower(abstract.params, abstract.opt_state, spec, key).compile()
    compile_s = time.perf_counter() - t0
    state = create_train_state(config.model, tx, mesh, config.seed)
    holder = {"params": state.params, "opt": state.opt_state}
    del state  # its EMA copy is not part of the bare step
    key = jax.random.key_data(jax.random.key(0))

    def run():
        # The bare step has no step counter: a fixed key (the cost does not depend on it).
        holder["params"], holder["opt"], loss = compiled(
            holder["params"], holder["opt"], batch, key
        )
        return loss

    n = batch["x"].shape[0]
    return Timing(
        "train step (bare jit)",
        compile_s,
        run,
        n,
        flops.train_step_flops(config.model, n),
        compiled_memory(compiled),
    )


# ---- the official PyTorch step -----------------------------------------------------------------


def official_levels(config, b: int, count: int = 16) -> list[tuple[np.ndarray, ...]]:
    """`count` draws of (network time, alpha, sigma, c_x0, c_eps, loss weight), each [B] float32,
    for b examples: the config's own formulation, time sampling, target and loss weighting
    (`uvit_jax.diffusion`), drawn before timing so that the anchor's step is the network's work."""
    from uvit_jax.diffusion.formulation import Formulation
    from uvit_jax.diffusion.objective import level_weights
    from uvit_jax.diffusion.targets import target_coefficients

    f = Formulation.from_config(config)
    out = []
    for i in range(count):
        level = f.draw(jax.random.key(i), b)
        c_x0, c_eps = target_coefficients(f.target, f.schedule, level.t, level.alpha, level.sigma)
        weight = level_weights(f, level, **loss_weighting(config))
        row = (level.t_net, level.alpha, level.sigma, c_x0, c_eps, weight)
        out.append(tuple(np.broadcast_to(np.asarray(v, np.float32), (b,)) for v in row))
    return out


def bench_official_step(config, batch: dict[str, np.ndarray], official_dir: str) -> Timing:
    """The official training iteration of the same model in PyTorch (float32, CPU threads):
    noise at a level drawn as the config draws them, the network, the squared error of the
    config's target with its loss weight, backward, AdamW, the EMA update."""
    import torch
    from official_uvit import build_official_uvit

    m = config.model
    if m.num_classes <= 0 or config.autoencoder.kind != "identity":
        raise SystemExit("--vs_official: class-conditional pixel-space U-ViT configs only")
    nnet, source = build_official_uvit(m, official_dir)
    ema, _ = build_official_uvit(m, official_dir)
    ema.load_state_dict(nnet.state_dict())
    ema.requires_grad_(False)
    o = config.optim
    opt = torch.optim.AdamW(
        nnet.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
    )
    x0 = torch.from_numpy(np.ascontiguousarray(batch["x"].transpose(0, 3, 1, 2)))
    y = torch.from_numpy(batch["label"].astype(np.int64))
    b = x0.shape[0]
    levels = [
        tuple(torch.from_numpy(np.array(v)) for v in row) for row in official_levels(config, b)
    ]
    params = list(nnet.parameters())
    ema_params = list(ema.parameters())
    rate = float(config.train.ema_rate)
    calls = iter(range(1 << 62))

    def run():
        t_net, alpha, sigma, c_x0, c_eps, weight = levels[next(calls) % len(levels)]
        a, s, cx, ce = (v.view(-1, 1, 1, 1) for v in (alpha, sigma, c_x0, c_eps))
        eps = torch.randn_like(x0)
        x_t = a * x0 + s * eps
        goal = cx * x0 + ce * eps
        drop = torch.rand(b) < config.diffusion.p_uncond
        labels = torch.where(drop, m.num_classes - 1, y)
        err = (nnet(x_t, t_net, labels) - goal).square().mean(dim=(1, 2, 3))
        loss = (weight * err).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - rate)
        return None  # torch on the CPU is synchronous

    return Timing(
        f"train step ({source}, torch {torch.get_num_threads()} threads)",
        0.0,
        run,
        b,
        flops.train_step_flops(config.model, b),
        None,
    )


# ---- sampling forward --------------------------------------------------------------------------


def bench_sample_forward(config, mesh, batch_size: int) -> Timing:
    """One guided network evaluation (2 x batch_size through the network) as the samplers run it."""
    from uvit_jax.diffusion.formulation import Formulation
    from uvit_jax.models.uvit import apply_fn
    from uvit_jax.sampling.guidance import guided_noise_fn

    tx = make_optimizer(config.optim, 1)
    graphdef = model_graphdef(config.model)
    abstract, shardings = abstract_train_state(config.model, tx, mesh)
    data = synthetic_batch(config, batch_size, seed=1)
    m = config.model
    text = m.kind == "uvit_t2i"
    guided = text or m.num_classes > 0
    shape = (batch_size, m.img_size, m.img_size, m.in_chans)
    inputs = {
        "x": np.random.default_rng(2).standard_normal(shape, np.float32),
        "t": np.full((batch_size,), 0.5, np.float32),  # continuous time in (0, 1]
    }
    null = None
    if text:
        inputs["context"], null = data["context"], data["empty_context"]
    elif guided:
        inputs["y"] = np.asarray(data["label"] % (m.num_classes - 1), np.int32)  # real classes
    schedule = Formulation.from_config(config).schedule
    apply = apply_fn(graphdef)

    cond_name = "context" if text else ("y" if guided else None)

    def forward(params, x, t, cond=None):
        noise_fn = guided_noise_fn(
            lambda *a: apply(params, *a),
            schedule,
            **({cond_name: cond} if cond_name else {}),
            cfg_scale=1.0 if guided else 0,  # any non-zero scale runs both halves
            null_class=m.num_classes - 1 if (guided and not text) else None,
            null_context=null if text else None,
        )
        return noise_fn(x, t)

    args = [inputs["x"], inputs["t"]] + ([inputs[cond_name]] if cond_name else [])
    bs = batch_sharding(mesh)
    jitted = jax.jit(forward, in_shardings=(shardings.ema, *[bs] * len(args)), out_shardings=bs)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        abstract_args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
        compiled = jitted.lower(abstract.ema, *abstract_args).compile()
    compile_s = time.perf_counter() - t0
    ema = create_train_state(config.model, tx, mesh, config.seed).ema
    dev_args = [jax.device_put(a, bs) for a in args]

    evaluated = batch_size * (2 if guided else 1)
    return Timing(
        "sample forward (guided, 2B)" if guided else "sample forward",
        compile_s,
        lambda: compiled(ema, *dev_args),
        batch_size,
        flops.forward_flops(m) * evaluated,
        compiled_memory(compiled),
    )


# ---- the peak ----------------------------------------------------------------------------------


def measured_matmul_peak(size: int, reps: int = 10) -> float:
    """TFLOP/s of one device on N x N x N bf16 matmuls (float32 accumulation).

    `reps` matmuls are queued back to back and waited for once (so launch latency does not
    count); the best of 5 such rounds.
    """
    device = jax.devices()[0]
    a = jax.device_put(jnp.ones((size, size), jnp.bfloat16), device)
    b = jax.device_put(jnp.ones((size, size), jnp.bfloat16), device)
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
    jax.block_until_ready(mm(a, b))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready([mm(a, b) for _ in range(reps)])
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2.0 * size**3 / best / 1e12


def peak_memory() -> tuple[str, int | None]:
    """(what, bytes): the largest device's peak allocation, or this process's max RSS."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s]
    if peaks and all(p is not None for p in peaks):
        return "device peak_bytes_in_use", max(peaks)
    return "process max RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def print_table(rows: list[Timing], n_dev: int, peak: float | None) -> None:
    head = f"{'program':<52}{'compile s':>10}{'step ms':>10}{'best ms':>10}{'img/s':>10}"
    head += f"{'TFLOP/s/dev':>13}{'MFU':>8}{'XLA GiB/dev':>13}"
    print(head)
    print("-" * len(head))
    for r in rows:
        tflops = r.flops / r.step_s / n_dev / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "-"
        print(
            f"{r.name:<52}{r.compile_s:>10.1f}{1e3 * r.step_s:>10.2f}{1e3 * r.best_s:>10.2f}"
            f"{r.images / r.step_s:>10.1f}"
            f"{tflops:>13.4g}{mfu:>8}{_gib(r.memory_bytes):>13}"
        )


def solo_step(config, program: str, steps: int, warmup: int, official_dir: str = "") -> dict:
    """Times our train step or the official one (`program`) alone in this process: its
    median and best seconds, images per step and compile seconds, and the host."""
    data = synthetic_batch(config, config.train.batch_size)
    if program == "ours":
        mesh = make_mesh(config.mesh)
        row = bench_our_step(config, mesh, put(data, mesh))
    else:
        row = bench_official_step(config, data, official_dir)
    time_interleaved([row], steps, warmup)
    return dict(
        name=row.name,
        step_s=row.step_s,
        best_s=row.best_s,
        images=row.images,
        compile_s=row.compile_s,
        devices=jax.device_count() if program == "ours" else None,
        host=describe_host(),
    )


def versus_official(argv: list[str], rounds: int) -> dict:
    """Our step and the official one, each alone in a fresh process (`--solo`), alternating for
    `rounds` rounds (launch/alternate.py says why not in one process). `argv`: this script's
    arguments for both (config, batch, steps). Returns the `solo_step` dicts per round and the
    rounds' official / ours step-time ratios (above 1: ours is faster) with their median."""
    script = os.path.abspath(__file__)
    programs = {p: [script, *argv, f"--solo={p}"] for p in ("ours", "official")}
    runs = alternate(programs, rounds)
    pairs = zip(runs["ours"], runs["official"], strict=True)
    ratios = [official["step_s"] / ours["step_s"] for ours, official in pairs]
    return dict(runs, ratios=ratios, ratio=statistics.median(ratios))


def summary(official_dir: str = "") -> list[dict]:
    """bench_all's rows: the default config's train step at batch 16 and 32 (and at its own
    batch, were it another), ours vs the official PyTorch step (`official_dir`, else
    $UVIT_OFFICIAL_DIR, else the stand-in), each alone in fresh processes, median of 3
    alternating rounds."""
    from configs.fashion_mnist_uvit import get_config

    official_dir = official_dir or os.environ.get("UVIT_OFFICIAL_DIR", "")
    config_file = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                               "fashion_mnist_uvit.py")  # fmt: skip
    rows = []
    for batch in sorted({16, 32, int(get_config().train.batch_size)}):
        argv = [f"--config={config_file}", f"--batch={batch}", "--steps=20", "--warmup=3"]
        v = versus_official(argv + ([f"--official_dir={official_dir}"] * bool(official_dir)), 3)
        step = {k: statistics.median(r["step_s"] for r in v[k]) for k in ("ours", "official")}
        rows.append(
            dict(
                job=f"train step (default model, batch {batch})",
                ours=batch / step["ours"],
                anchor=batch / step["official"],
                unit="img/s",
                ratio=v["ratio"],
                note=f"anchor: {v['official'][0]['name']}; ours on {v['ours'][0]['devices']} "
                f"devices; median of 3 alternating fresh processes (ratios "
                f"{', '.join(f'{r:.2f}' for r in v['ratios'])})",
                host=v["ours"][-1]["host"],
            )
        )
    return rows


def print_versus(v: dict) -> None:
    for i, (u, o, r) in enumerate(zip(v["ours"], v["official"], v["ratios"], strict=True)):
        print(
            f"round {i + 1}: ours {1e3 * u['step_s']:.2f} ms ({u['devices']} devices, compile "
            f"{u['compile_s']:.1f} s), {o['name']} {1e3 * o['step_s']:.2f} ms: "
            f"official / ours {r:.3f}"
        )
    print(f"host: {v['ours'][-1]['host']}")
    print(
        f"official step / our step: median {v['ratio']:.3f} of {len(v['ratios'])} rounds "
        "(above 1: ours is faster; each program alone in a fresh process, alternating)"
    )


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    if FLAGS.batch:
        config.train.batch_size = FLAGS.batch
    if FLAGS.solo:
        emit(solo_step(config, FLAGS.solo, FLAGS.steps, FLAGS.warmup, FLAGS.official_dir))
        return
    if FLAGS.vs_official:
        forwarded = without_flags(sys.argv[1:], ("vs_official", "rounds", "what", "bare"))
        print(f"{config.get('name', '?')} at batch {config.train.batch_size}: ours vs official")
        print_versus(versus_official(forwarded, FLAGS.rounds))
        return
    initialize_distributed()
    mesh = make_mesh(config.mesh)
    n_dev = jax.device_count()
    device = jax.devices()[0]
    print(f"host: {describe_host()}")
    print(
        f"{config.get('name', '?')}: {n_dev} x {device.device_kind} ({device.platform}), "
        f"mesh {dict(mesh.shape)}, model dtype {config.model.dtype}, "
        f"attention {config.model.attention}, remat {config.model.remat}, "
        f"forward {flops.forward_flops(config.model) / 1e9:.3f} GFLOP/image"
    )
    rows = []
    if FLAGS.what in ("train", "both"):
        batch = put(synthetic_batch(config, config.train.batch_size), mesh)
        if FLAGS.bare:
            rows.append(bench_bare_step(config, mesh, batch))
        rows.append(bench_our_step(config, mesh, batch))
    if FLAGS.what in ("sample", "both"):
        rows.append(bench_sample_forward(config, mesh, FLAGS.sample_batch))
    time_interleaved(rows, FLAGS.steps, FLAGS.warmup)

    peak, source = FLAGS.peak_tflops or None, "--peak_tflops"
    if peak is None and FLAGS.measure_peak:
        size = FLAGS.peak_matmul_size or (2048 if device.platform == "cpu" else 8192)
        peak, source = measured_matmul_peak(size), f"measured {size}^3 bf16 matmul"
    if peak is None:
        peak, source = flops.peak_tflops(device.device_kind), "known peak of the device"
    print(f"MFU against {f'{peak:.4g} TFLOP/s ({source})' if peak else 'nothing (no peak)'}")
    print_table(rows, n_dev, peak)
    if FLAGS.bare and FLAGS.what in ("train", "both"):
        bare, ours = rows[0], rows[1]
        print(
            f"our step / bare step: median {ours.step_s / bare.step_s:.3f}, "
            f"best {ours.best_s / bare.best_s:.3f} (timed alternately, {FLAGS.steps} steps each)"
        )
    what, nbytes = peak_memory()
    print(f"peak memory ({what}): {_gib(nbytes)} GiB")


if __name__ == "__main__":
    app.run(main)
