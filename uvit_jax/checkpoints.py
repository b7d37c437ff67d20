"""Every orbax call of the package: checkpoint layout, saving, restoring onto any mesh.

A workdir's `checkpoints/<step>/` holds up to four items:
  state     train state without the EMA (step, params, optimizer state, non-finite counters);
  ema       EMA parameters (what sampling, evaluation and notebooks use);
  data_iter the grain iterator position (training runs only);
  config    JSON: the resolved config, the checkpoint format version and what wrote it.
A converted official checkpoint has only `ema` and `config`.

Safety: orbax writes into a temporary folder and renames it, so a kill -9 during
a save never leaves a listed half-written step; deleting old steps is not atomic, so they are
first moved into `checkpoints/trash/`, emptied at start-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

FORMAT_VERSION = 1
ITEMS = ("state", "ema", "data_iter", "config")
_TRASH = "trash"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, of another model, or of an unknown format."""


def absolute(path: str | os.PathLike) -> epath.Path:
    """A local path made absolute (orbax refuses relative ones); URLs such as gs:// unchanged."""
    return epath.Path(path if "://" in os.fspath(path) else os.path.abspath(path))


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    return absolute(workdir) / "checkpoints"


def open_manager(
    workdir: str | os.PathLike, *, keep: int | None = 3, read_only: bool = False
) -> ocp.CheckpointManager:
    """A CheckpointManager over `workdir/checkpoints` (async saves, keep-N, safe deletes)."""
    directory = checkpoint_dir(workdir)
    if not read_only:
        if jax.process_index() == 0 and (directory / _TRASH).exists():
            shutil.rmtree(os.fspath(directory / _TRASH), ignore_errors=True)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        todelete_subdir=None if read_only else _TRASH,
        enable_async_checkpointing=not read_only,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def config_record(config: Mapping) -> dict:
    """The JSON item saved with each checkpoint."""
    return {"format_version": FORMAT_VERSION, "config": json.loads(_to_json(config))}


def _to_json(config: Mapping) -> str:
    if hasattr(config, "to_json_best_effort"):
        return config.to_json_best_effort()
    return json.dumps(config, default=str)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    *,
    ema: Any,
    config: Mapping,
    state: Any | None = None,
    data_iter: Any | None = None,
) -> None:
    """Starts an asynchronous save of the given items at `step` (call `manager.wait_until_finished`
    before reading it or exiting)."""
    import grain

    items = {"ema": ocp.args.StandardSave(ema), "config": ocp.args.JsonSave(config_record(config))}
    if state is not None:
        items["state"] = ocp.args.StandardSave(state)
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def _check_step(manager: ocp.CheckpointManager, step: int | None, where: str) -> int:
    steps = sorted(manager.all_steps())
    if not steps:
        raise CheckpointError(f"no checkpoint in {where}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise CheckpointError(f"{where} has no checkpoint at step {step}; it has steps {steps}")
    return step


def read_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """The resolved config saved at `step`; refuses formats newer than this package."""
    record = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    version = record.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint step {step} has format version {version}; this uvit_jax reads up to "
            f"{FORMAT_VERSION}: upgrade uvit_jax to read it"
        )
    return record["config"]


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    *,
    ema_target: Any,
    state_target: Any | None = None,
    data_iter: Any | None = None,
) -> dict[str, Any]:
    """Restores items onto the shardings carried by the targets.

    Targets are pytrees of `jax.ShapeDtypeStruct` with the *current* mesh's shardings, so a run
    saved on one topology resumes on another. `data_iter` is restored in place.
    """
    import grain

    items = {"ema": ocp.args.StandardRestore(ema_target)}
    if state_target is not None:
        items["state"] = ocp.args.StandardRestore(state_target)
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    return dict(manager.restore(step, args=ocp.args.Composite(**items)))


@contextlib.contextmanager
def _read_only(root: epath.Path) -> Iterator[ocp.CheckpointManager]:
    manager = ocp.CheckpointManager(
        root, options=ocp.CheckpointManagerOptions(read_only=True), item_names=ITEMS
    )
    try:
        yield manager
    finally:
        manager.close()


def find_step(workdir: str | os.PathLike, step: int | None = None) -> tuple[epath.Path, int]:
    """(checkpoint directory, step) for `workdir` or a `.../checkpoints` folder; latest if None."""
    path = absolute(workdir)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    root = path if path.name == "checkpoints" else checkpoint_dir(path)
    if not root.exists():
        raise CheckpointError(f"no checkpoint in {path}: {root} does not exist")
    with _read_only(root) as manager:
        return root, _check_step(manager, step, os.fspath(path))


def load_ema_and_config(
    workdir: str | os.PathLike, step: int | None, ema_target: Any
) -> tuple[Any, dict, int]:
    """Restores only the EMA item (and the config): what notebooks, sampling and eval need."""
    root, step = find_step(workdir, step)
    with _read_only(root) as manager:
        config = read_config(manager, step)
        ema = manager.restore(
            step, args=ocp.args.Composite(ema=ocp.args.StandardRestore(ema_target))
        )
        return ema["ema"], config, step


def load_raw_params(root: str | os.PathLike, step: int, target: Any) -> Any:
    """The `params` of the `state` item alone (a partial restore: the optimizer state is not
    read). `target`: abstract params carrying the shardings to restore onto."""
    root = absolute(root)
    folder = root / str(step)
    if not (folder / "state").exists():
        raise CheckpointError(
            f"{folder} has no `state` item, so no raw training weights (a converted official "
            "checkpoint holds only EMA weights): load it with ema=True"
        )
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
    args = ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args}, partial_restore=True
    )
    with _read_only(root) as manager:
        return manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]


def has_data_iter_for_this_topology(manager: ocp.CheckpointManager, step: int) -> bool:
    """Whether `step` holds this process's grain iterator state (grain keeps one file per
    process, so a run resumed on another number of processes has none)."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return (epath.Path(manager.directory) / str(step) / "data_iter" / name).exists()


def read_saved_config(workdir: str | os.PathLike, step: int | None = None) -> tuple[dict, int]:
    """(config dict, step) of the checkpoint at `step` (latest if None) without loading arrays."""
    root, step = find_step(workdir, step)
    with _read_only(root) as manager:
        return read_config(manager, step), step


# ---- standalone weight folders (converted autoencoders) -----------------------------------


def save_weights_folder(path: str | os.PathLike, params: Any, record: Mapping) -> None:
    """Writes a pytree of weights (`params`) and a JSON `config` record into folder `path`."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(
            absolute(path),
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(dict(record))
            ),
        )


def read_weights_folder_config(path: str | os.PathLike) -> dict:
    """The `config` record of a `save_weights_folder` folder."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(
            absolute(path), args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored["config"]


def load_weights_folder_params(path: str | os.PathLike, target: Any) -> Any:
    """The `params` of a `save_weights_folder` folder, restored onto `target`'s structure."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        args = ocp.args.Composite(params=ocp.args.StandardRestore(target))
        return ckptr.restore(absolute(path), args=args)["params"]
