"""`--mode sweep`: one checkpoint's eval metrics over a grid of sampler settings.

    python main.py --mode sweep --config configs/fashion_mnist_uvit.py --workdir W \\
        --config.eval.ref_stats=test.npz --config.eval.num_samples=2048 \\
        "--config.sweep.samplers=('dpm_solver++_3s', 'unipc_bh2', 'dpm_solver++_3m')" \\
        "--config.sweep.steps=(5, 10, 15, 20, 25)" "--config.sweep.cfg_intervals=((), (0.3, 6))"

Every cell (EMA std x sampler x steps x guidance scale x guidance interval x guidance schedule
x time grid x guidance kind x autoguidance's guide; a field left empty keeps `config.sample`'s
value) is an `--mode eval` of the weights with those sample settings, and the same sample
count, seed, labels and reference (`config.eval`). The EMA stds (`config.sweep.ema_stds`, as
`config.sample.ema_std`: 0 the classic EMA, else the post-hoc EMA `--mode posthoc_ema` made for
that std) add the columns `ema_std` and `step` (the weights' step) to the table. Every cell's
settings and weights, and each guide checkpoint (read once), are checked before the first
sample is drawn. A cell resumes like `--mode eval` (its features are kept per batch; a
finished cell is read back), so a stopped sweep continues cell by cell. After each cell the
table is rewritten:
  W/sweep/step_<N>.csv    one row per cell: settings, NFE, metrics, wall seconds;
  W/sweep/step_<N>.json   the same rows, each with its cell's protocol fingerprint;
  W/sweep/step_<N>.png    FID against NFE, one line per sampler and guidance setting;
and TensorBoard (`W/sweep`) gets `sweep/<metric>/<line>` with the NFE as its step.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
from etils import epath

from uvit_jax.api import load_guide, posthoc_ema_workdir
from uvit_jax.diffusion.formulation import Formulation
from uvit_jax.errors import ConfigError
from uvit_jax.evaluation.evaluator import check_sample_count, make_evaluator
from uvit_jax.jobs.evaluate import evaluate_loaded, load_weights, weights_choice
from uvit_jax.parallel.mesh import make_mesh
from uvit_jax.sampling.generate import SamplerSpec, guide_checkpoint_of

METRICS = ("fid", "sfid", "precision", "recall", "kid", "inception_score")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One setting of the sweep: what `config.sample` gets for this evaluation."""

    sampler: str
    steps: int
    cfg_scale: float
    cfg_interval: tuple[float, ...]
    cfg_schedule: str
    grid: str
    guidance: str = "cfg"
    guide_checkpoint: str = ""  # autoguidance cells only
    ema_std: float = 0.0

    def apply(self, config) -> Any:
        """A copy of `config` whose `sample` section holds this cell's settings (a cell of scale
        0 is unguided: no interval, the constant schedule, no guide)."""
        config = config.copy_and_resolve_references()
        config.sample.update(
            sampler=self.sampler,
            steps=self.steps,
            cfg_scale=self.cfg_scale,
            cfg_interval=self.cfg_interval,
            cfg_schedule=self.cfg_schedule,
            grid=self.grid,
            guidance=self.guidance,
            guide_checkpoint=self.guide_checkpoint,
            ema_std=self.ema_std,
        )
        return config

    def nfe(self, config) -> int:
        """Network evaluations per sample (a guided one counts once: CFG batches both passes
        into one call, autoguidance calls the guide beside the main model)."""
        return self.steps + int(bool(config.sample.get("denoise_to_zero", False)))

    @property
    def line(self) -> str:
        """The curve this cell belongs to in the plot: everything but the step count."""
        name = f"{self.sampler}, cfg {self.cfg_scale:g}"
        if self.guidance == "autoguidance":
            name = f"{self.sampler}, autoguidance {self.cfg_scale:g} by {self.guide_checkpoint}"
        if self.cfg_interval:
            name += f" in ({self.cfg_interval[0]:g}, {self.cfg_interval[1]:g}]"
        if self.cfg_schedule != "constant":
            name += f", {self.cfg_schedule} schedule"
        name += f", {self.grid} grid" if self.grid else ""
        return name + (f", EMA std {self.ema_std:g}" if self.ema_std else "")


def sweep_cells(config) -> list[Cell]:
    """The product of `config.sweep`'s lists, the EMA std outermost (one set of weights after
    the other); an empty list is `config.sample`'s own value. A scale of 0 is one unguided cell
    per (EMA std, sampler, steps, grid), whatever the intervals, schedules, guidance kinds and
    guides (they have no scale to act on); guides apply to autoguidance cells only."""
    s, own = config.sweep, config.sample

    def values(field: str, default: Any) -> tuple:
        return tuple(s.get(field, ()) or ()) or (default,)

    cells = [
        Cell(
            sampler,
            int(steps),
            float(scale),
            tuple(float(v) for v in interval) if scale else (),
            str(schedule) if scale else "constant",
            str(grid),
            str(guidance) if scale else "cfg",
            str(guide) if scale and guidance == "autoguidance" else "",
            float(ema_std),
        )
        for ema_std, sampler, steps, scale, interval, schedule, grid, guidance, guide in (
            itertools.product(
                values("ema_stds", own.get("ema_std", 0.0)),
                values("samplers", own.sampler),
                values("steps", own.steps),
                values("cfg_scales", own.cfg_scale),
                values("cfg_intervals", tuple(own.get("cfg_interval", ()) or ())),
                values("cfg_schedules", own.get("cfg_schedule", "constant")),
                values("grids", own.get("grid", "")),
                values("guidances", own.get("guidance", "cfg")),
                values("guide_checkpoints", guide_checkpoint_of(config)),
            )
        )
    ]
    return list(dict.fromkeys(cells))  # in order, without the repeated unguided cells


def _row(cell: Cell, config, result: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = dict(
        sampler=cell.sampler,
        steps=cell.steps,
        nfe=cell.nfe(config),
        cfg_scale=cell.cfg_scale,
        cfg_interval=" ".join(f"{v:g}" for v in cell.cfg_interval) or "all",
        cfg_schedule=cell.cfg_schedule,
        grid=cell.grid or "own",
        guidance=cell.guidance,
        guide=cell.guide_checkpoint or "none",
        num_samples=int(result["protocol"]["num_samples"]),
    )
    row.update({k: result[k] for k in METRICS if isinstance(result.get(k), float)})
    row["seconds"] = result.get("seconds")
    return row


def csv_text(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row if k != "protocol"))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def plot_fid_vs_nfe(rows: list[dict[str, Any]], path: epath.Path, title: str) -> None:
    """FID against NFE, one line per sampler and guidance setting, as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training host
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for line in dict.fromkeys(r["line"] for r in rows):
        points = sorted((r["nfe"], r["fid"]) for r in rows if r["line"] == line and "fid" in r)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=line)
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel("FID")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    plt.close(fig)


def sweep_job(config, workdir: str) -> list[dict[str, Any]]:
    """Evaluates the latest checkpoint (or its post-hoc EMAs) at every cell of `config.sweep`;
    returns the rows."""
    check_sample_count(config, "num_samples")
    mesh = make_mesh(config.mesh)
    cells = sweep_cells(config)
    loaded = load_weights(cells[0].apply(config), workdir, mesh)
    guides = {}  # guide_checkpoint -> its Loaded, read once for every cell it guides
    for cell in cells:  # every setting and set of weights checked before the first sample
        cell_config = cell.apply(config)
        weights_choice(cell_config)
        if cell.ema_std:
            posthoc_ema_workdir(workdir, cell.ema_std)
        run_config = loaded.config.copy_and_resolve_references()
        run_config.update(sample=cell_config.sample)
        try:
            SamplerSpec.from_config(run_config)
            if cell.guide_checkpoint and cell.guide_checkpoint not in guides:
                guides[cell.guide_checkpoint] = load_guide(loaded, run_config)
        except ValueError as e:
            raise ConfigError(
                f"config.sweep: the cell ({cell.line}, {cell.steps} steps): {e}"
            ) from e
    evaluator = make_evaluator(config, mesh)
    out = epath.Path(workdir) / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"step_{loaded.step}"
    stds = list(dict.fromkeys(cell.ema_std for cell in cells))
    weights = "EMA" if loaded.ema else "raw"
    if stds != [0.0]:
        weights = "EMA std " + ", ".join(f"{s:g}" if s else "classic" for s in stds)
    title = (
        f"{Formulation.from_config(loaded.config).label}: "
        f"step {loaded.step} ({weights}), {int(config.eval.num_samples)} samples vs "
        f"{evaluator.reference.num_images} reference images"
    )
    rows: list[dict[str, Any]] = []
    for i, cell in enumerate(cells):
        logging.info("sweep: cell %d/%d: %s, %d steps", i + 1, len(cells), cell.line, cell.steps)
        if cell.ema_std != loaded.ema_std:  # the cells of one std follow each other
            loaded = load_weights(cell.apply(config), workdir, mesh)
        guide = guides.get(cell.guide_checkpoint)
        result = evaluate_loaded(cell.apply(config), workdir, loaded, evaluator, mesh, guide)
        row = _row(cell, config, result)
        if stds != [0.0]:
            row.update(ema_std=cell.ema_std, step=loaded.step)
        rows.append(dict(row, line=cell.line, protocol=result["protocol"]))
        if jax.process_index() == 0:
            _write_table(rows, stem, title)
            logging.info("sweep: %s", {k: v for k, v in rows[-1].items() if k != "protocol"})
    if jax.process_index() == 0:
        write_metric_rows(
            rows, out, config, workdir, job="sweep", step="nfe", series=lambda r: r["line"]
        )
    return rows


def _write_table(rows: list[dict[str, Any]], stem: epath.Path, title: str) -> None:
    stem.with_suffix(".csv").write_text(csv_text(rows))
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    try:
        plot_fid_vs_nfe(rows, stem.with_suffix(".png"), title)
    except ImportError:
        logging.warning("sweep: no plot (matplotlib missing: pip install -e '.[eval]')")


def write_metric_rows(
    rows: list[dict[str, Any]],
    out: epath.Path,
    config,
    workdir: str,
    *,
    job: str,
    step: str,
    series: Callable[[dict[str, Any]], str],
) -> None:
    """Each row's METRICS as `<job>/<metric>/<series(row)>` at step `row[step]`: TensorBoard in
    `out` (+ the log) and, where config.logging.wandb is on, W&B (job `job`, x-axis
    `<job>/<step>`)."""
    from uvit_jax.train import dashboard

    writer = dashboard.metric_writer(
        config,
        workdir,
        logdir=os.fspath(out),
        console=True,
        job_type=job,
        step_metric=f"{job}/{step}",
    )
    for row in rows:
        scalars = {f"{job}/{k}/{series(row)}": row[k] for k in METRICS if k in row}
        writer.write_scalars(row[step], scalars)
    writer.close()
