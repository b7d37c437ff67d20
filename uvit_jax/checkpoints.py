"""Every orbax call of the package: checkpoint layout, saving, restoring onto any mesh.

A workdir's `checkpoints/<step>/` holds up to four items:
  state     train state without the EMA (step, params, optimizer state, non-finite counters);
  ema       EMA parameters (what sampling, evaluation and notebooks use);
  data_iter the grain iterator position (training runs only);
  config    JSON: the resolved config, the checkpoint format version and what wrote it.
A converted official checkpoint has only `ema` and `config`.
`<workdir>/ema_snapshots/<step>/` (`SNAPSHOTS`: the power-function EMAs of
`config.train.ema_stds`, for post-hoc reconstruction) is laid out, sealed and read the same way,
its `ema` item a tuple of EMAs, one per std, and its own retention (`open_manager(folder=...)`).
`<workdir>/posthoc_ema/std_<std>/` (`posthoc_ema_dir`) is a workdir of its own whose steps hold
the EMA `--mode posthoc_ema` reconstructed for that std (`ema`, `config`), their `config`
record naming it (`read_posthoc_ema`).

Each step also holds `checksums.json`: the size and SHA-256 of every file of every item; its
`config` record says so (`"checksums": true`), so a step whose manifest is lost is damaged, not
taken for an older unverified one.

One API, through an orbax manager:
  write  `open_manager(workdir, keep=...)`, `save(manager, step, ...)`;
  read   `with open_manager(path, read_only=True) as m:` then `good_step(m, step, items)` (the
         step asked for, or the newest sound one, checked), `read_config(m, step)`,
         `restore(m, step, ema_target=... | state_target=... | params_target=...)`.

Safety, and why a listed step is always restorable:
- orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` once every
  process has written its part; the checksums are written into the temporary folder after all
  the data (orbax's post-finalization callback, which runs on process 0 just before the rename),
  so they are committed with the step by the same rename, and a kill -9 at any moment leaves
  either no `<step>` or a complete one with its checksums.
- Restoring checks the items it reads against the checksums (`check_step`); a step that fails
  (changed or truncated file, missing file or item, empty folder, unreadable config) is named
  with the path and reason; so is a step whose config says it was saved with checksums but whose
  `checksums.json` is missing or lacks an entry for an item read. Training and `uvit_jax.load`
  without a step fall back to the newest step that passes, with a warning naming each skipped
  one; an explicit step that fails raises.
  Steps written before checksums existed (no `"checksums": true` in their config record, no
  `checksums.json`) are restored unverified.
- Deleting an old step is not atomic, so orbax first renames it into `checkpoints/trash/`
  (which takes it out of the listing at once); the trash is emptied as soon as each save and its
  deletions have finished, so `keep` bounds the disk during the run (at most `keep` + 2 steps:
  the kept ones, one being written, one in the trash).
- A save that fails (read-only folder, full disk) raises CheckpointError naming the step folder
  and the error at the next save or wait, never a hang: step folders are created in the
  caller's thread (created in orbax's background, a failure left the caller waiting).
Checking reads every file of the items restored, once per restore (and, on a multi-host run,
on every process).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from uvit_jax import library_logs
from uvit_jax.errors import UserError

FORMAT_VERSION = 1
ITEMS = ("state", "ema", "data_iter", "config")
CHECKSUMS = "checksums.json"
_TRASH = "trash"
# Aside from the listing: steps newer than the one a run resumed from that failed verification
# (kept for inspection; the run writes those step numbers again).
_REJECTED = "rejected"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, damaged, of another model, or of an unknown format."""


def absolute(path: str | os.PathLike) -> epath.Path:
    """A local path made absolute (orbax refuses relative ones); URLs such as gs:// unchanged."""
    return epath.Path(path if "://" in os.fspath(path) else os.path.abspath(path))


CHECKPOINTS, SNAPSHOTS, POSTHOC = "checkpoints", "ema_snapshots", "posthoc_ema"


def checkpoint_dir(workdir: str | os.PathLike, folder: str = CHECKPOINTS) -> epath.Path:
    return absolute(workdir) / folder


def posthoc_ema_dir(workdir: str | os.PathLike, std: float) -> epath.Path:
    """The workdir of the post-hoc EMA of relative std `std` reconstructed in `workdir`."""
    return absolute(workdir) / POSTHOC / f"std_{float(std):g}"


def posthoc_ema_run(step_folder: str | os.PathLike) -> epath.Path:
    """The workdir W of a post-hoc EMA's step folder `W/posthoc_ema/std_<s>/checkpoints/<N>`
    (the inverse of `posthoc_ema_dir`, one step deeper)."""
    return epath.Path(step_folder).parents[3]


class _SealingManager(ocp.CheckpointManager):
    """orbax's CheckpointManager that writes `checksums.json` into each step before orbax
    commits it, empties the trash once a save and its deletions have finished, and turns a
    failed save into a CheckpointError naming the step folder and the error."""

    def __init__(self, directory: epath.Path, options: ocp.CheckpointManagerOptions):
        self._sealing: int | None = None  # the step being saved (orbax saves one at a time)
        self._unchecked: int | None = None  # a started save whose outcome is not checked yet
        # Step folders are created in the caller's thread: created in the background, a failure
        # (a read-only folder) leaves the caller waiting for orbax's signal until it times out.
        options.async_options = ocp.AsyncOptions(
            post_finalization_callback=self._seal, create_directories_asynchronously=False
        )
        super().__init__(directory, options=options, item_names=ITEMS)
        # orbax removes the temporary folders of killed saves in a background thread that it
        # awaits only at the first save: a job that stops before it (a bad config found at
        # once) exited under that thread, which then printed a traceback after the error line.
        self._maybe_await_cleanup_tmp_directory()

    def save(self, step: int, *args, **kwargs) -> bool:
        self.wait_until_finished()  # the previous step is sealed before `_sealing` moves on
        self._sealing = step
        try:
            started = super().save(step, *args, **kwargs)
        except Exception as e:  # orbax and the filesystem fail in many ways; all are fatal
            raise self._failed(e) from e
        self._unchecked = step if started else None
        return started

    def _seal(self) -> None:
        # Runs on process 0 after every process has written, before orbax renames the
        # temporary folder; storages that commit in place (a commit file) have no such folder.
        tmp = self.directory / f"{self._sealing}{ocp.path.atomicity.TMP_DIR_SUFFIX}"
        write_checksums(tmp if tmp.exists() else self.directory / str(self._sealing))

    def _failed(self, error: BaseException | None) -> CheckpointError:
        cause = (
            "see the error logged above" if error is None else f"{type(error).__name__}: {error}"
        )
        return CheckpointError(
            f"saving checkpoint step {self._sealing} into {self.directory} failed ({cause}); "
            "the steps saved before it are intact"
        )

    def wait_until_finished(self) -> None:
        try:
            super().wait_until_finished()
        except Exception as e:  # raised again from the background save thread
            self._unchecked = None  # reported once: a later wait (at exit) must not mask it
            raise self._failed(e) from e
        # orbax logs (and swallows) some failures of the background thread; the step folder
        # then never appears.
        if self._unchecked is not None and not (self.directory / str(self._unchecked)).exists():
            raise self._failed(None)
        self._unchecked = None
        trash = self.directory / _TRASH
        if jax.process_index() == 0 and trash.exists():
            trash.rmtree()


def open_manager(
    workdir: str | os.PathLike,
    *,
    keep: int | None = 3,
    read_only: bool = False,
    folder: str = CHECKPOINTS,
) -> ocp.CheckpointManager:
    """A CheckpointManager over `workdir/<folder>` (async sealed saves, keep-N (None: all),
    safe deletes); `folder`: `CHECKPOINTS` or `SNAPSHOTS`.

    read_only: a manager that only reads (`good_step`, `read_config`, `restore`); `workdir` may
    also be the `folder` itself. Close it after use (`with open_manager(...) as m`).
    Raises CheckpointError when there is no such folder.
    """
    if read_only:
        path = absolute(workdir)
        directory = path if path.name == folder else checkpoint_dir(path, folder)
        if not path.exists():
            raise CheckpointError(f"{path} does not exist")
        if not directory.exists():
            raise CheckpointError(f"no checkpoint in {path}: {directory} does not exist")
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        with library_logs.quiet(logging.ERROR, ("/orbax/",)):  # it warns that it is read-only
            return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)
    directory = checkpoint_dir(workdir, folder)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, cleanup_tmp_directories=True, todelete_subdir=_TRASH
    )
    manager = _SealingManager(directory, options)
    manager.wait_until_finished()  # empties a trash left by a killed run
    return manager


# ---- checksums -------------------------------------------------------------------------------


def _digest(path: epath.Path) -> str:
    """The SHA-256 of file `path`, read in 1 MiB blocks (state files can be gigabytes)."""
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
    return sha.hexdigest()


def _item_files(folder: epath.Path) -> dict[str, dict]:
    """{path relative to `folder`: {"bytes", "sha256"}} of every file under `folder`."""
    paths = sorted(top / name for top, _, names in folder.walk() for name in names)
    return {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().length, "sha256": _digest(p)}
        for p in paths
    }


def write_checksums(step_dir: epath.Path) -> None:
    """Writes `step_dir/checksums.json`: size and SHA-256 of every file of each item there."""
    items = {n: _item_files(step_dir / n) for n in ITEMS if (step_dir / n).is_dir()}
    (step_dir / CHECKSUMS).write_text(json.dumps({"version": 1, "items": items}, indent=1))


def _check_files(folder: epath.Path, files: Mapping[str, Mapping]) -> None:
    """Raises CheckpointError naming the first file under `folder` that differs from `files`."""
    for name, want in files.items():
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().length
        if size != want["bytes"]:
            raise CheckpointError(
                f"{path} is truncated or changed: {size} bytes, saved {want['bytes']}"
            )
        if _digest(path) != want["sha256"]:
            raise CheckpointError(
                f"{path} is corrupt: its SHA-256 differs from the one saved with the step"
            )


# Why an item may be missing from a step that is otherwise fine.
_MISSING_HINTS = {
    "state": " (no raw training weights: a converted official checkpoint holds only EMA "
    "weights; read those with ema=True)",
}


def check_step(manager: ocp.CheckpointManager, step: int, items: Sequence[str]) -> bool:
    """Checks that `items` of `step` (and its config) can be restored: present, a config this
    version reads, every file as saved. True when checksums were checked, False for a step
    written before checksums existed. Raises CheckpointError naming the path and the reason
    (a step deleted while it is checked included)."""
    folder = epath.Path(manager.directory) / str(step)
    try:
        return _check_step(manager, step, items, folder)
    except FileNotFoundError as e:  # deleted in between (a trainer's keep-N moved it to trash)
        raise CheckpointError(f"{folder} vanished while it was checked ({e})") from e


def _check_step(
    manager: ocp.CheckpointManager, step: int, items: Sequence[str], folder: epath.Path
) -> bool:
    if not folder.is_dir() or not any(folder.iterdir()):
        raise CheckpointError(f"{folder} is empty")
    for name in ("config", *items):
        if not (folder / name).is_dir():
            raise CheckpointError(f"{folder} has no `{name}` item{_MISSING_HINTS.get(name, '')}")
    try:
        sealed = _read_record(manager, step).get("checksums") is True
    except (CheckpointError, FileNotFoundError):
        raise
    except Exception as e:  # orbax reports a damaged JSON item with various exception types
        raise CheckpointError(f"{folder / 'config'} is unreadable ({type(e).__name__}: {e})") from e
    record = folder / CHECKSUMS
    if not record.exists():
        if sealed:
            raise CheckpointError(
                f"{record} is missing, but the step was saved with checksums (its config says "
                "so): its files cannot be verified"
            )
        return False
    try:
        saved = json.loads(record.read_text())["items"]
        if not isinstance(saved, dict):
            raise TypeError(f"`items` is a {type(saved).__name__}, not an object")
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{record} is unreadable ({type(e).__name__}: {e})") from e
    for name in dict.fromkeys(("config", *items)):
        if name not in saved:  # every item folder of a step has its entry when it is sealed
            raise CheckpointError(
                f"{record} has no entry for the `{name}` item: its files cannot be verified"
            )
        _check_files(folder / name, saved[name])
    return True


def good_step(manager: ocp.CheckpointManager, step: int | None, items: Sequence[str]) -> int | None:
    """The step to read: `step` once its `items` pass `check_step`, or, when `step` is None,
    the newest step whose `items` pass (warning about each newer one that does not); None when
    the folder has no step at all. Raises CheckpointError naming the folder when `step` is not
    there, and the path and reason when it fails or when no step passes."""
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise CheckpointError(
                f"{manager.directory} has no checkpoint at step {step}; it has steps "
                f"{sorted(steps)}"
            )
        check_step(manager, step, items)
        return step
    reasons = []
    for candidate in steps:
        try:
            verified = check_step(manager, candidate, items)
        except CheckpointError as e:
            logging.warning("skipping checkpoint step %d: %s", candidate, e)
            reasons.append(f"step {candidate}: {e}")
            continue
        if not verified:
            logging.info(
                "checkpoint step %d has no %s (older uvit_jax): not verified", candidate, CHECKSUMS
            )
        if reasons:
            logging.warning("falling back to checkpoint step %d", candidate)
        return candidate
    if reasons:
        raise CheckpointError(
            f"no restorable checkpoint in {manager.directory}:\n  " + "\n  ".join(reasons)
        )
    return None


def set_aside_newer(
    manager: ocp.CheckpointManager, step: int | None, what: str = "failed checkpoint"
) -> None:
    """Moves the steps newer than `step` (those that failed verification; `what` they are, for
    the log) into `rejected/` of the manager's folder, out of the listing, so a resumed run can
    write their step numbers again; they stay there for inspection."""
    root = epath.Path(manager.directory)
    newer = [s for s in manager.all_steps() if step is None or s > step]
    if newer and jax.process_index() == 0:
        (root / _REJECTED).mkdir(exist_ok=True)
        for s in newer:
            target = root / _REJECTED / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}"
            (root / str(s)).rename(target)
            logging.warning("moved the %s step %d to %s", what, s, target)
    if newer:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("uvit_jax set_aside_newer")
        manager.reload()


def _config_record(config: Mapping) -> dict:
    """The JSON item saved with each checkpoint. `checksums`: the step has a `checksums.json`
    (`check_step` refuses the step without it, or without an item's entry in it)."""
    return {
        "format_version": FORMAT_VERSION,
        "checksums": True,
        "config": json.loads(_to_json(config)),
    }


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
    posthoc_ema: Mapping | None = None,
) -> None:
    """Starts an asynchronous save of the given items at `step` (call `manager.wait_until_finished`
    before reading it or exiting). posthoc_ema: the record of a reconstructed EMA (its `std`,
    ...), kept in the `config` item beside the config."""
    import grain

    record = _config_record(config)
    if posthoc_ema is not None:
        record["posthoc_ema"] = dict(posthoc_ema)
    items = {"ema": ocp.args.StandardSave(ema), "config": ocp.args.JsonSave(record)}
    if state is not None:
        items["state"] = ocp.args.StandardSave(state)
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def read_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """The resolved config saved at `step`; refuses formats newer than this package."""
    return _read_record(manager, step)["config"]


def read_posthoc_ema(manager: ocp.CheckpointManager, step: int) -> dict | None:
    """The record of a reconstructed EMA saved at `step` (`save(posthoc_ema=...)`); None for a
    checkpoint of training or conversion."""
    return _read_record(manager, step).get("posthoc_ema")


def _read_record(manager: ocp.CheckpointManager, step: int) -> dict:
    """The whole `config` item of `step` (`_config_record`); refuses newer formats."""
    record = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    version = record.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint step {step} has format version {version}; this uvit_jax reads up to "
            f"{FORMAT_VERSION}: upgrade uvit_jax to read it"
        )
    return record


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    *,
    ema_target: Any | None = None,
    state_target: Any | None = None,
    params_target: Any | None = None,
    data_iter: Any | None = None,
) -> dict[str, Any]:
    """Restores the items whose targets are given, onto the shardings the targets carry.

    Targets are pytrees of `jax.ShapeDtypeStruct` with the *current* mesh's shardings, so a run
    saved on one topology resumes on another. ema_target: the `ema` item. state_target: the
    whole `state` item. params_target: only the `params` of the `state` item (a partial restore:
    the optimizer state is not read), returned as "params". data_iter: restored in place.
    Check the step first (`good_step`).
    """
    import grain

    items = {}
    if ema_target is not None:
        items["ema"] = ocp.args.StandardRestore(ema_target)
    if state_target is not None:
        items["state"] = ocp.args.StandardRestore(state_target)
    elif params_target is not None:
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), params_target
        )
        items["state"] = ocp.args.PyTreeRestore(
            item={"params": params_target},
            restore_args={"params": restore_args},
            partial_restore=True,
        )
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = dict(manager.restore(step, args=ocp.args.Composite(**items)))
    if state_target is None and params_target is not None:
        restored["params"] = restored.pop("state")["params"]
    return restored


def has_data_iter_for_this_topology(manager: ocp.CheckpointManager, step: int) -> bool:
    """Whether `step` holds this process's grain iterator state (grain keeps one file per
    process, so a run resumed on another number of processes has none)."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return (epath.Path(manager.directory) / str(step) / "data_iter" / name).exists()


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
