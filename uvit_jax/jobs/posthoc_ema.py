"""`--mode posthoc_ema`: EMAs of other lengths, reconstructed after training from snapshots.

    python main.py --mode posthoc_ema --config configs/fashion_mnist_uvit.py --workdir W \\
        --config.posthoc.stds=0.02,0.05,0.1

Reads the snapshots in `W/ema_snapshots/` (training with `config.train.ema_stds` writes the
power-function EMAs there every `config.train.ema_snapshot_every` steps), finds for each
relative std of `config.posthoc.stds` the least-squares combination of the snapshots whose
averaging profile is closest to that std's power-function profile at the last snapshot's step
(or `config.posthoc.step`; EDM2, Karras et al. 2024; the math: `uvit_jax/train/power_ema.py`),
and writes the combined weights as a checkpoint `W/posthoc_ema/std_<std>/checkpoints/<step>/`
(a rerun at the same step replaces it). Those load like a run's EMA:
`uvit_jax.load(W, ema_std=0.05)`, `--config.sample.ema_std=0.05` for `--mode sample` and
`--mode eval`, `--config.sweep.ema_stds=(0, 0.02, 0.05)` for `--mode sweep` (0: the classic
EMA); `uvit_jax.load(W/posthoc_ema/std_0.05)` as a workdir of its own.

Only the snapshots up to the target step are used (a reconstruction at step S depends on no
later weights). Each std's relative profile error (the residual) is logged and saved with it;
a std whose error exceeds `config.posthoc.max_residual` is refused, naming the range the
snapshots support, before anything is read.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from uvit_jax import checkpoints
from uvit_jax.api import config_from_dict, restore_target
from uvit_jax.checkpoints import CheckpointError
from uvit_jax.errors import ConfigError
from uvit_jax.models.uvit import abstract_uvit
from uvit_jax.parallel.mesh import make_mesh
from uvit_jax.train import power_ema
from uvit_jax.train.power_ema import Reconstruction


@dataclasses.dataclass(frozen=True)
class Snapshots:
    """A workdir's EMA snapshots, checked to be one unbroken sequence.

    steps: the snapshot steps, every `every` from the first to the last; stds: the tracked
    relative stds, in the order of each snapshot's `ema` tuple; config: the run's saved config.
    """

    directory: epath.Path
    steps: tuple[int, ...]
    stds: tuple[float, ...]
    every: int
    config: dict

    def basis(self, up_to: int) -> tuple[np.ndarray, np.ndarray]:
        """(end steps [N], exponents [N]) of the profiles of the snapshots at steps <= `up_to`,
        snapshot by snapshot, std by std (the order `combine` reads them in)."""
        steps = [s for s in self.steps if s <= up_to]
        gammas = power_ema.gamma_of_std(self.stds)
        return np.repeat(steps, len(self.stds)), np.tile(gammas, len(steps))

    def describe(self) -> str:
        stds = ", ".join(f"{s:g}" for s in self.stds)
        return (
            f"{len(self.steps)} snapshots of stds {stds} every {self.every} steps from "
            f"{self.steps[0]} to {self.steps[-1]}"
        )


def _tracked(saved: Mapping) -> tuple[tuple[float, ...], int]:
    train = saved.get("train", {})
    return tuple(float(s) for s in train.get("ema_stds", ()) or ()), int(
        train.get("ema_snapshot_every", 0)
    )


def read_snapshots(manager: ocp.CheckpointManager) -> Snapshots:
    """The snapshots of `manager`'s folder. Raises CheckpointError naming the folder when it
    holds none, when one was written with other stds or interval, or when the sequence has a
    gap (a missing step of `every`)."""
    directory = epath.Path(manager.directory)
    steps = sorted(manager.all_steps())
    if not steps:
        raise CheckpointError(
            f"no EMA snapshots in {directory}: the folder holds no snapshot step (training "
            "writes them every config.train.ema_snapshot_every steps)"
        )
    config = checkpoints.read_config(manager, steps[-1])
    stds, every = _tracked(config)
    for step in steps[:-1]:
        other = _tracked(checkpoints.read_config(manager, step))
        if other != (stds, every):
            raise CheckpointError(
                f"{directory}/{step}: snapshot of stds {other[0]} every {other[1]} steps, but "
                f"step {steps[-1]}'s are {stds} every {every}: the folder mixes runs"
            )
    first = -(-steps[0] // every) * every  # the first step of the sequence in the folder
    missing = sorted(set(range(first, steps[-1] + 1, every)) - set(steps))
    stray = [s for s in steps if s % every]
    if missing or stray:
        listed = ", ".join(str(s) for s in (missing or stray)[:5])
        more = " ..." if len(missing or stray) > 5 else ""
        what = "is missing step(s)" if missing else "has step(s) off its interval:"
        raise CheckpointError(
            f"{directory} {what} {listed}{more} of the snapshot sequence every {every} steps "
            f"from {steps[0]} to {steps[-1]}: a reconstruction needs all of them (restore the "
            "missing ones, or set config.posthoc.step before the first gap and move the later "
            "ones away)"
        )
    return Snapshots(directory, tuple(steps), stds, every, config)


def target_step(config, snapshots: Snapshots) -> int:
    """`config.posthoc.step`, or the last snapshot's step for 0; refused outside the
    snapshots' range."""
    step = int(config.posthoc.step) or snapshots.steps[-1]
    first, last = snapshots.steps[0], snapshots.steps[-1]
    if not first <= step <= last:
        raise ConfigError(
            f"config.posthoc.step={step}: expected a step from {first} to {last}, the range of "
            f"the snapshots in {snapshots.directory}"
        )
    return step


def plan(config, snapshots: Snapshots, step: int) -> list[Reconstruction]:
    """The reconstruction of every std of `config.posthoc.stds` at `step`. Raises ConfigError
    for a std whose relative profile error exceeds `config.posthoc.max_residual`, naming the
    range of stds the snapshots reconstruct within it."""
    stds = tuple(float(s) for s in config.posthoc.stds)
    if not stds:
        raise ConfigError(
            "config.posthoc.stds=(): expected the relative stds to reconstruct, e.g. "
            "--config.posthoc.stds=0.02,0.05,0.1"
        )
    limit = float(config.posthoc.max_residual)
    steps, gammas = snapshots.basis(step)
    plans = []
    for std in stds:
        r = power_ema.reconstruct(steps, gammas, std, step)
        if r.residual > limit:
            support = power_ema.supported_stds(steps, gammas, step, limit)
            where = f"about {support[0]:.3g} to {support[1]:.3g}" if support else "none"
            raise ConfigError(
                f"config.posthoc.stds: {std:g} is outside what {snapshots.describe()} "
                f"reconstruct at step {step}: relative profile error {r.residual:.3g} > "
                f"config.posthoc.max_residual={limit:g}; supported: {where}"
            )
        plans.append(r)
    return plans


@jax.jit
def _accumulate(sums: tuple, emas: tuple, weights: jax.Array) -> tuple:
    """sums[r] + sum_k weights[r, k] emas[k] for every target r (float32; weights [R, K])."""
    return tuple(
        jax.tree.map(
            lambda acc, *es, r=r: acc + sum(weights[r, k] * e for k, e in enumerate(es)),
            total,
            *emas,
        )
        for r, total in enumerate(sums)
    )


def combine(
    manager: ocp.CheckpointManager,
    snapshots: Snapshots,
    plans: list[Reconstruction],
    step: int,
    mesh,
) -> tuple[Any, ...]:
    """The weights of each plan: its weighted sum of the snapshots up to `step`, read one
    snapshot at a time (each checked against its checksums) onto `mesh` (FSDP layout)."""
    model = config_from_dict(snapshots.config).model
    _, abstract = nnx.split(abstract_uvit(model))
    target = restore_target(abstract, mesh)
    k = len(snapshots.stds)
    used = [s for s in snapshots.steps if s <= step]
    # [R, snapshots, K]: plan r's weight of std k's snapshot at used[i] (`Snapshots.basis`).
    weights = np.stack([p.weights.reshape(len(used), k) for p in plans]).astype(np.float32)
    sums = tuple(
        jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), target)
        for _ in plans
    )
    for i, snap in enumerate(used):
        checkpoints.good_step(manager, snap, ("ema",))
        emas = checkpoints.restore(manager, snap, ema_target=(target,) * k)["ema"]
        sums = _accumulate(sums, tuple(emas), jnp.asarray(weights[:, i, :]))
    return sums


def _record(r: Reconstruction, snapshots: Snapshots, used: int) -> dict[str, Any]:
    """What a reconstructed checkpoint's config record says about it."""
    return dict(
        std=r.std,
        gamma=r.gamma,
        step=r.step,
        residual=r.residual,
        gain=r.gain,
        snapshots=dict(
            directory=str(snapshots.directory),
            stds=list(snapshots.stds),
            every=snapshots.every,
            first=snapshots.steps[0],
            used=used,
        ),
        weights=r.weights.tolist(),
    )


def write(workdir: str, r: Reconstruction, weights: Any, snapshots: Snapshots) -> epath.Path:
    """Saves one reconstruction as `W/posthoc_ema/std_<std>/checkpoints/<step>/` (an existing
    one of that step is replaced); returns the step folder."""
    out = checkpoints.posthoc_ema_dir(workdir, r.std)
    with checkpoints.open_manager(out, keep=None) as manager:
        if r.step in manager.all_steps():
            logging.info("posthoc_ema: replacing %s", epath.Path(manager.directory) / str(r.step))
            if jax.process_index() == 0:
                (epath.Path(manager.directory) / str(r.step)).rmtree()
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("uvit_jax posthoc_ema replace")
            manager.reload()
        used = sum(s <= r.step for s in snapshots.steps)
        checkpoints.save(
            manager,
            r.step,
            ema=weights,
            config=snapshots.config,
            posthoc_ema=_record(r, snapshots, used),
        )
        manager.wait_until_finished()
        return epath.Path(manager.directory) / str(r.step)


def posthoc_ema_job(config, workdir: str) -> dict[float, str]:
    """Reconstructs the EMA of every std of `config.posthoc.stds`; returns {std: the folder of
    its checkpoint}."""
    folder = checkpoints.checkpoint_dir(workdir, checkpoints.SNAPSHOTS)
    if not folder.exists():
        raise CheckpointError(
            f"no EMA snapshots in {workdir}: {folder} does not exist (train with "
            "config.train.ema_stds and config.train.ema_snapshot_every set)"
        )
    with checkpoints.open_manager(workdir, read_only=True, folder=checkpoints.SNAPSHOTS) as m:
        snapshots = read_snapshots(m)
        step = target_step(config, snapshots)
        plans = plan(config, snapshots, step)
        sums = combine(m, snapshots, plans, step, make_mesh(config.mesh))
    written = {}
    for r, weights in zip(plans, sums, strict=True):
        path = write(workdir, r, weights, snapshots)
        logging.info(
            "posthoc_ema: std %g (gamma %.3f) at step %d from %s: relative profile error "
            "%.3g, sum of |weights| %.3g -> %s",
            r.std, r.gamma, step, snapshots.describe(), r.residual, r.gain, path,
        )  # fmt: skip
        written[r.std] = str(path)
    return written
