"""`--mode ablate`: variants of a config trained with one recipe and evaluated with one protocol.

    python main.py --mode ablate --config configs/fashion_mnist_uvit.py --workdir W \\
        --config.eval.ref_stats=test.npz --config.eval.num_samples=2048 \\
        "--config.ablate.variants=('base:', 'add: model.skip_fusion=add', 'd9: model.depth=9')" \\
        "--config.ablate.seeds=(0, 1)" --config.ablate.eval_every=1000

The paper's design study (Figures 2 and 3) in one job. Each variant is the config with its
fields changed; every variant trains with the same data, data order, seeds and step count (a
variant that sets `seed=` trains that seed only: `'base_s2: seed=2'` adds a seed to one), in
`W/ablate/<variant>/seed<s>/` (a checkpoint every `eval_every` steps, all kept), and each of
those checkpoints is evaluated as `--mode eval` evaluates it (the config's sampler, samples,
reference and Inception). Every variant is checked before the first one trains, and a config
error of any is reported then, with the variant's name. The dataset is extracted once, into
`config.data.latent_dir` or `W/latent_dataset`, and shared.

A killed ablation resumes where it stopped: a variant's training resumes from its checkpoints,
a finished one is not trained again, and an evaluation resumes from its stored batches or is
read back. After each variant the results are rewritten:
  W/ablate/results.csv    one row per variant, seed and evaluated step: fields, metrics;
  W/ablate/results.json   the same rows, each with its evaluation's protocol fingerprint;
  W/ablate/fid.png        FID against training steps, one curve per variant (the mean over
                          seeds; each seed's points beside it); with one evaluated step,
                          each variant's FID as a row of points instead;
and TensorBoard (`W/ablate`) gets `ablate/<metric>/<variant>/seed<s>` with the training step.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import os
import re
from typing import Any

import jax
from etils import epath

from input_pipeline.extract import resolve_latent_dir
from uvit_jax import checkpoints
from uvit_jax.api import load
from uvit_jax.errors import ConfigError, UserError
from uvit_jax.evaluation.evaluator import check_sample_count, make_evaluator
from uvit_jax.jobs.evaluate import evaluate_loaded
from uvit_jax.jobs.sweep import METRICS, csv_text, write_metric_rows
from uvit_jax.jobs.train import check_config, train_job
from uvit_jax.parallel.mesh import make_mesh

_NAME = re.compile(r"[A-Za-z0-9_.+-]+")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One entry of `config.ablate.variants`: a name and the fields it sets."""

    name: str
    fields: tuple[tuple[str, Any], ...]

    @classmethod
    def parse(cls, text: str) -> Variant:
        """`"name: field=value, field=value"`; values are Python literals, else strings."""
        name, sep, rest = text.partition(":")
        name = name.strip()
        if not sep or not _NAME.fullmatch(name):
            raise ConfigError(
                f"config.ablate.variants: {text!r}: expected 'name: field=value, ...' with a "
                "name of letters, digits and _.+-"
            )
        fields = []
        for item in filter(None, (part.strip() for part in rest.split(","))):
            field, eq, value = item.partition("=")
            if not eq:
                raise ConfigError(
                    f"config.ablate.variants: variant {name!r}: {item!r} is not field=value"
                )
            fields.append((field.strip(), _literal(value.strip())))
        return cls(name, tuple(fields))

    def seeds(self, shared: list[int]) -> list[int]:
        """The training seeds of this variant: its own `seed=` field alone, else `shared`
        (`config.ablate.seeds`); an extra seed of one variant is a variant of its own."""
        own = [int(v) for f, v in self.fields if f == "seed"]
        return own[-1:] or shared

    @property
    def label(self) -> str:
        """The name and its fields, as the table and the plot show them."""
        set_ = ", ".join(f"{f}={v}" for f, v in self.fields)
        return f"{self.name} ({set_})" if set_ else self.name

    def apply(self, config) -> Any:
        """A copy of `config` with this variant's fields set."""
        config = config.copy_and_resolve_references()
        for field, value in self.fields:
            *path, last = field.split(".")
            section = config
            try:
                for key in path:
                    section = section[key]
                if last not in section:
                    raise KeyError(last)
                section[last] = value
            except KeyError as e:
                raise ConfigError(f"config.{field}: no such field") from e
            except TypeError as e:  # ConfigDict keeps each field's type
                raise ConfigError(f"config.{field}={value!r}: {e}") from e
        return config


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_variants(config) -> list[Variant]:
    """The variants of `config.ablate`, names unique; at least one."""
    variants = [Variant.parse(str(v)) for v in config.ablate.variants]
    if not variants:
        raise ConfigError("config.ablate.variants is empty: list at least one 'name: field=value'")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"config.ablate.variants: names repeat: {names}")
    return variants


def eval_steps(config) -> list[int]:
    """The training steps evaluated: every `ablate.eval_every` steps, and the last."""
    num_steps, every = int(config.train.num_steps), int(config.ablate.eval_every)
    if every < 0:
        raise ConfigError(f"config.ablate.eval_every={every}: expected >= 0 (0: the last step)")
    steps = list(range(every, num_steps + 1, every)) if every else []
    return steps if steps and steps[-1] == num_steps else [*steps, num_steps]


def run_config(config, variant: Variant, seed: int, data_dir: str) -> Any:
    """The training config of one variant and seed: the shared dataset, a checkpoint at each
    evaluated step, all of them kept; FID during training off (the ablation evaluates)."""
    c = variant.apply(config)
    steps = eval_steps(config)
    c.seed = int(seed)
    c.data.latent_dir = data_dir
    every = int(config.ablate.eval_every) or int(config.train.num_steps)
    c.train.update(ckpt_every=every, keep_ckpts=len(steps) + 1)
    for section in c.train.evals.values():
        if section.type == "fid":
            section.every = 0
    return c


def _trained_to(workdir: epath.Path, num_steps: int) -> bool:
    if not (workdir / "checkpoints").exists():
        return False
    with checkpoints.open_manager(workdir, read_only=True) as manager:
        return checkpoints.good_step(manager, None, ("state", "ema")) == num_steps


def ablate_job(config, workdir: str) -> list[dict[str, Any]]:
    """Trains and evaluates every variant and seed of `config.ablate`; returns the rows."""
    variants = parse_variants(config)
    seeds = [int(s) for s in config.ablate.seeds]
    if not seeds:
        raise ConfigError("config.ablate.seeds is empty: give at least one training seed")
    steps = eval_steps(config)
    check_sample_count(config, "num_samples")
    mesh = make_mesh(config.mesh)
    data_dir = resolve_latent_dir(config, workdir)
    runs, problems = [], []
    for variant in variants:
        try:
            checked = run_config(config, variant, variant.seeds(seeds)[0], data_dir)
            check_config(checked, make_mesh(checked.mesh))
        except (UserError, ValueError, TypeError) as e:
            problems.append(f"{variant.label}: {e}")
            continue
        runs += [
            (variant, s, run_config(config, variant, s, data_dir)) for s in variant.seeds(seeds)
        ]
    if problems:
        raise ConfigError("config.ablate.variants that cannot train:\n  " + "\n  ".join(problems))
    evaluator = make_evaluator(config, mesh)

    out = epath.Path(workdir) / "ablate"
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i, (variant, seed, c) in enumerate(runs):
        where = out / variant.name / f"seed{seed}"
        logging.info("ablate: %d/%d: %s, seed %d", i + 1, len(runs), variant.label, seed)
        if not _trained_to(where, int(config.train.num_steps)):
            train_job(c, os.fspath(where))
        for step in steps:
            loaded = load(where, step=step, mesh=mesh)
            result = evaluate_loaded(c, os.fspath(where), loaded, evaluator, mesh)
            rows.append(_row(variant, seed, step, result))
        if jax.process_index() == 0:
            _write_table(rows, out)
    if jax.process_index() == 0:
        write_metric_rows(
            rows,
            out,
            config,
            workdir,
            job="ablate",
            step="step",
            series=lambda r: f"{r['variant']}/seed{r['seed']}",
        )
    return rows


def _row(variant: Variant, seed: int, step: int, result: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = dict(
        variant=variant.name,
        fields="; ".join(f"{f}={v}" for f, v in variant.fields),
        seed=seed,
        step=step,
        num_samples=int(result["protocol"]["num_samples"]),
    )
    row.update({k: result[k] for k in METRICS if isinstance(result.get(k), float)})
    row.update(seconds=result.get("seconds"), protocol=result["protocol"])
    return row


def _write_table(rows: list[dict[str, Any]], out: epath.Path) -> None:
    (out / "results.csv").write_text(csv_text(rows))
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    try:
        plot_fid_vs_training(rows, out / "fid.png")
    except ImportError:
        logging.warning("ablate: no plot (matplotlib missing: pip install -e '.[eval]')")


def plot_fid_vs_training(rows: list[dict[str, Any]], path: epath.Path) -> None:
    """FID against training steps, one curve per variant (the mean over its seeds, each seed's
    points beside it), as a PNG at `path` (the paper's Figure 2 form). With one evaluated step,
    a row per variant instead: each seed's FID as a point, the mean as a bar."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training host
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "fid" in r]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    one_step = len({r["step"] for r in rows}) == 1
    height = max(4.0, 0.3 * len(variants) + 1.0) if one_step else 4.0
    fig, ax = plt.subplots(figsize=(6.4, height), dpi=100)
    for i, variant in enumerate(variants):
        mine = [r for r in rows if r["variant"] == variant]
        steps = sorted({r["step"] for r in mine})
        means = [_mean([r["fid"] for r in mine if r["step"] == s]) for s in steps]
        if one_step:
            ax.barh(i, means[0], height=0.6, alpha=0.35)
            ax.scatter([r["fid"] for r in mine], [i] * len(mine), s=12, color="k")
            continue
        (line,) = ax.plot(steps, means, marker="o", label=variant)
        if len({r["seed"] for r in mine}) > 1:
            ax.scatter([r["step"] for r in mine], [r["fid"] for r in mine], s=8,
                       color=line.get_color(), alpha=0.5)  # fmt: skip
    if one_step:
        ax.set_yticks(range(len(variants)), variants, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"FID at step {rows[0]['step']} (bar: mean over seeds; points: seeds)")
    else:
        ax.set_xlabel("training steps")
        ax.set_ylabel("FID")
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    plt.close(fig)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
