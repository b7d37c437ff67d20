"""Sample quality of Fashion-MNIST recipes on the real data, as one table.

    python launch/fashion_mnist_quality.py --out workdirs/quality \
        --recipe previous=configs/fashion_mnist_uvit.py:sd_noise \
        --recipe default=configs/fashion_mnist_uvit.py

Every recipe is a config (plus `--config.*` overrides after the `=`, separated by spaces). For
each one the script
  1. trains it with `python main.py` in `<out>/<name>` and times the whole command (dataset
     extraction and compilation included; a workdir that already holds the final step is kept,
     with the wall time it recorded);
  2. draws `--num_samples` samples from the EMA weights, classes balanced (sample j is class
     j mod 10), with the config's sampler settings, or once per `--sampling` (each a set of
     `config.sample` overrides, e.g. --sampling "cfg_scale=3 thresholding=True");
  3. scores them: FID with the real FID Inception (TF 2015-12-05 weights, pytorch-fid protocol)
     against as many real test images, and the per-class accuracy of a judge CNN trained on the
     real training split (`launch/fashion_mnist_judge.py`).
`--at_steps 6000,8000` also scores earlier checkpoints of each run (one row each), which for a
constant learning rate reads as the curve of shorter runs of the same recipe.
The table ends with the floor: real training images scored the same way (FID vs the same test
images; the judge's accuracy on the real test split). Results also go to `<out>/quality.json`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "launch"))
from uvit_jax.parallel.xla_flags import add_cpu_flags  # noqa: E402

add_cpu_flags()  # as main.py: the numbers are those of the training job
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
from fashion_mnist_judge import CLASS_NAMES, load_split, train_judge  # noqa: E402

SOURCE_DIR = "/usr/share/datasets/fashion-mnist"


def padded_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 1] -> [N, H, W, 3] (Inception reads RGB)."""
    return np.repeat(images, 3, axis=-1)


def train(name: str, spec: str, out: str) -> dict:
    """Trains recipe `spec` ("config[:arg] [--config.x=y ...]") in out/name; returns its record."""
    from uvit_jax import checkpoints

    workdir = os.path.join(out, name)
    record_path = os.path.join(workdir, "recipe.json")
    config_file, *overrides = shlex.split(spec)
    config = load_config(config_file, overrides)
    num_steps = int(config.train.num_steps)
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        manager = checkpoints.open_manager(workdir, keep=None)
        if record.get("spec") == spec and manager.latest_step() == num_steps:
            return record
    cmd = [sys.executable, os.path.join(REPO, "main.py"), "--config", config_file]
    cmd += ["--workdir", workdir, *overrides]
    print(f"[{name}] training: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    log_path = os.path.join(out, f"{name}.log")
    os.makedirs(out, exist_ok=True)
    with open(log_path, "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    record = dict(spec=spec, wall_s=time.perf_counter() - start, steps=num_steps)
    record["steps_per_s"] = median_steps_per_s(workdir)
    with open(record_path, "w") as f:
        json.dump(record, f, indent=2)
    return record


def load_config(config_file: str, overrides: list[str]):
    """The config `main.py` would build from `config_file[:arg]` and `--config.a.b=v` overrides
    (values parsed as Python literals, else kept as strings)."""
    import ast
    import importlib.util

    path, _, arg = config_file.partition(":")
    spec = importlib.util.spec_from_file_location("recipe_config", os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    for item in overrides:
        field, _, text = item.removeprefix("--config.").partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = field.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def median_steps_per_s(workdir: str) -> float:
    """The median of the `steps_per_s` scalars the run logged to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(workdir, size_guidance={"tensors": 0})
    events.Reload()
    values = [
        float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors("steps_per_s")
    ]
    return float(np.median(values)) if values else float("nan")


def parse_overrides(text: str) -> dict:
    """Parses "cfg_scale=3 thresholding=True" -> {"cfg_scale": 3, "thresholding": True} (values
    as Python literals, else strings)."""
    import ast

    out = {}
    for item in text.split():
        field, _, value = item.partition("=")
        try:
            out[field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[field] = value
    return out


def draw(
    workdir: str, n: int, sampling: dict, batch: int, seed: int, step: int | None = None
) -> np.ndarray:
    """n uint8 samples [n, 32, 32, 1] from the EMA weights of `workdir`'s checkpoint `step`
    (default the last; `ema_std` in `sampling`: its post-hoc EMA of that std, made by
    `--mode posthoc_ema`), sample j of class j mod 10, with `sampling` overriding config.sample
    (28 x 28 models' samples are padded like the data: 2 black pixels on each side)."""
    import uvit_jax
    from uvit_jax.images import to_uint8

    loaded = uvit_jax.load(workdir, step, ema_std=float(sampling.get("ema_std", 0.0)))
    for field, value in sampling.items():
        if field not in loaded.config.sample:
            raise ValueError(f"--sampling: config.sample has no field {field!r}")
        if isinstance(loaded.config.sample[field], str):  # guide_checkpoint=2000 parses as int
            value = str(value)
        loaded.config.sample[field] = value
    guide = uvit_jax.load_guide(loaded)  # autoguidance's guide, read once (else None)
    labels = np.arange(n) % len(CLASS_NAMES)
    out = []
    for i in range(-(-n // batch)):
        y = np.resize(labels[i * batch : (i + 1) * batch], batch)
        x = uvit_jax.sample(loaded, labels=y, seed=seed, batch=i, guide=guide)
        out.append(to_uint8(x))
    x = np.concatenate(out)[:n]
    pad = (32 - x.shape[1]) // 2  # models of the native 28 x 28: the data's black 2-pixel border
    return np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


class FidScorer:
    """FID of uint8 image sets against N real test images (real Inception, cached reference)."""

    def __init__(self, out: str, test_images: np.ndarray):
        from uvit_jax.convert.inception import load_inception, resolve_inception_path
        from uvit_jax.evaluation.features import make_feature_fn
        from uvit_jax.parallel.mesh import make_mesh

        mesh = make_mesh({"data": -1, "fsdp": 1})
        self.features = make_feature_fn(load_inception(resolve_inception_path("")), mesh)
        cache = os.path.join(out, f"reference_test_{len(test_images)}.npz")
        if os.path.exists(cache):
            with np.load(cache) as f:
                self.ref = (f["mu"], f["sigma"])
        else:
            self.ref = self.moments(test_images)
            np.savez(cache, mu=self.ref[0], sigma=self.ref[1])

    def moments(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from uvit_jax.evaluation.metrics import feature_set

        batches = [padded_rgb(images[i : i + 256]) for i in range(0, len(images), 256)]
        return feature_set(batches, self.features, pad_to=256).pool.mean_cov()

    def fid(self, images: np.ndarray) -> float:
        from uvit_jax.evaluation.statistics import frechet_distance

        return frechet_distance(*self.moments(images), *self.ref)


def mean_pixel(images: np.ndarray) -> float:
    """The mean brightness of uint8 images, in [0, 1] (a model whose noise path leaks the data
    mean into x_T draws brighter images than the data's)."""
    return float(np.mean(images, dtype=np.float64) / 255.0)


def table(rows: list[dict]) -> str:
    short = [c.split("/")[0].split(" ")[0][:7] for c in CLASS_NAMES]
    head = ["recipe", "sampling", "wall s", "steps", "steps/s", "FID", "acc", "mean px"] + short
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        cells = [r["recipe"], r["sampling"], f"{r['wall_s']:.0f}", str(r["steps"])]
        cells += [f"{r['steps_per_s']:.2f}", f"{r['fid']:.1f}", f"{100 * r['mean_acc']:.1f}"]
        cells.append(f"{r['mean_pixel']:.4f}")
        cells += [f"{100 * a:.0f}" for a in r["per_class"]]
        lines.append(" | ".join(cells))
    return "\n".join("| " + line + " |" for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the runs, caches and results")
    parser.add_argument(
        "--recipe", action="append", required=True, help="name=config[:arg] [--config.x=y ...]"
    )
    parser.add_argument("--num_samples", type=int, default=2048)
    parser.add_argument(
        "--sampling",
        action="append",
        default=[],
        help='config.sample overrides, e.g. "cfg_scale=3 steps=50" (repeat for several rows)',
    )
    parser.add_argument(
        "--at_steps",
        default="",
        help="comma-separated checkpoint steps to score besides the last, e.g. 6000,8000 (the "
        "run must keep them: --config.train.keep_ckpts); wall s is then the whole run's",
    )
    parser.add_argument("--batch", type=int, default=256, help="samples per sampling call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_fid", action="store_true", help="judge only (skips Inception)")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    n = args.num_samples

    judge = train_judge(SOURCE_DIR, cache=os.path.join(out, "judge.npz"))
    test_x, _ = load_split(SOURCE_DIR, "test")
    train_x, train_y = load_split(SOURCE_DIR, "train")
    scorer = None if args.no_fid else FidScorer(out, test_x[:n])
    samplings = args.sampling or [""]

    rows = []
    for entry in args.recipe:
        name, spec = entry.split("=", 1)
        record = train(name, spec, out)
        at_steps = sorted({int(s) for s in args.at_steps.split(",") if s} | {record["steps"]})
        for step, sampling in itertools.product(at_steps, samplings):
            t0 = time.perf_counter()
            samples = draw(
                os.path.join(out, name), n, parse_overrides(sampling), args.batch, args.seed, step
            )
            sample_s = time.perf_counter() - t0
            labels = np.arange(n) % len(CLASS_NAMES)
            per_class = judge.per_class_accuracy(samples, labels)
            fid = float("nan") if scorer is None else scorer.fid(samples)
            os.makedirs(os.path.join(out, "samples"), exist_ok=True)
            tag = "_".join(sampling.split()) or "config"
            np.save(os.path.join(out, "samples", f"{name}_{step}_{tag}.npy"), samples)
            rows.append(
                dict(recipe=name, sampling=sampling or "config", **{**record, "steps": step},
                     fid=fid, sample_s=sample_s, per_class=per_class.tolist(),
                     mean_acc=float(np.mean(per_class)), mean_pixel=mean_pixel(samples))
            )  # fmt: skip
            print(table(rows[-1:]).splitlines()[-1], flush=True)

    real = train_x[:n]
    floor = dict(
        recipe="real train images", sampling="-", spec="", wall_s=0.0, steps=0, steps_per_s=0.0,
        fid=float("nan") if scorer is None else scorer.fid(real), sample_s=0.0,
        per_class=judge.test_per_class.tolist(), mean_acc=float(np.mean(judge.test_per_class)),
        mean_pixel=mean_pixel(real),
    )  # fmt: skip
    rows.append(floor)
    del train_y
    print(f"\n{n} samples per row; FID vs {n} real test images ({jax.devices()[0].device_kind})")
    print(f"judge: test accuracy {100 * judge.test_accuracy:.1f}% (last row: its per-class test")
    print("mean px: mean brightness in [0, 1]; last row: the real train images'")
    print("accuracy; the recipes' rows: how often a sample of class c is judged class c)\n")
    print(table(rows))
    with open(os.path.join(out, "quality.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
