"""One training process per workdir: `W/lock.json` names its holder (host, pid, start time).

A second trainer on the same workdir would delete the first one's in-progress save (orbax
cleans temporary folders at start) and interleave steps of two runs. So `hold` creates the lock
file exclusively (O_EXCL) and refuses to start while a live holder has it. A holder refreshes
the file's `heartbeat` every HEARTBEAT_S seconds; a lock whose holder is a dead process on this
host, or whose heartbeat is older than STALE_S (a holder on a machine that went away), is stale
and taken over with a warning. Only process 0 of a multi-host run holds it: one lock per run.
Needs a filesystem with exclusive create (local disks, NFS v3+).

The lock is a fence: a holder that stalled past STALE_S (suspended, a frozen filesystem) may
have been taken over; before each checkpoint write the trainer calls `check(workdir)`, which
raises LockLostError once the file no longer names it (the heartbeat thread also notices), so
it stops instead of writing beside the new holder.

A `lock.json` that is not a lock record: a file that is not JSON (a holder killed between
creating it and writing it) is stale once its modification time is older than STALE_S and taken
over, and refused as "being written" before that; a directory, an unreadable file, JSON that is
not an object, or a record without a numeric heartbeat is an error naming the file and what is
wrong (delete it if no trainer uses the workdir): it was not written by uvit_jax.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator

import jax

from uvit_jax.errors import UserError

LOCK = "lock.json"
HEARTBEAT_S = 60.0
STALE_S = 600.0  # ten missed heartbeats


class WorkdirLockedError(UserError):
    """Another live training process holds the workdir."""


class LockFileError(WorkdirLockedError):
    """`lock.json` is not a lock record (a directory, unreadable, malformed)."""


class LockLostError(UserError):
    """This trainer's lock was taken over (it stalled past STALE_S): it must not save."""


# The records of the locks this process holds, by absolute workdir (`check` reads them), and
# the workdirs among them whose lock was found taken over.
_HELD: dict[str, dict] = {}
_LOST: set[str] = set()


def _me() -> dict:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.fromtimestamp(now).isoformat(timespec="seconds"),
        "heartbeat": now,
    }


def stale_reason(holder: dict, now: float) -> str | None:
    """Why the lock of `holder` no longer protects a run, or None if its holder may be alive."""
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return f"pid {holder['pid']} on this host is not running"
        except (PermissionError, KeyError, ValueError, TypeError):
            pass  # alive under another user, or a malformed record: the heartbeat decides
    age = now - float(holder["heartbeat"])
    if age > STALE_S:
        if holder.get("garbled"):
            return (
                f"it is not JSON and was last written {age:.0f} s ago (stale after {STALE_S:.0f} s)"
            )
        return f"its last heartbeat was {age:.0f} s ago (stale after {STALE_S:.0f} s)"
    return None


def _read(path: str) -> dict:
    """The holder record in `path`. Raises FileNotFoundError when there is none, LockFileError
    naming the file and the fault when it is not a lock record. A file that is not JSON (a
    holder killed before writing it) reads as {"garbled": True, "heartbeat": its mtime}."""
    remedy = f"delete it if no trainer uses {os.path.dirname(path)}"
    if os.path.isdir(path):
        raise LockFileError(f"{path} is a directory, not a lock file; {remedy}")
    try:
        with open(path, "rb") as f:
            text = f.read()
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        raise
    except OSError as e:
        raise LockFileError(f"{path} cannot be read ({type(e).__name__}: {e}); {remedy}") from e
    try:
        holder = json.loads(text)
    except ValueError:  # not JSON, or not UTF-8
        return {"garbled": True, "heartbeat": mtime}
    if not isinstance(holder, dict):
        raise LockFileError(
            f"{path} is not a lock record: it holds a JSON {type(holder).__name__}, expected an "
            f"object with host, pid and heartbeat; {remedy}"
        )
    beat = holder.get("heartbeat")
    if isinstance(beat, bool) or not isinstance(beat, (int, float)) or not math.isfinite(beat):
        what = "has no heartbeat" if beat is None else f"has heartbeat {beat!r}, not a number"
        raise LockFileError(f"{path} is not a lock record: it {what}; {remedy}")
    return holder


def _holder(path: str) -> dict:
    """The record in `path`; {} when there is none or it is not a lock record."""
    try:
        return _read(path)
    except (FileNotFoundError, LockFileError):
        return {}


def _mine(holder: dict, record: dict) -> bool:
    return (holder.get("host"), holder.get("pid")) == (record["host"], record["pid"])


def _write_exclusive(path: str, record: dict) -> bool:
    """Creates `path` holding `record` unless it exists; whether it was created."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    return True


def _refresh(path: str, record: dict) -> None:
    """Rewrites `path` with a new heartbeat, atomically (readers never see half a file)."""
    record["heartbeat"] = time.time()
    tmp = f"{path}.{record['pid']}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def acquire(workdir: str) -> dict:
    """Takes `workdir`'s lock (over a stale one, with a warning); returns the record written.
    Raises WorkdirLockedError naming the holder when a live process has it."""
    path = os.path.join(workdir, LOCK)
    me = _me()
    for attempt in range(3):  # another process may take over a stale lock at the same moment
        if _write_exclusive(path, me):
            return me
        try:
            holder = _read(path)
        except FileNotFoundError:
            continue  # released in between
        now = time.time()
        reason = stale_reason(holder, now)
        if reason is None and holder.get("garbled"):
            if attempt < 2:  # created an instant ago: its holder is writing it
                time.sleep(0.5)
                continue
            raise WorkdirLockedError(
                f"{path} is not JSON and was written {now - holder['heartbeat']:.0f} s ago: a "
                f"trainer may be starting in {workdir}; retry, or delete the file if none is"
            )
        if reason is None:
            raise WorkdirLockedError(
                f"{workdir} is in use by another training run: host {holder.get('host')}, pid "
                f"{holder.get('pid')}, started {holder.get('started')} ({path}); stop it or use "
                "another --workdir"
            )
        logging.warning(
            "taking over the lock %s of host %s, pid %s, started %s: %s",
            path, holder.get("host"), holder.get("pid"), holder.get("started"), reason,
        )  # fmt: skip
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    raise WorkdirLockedError(f"{path}: could not take the lock (other processes keep taking it)")


def release(workdir: str, record: dict) -> None:
    """Removes `workdir`'s lock if it is still `record`'s (a taker-over may own it now)."""
    path = os.path.join(workdir, LOCK)
    if _mine(_holder(path), record):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def check(workdir: str) -> None:
    """Raises LockLostError when this process held `workdir`'s lock (`hold`) and no longer
    does: another trainer took it over while this one stalled. Call it before every write into
    the workdir; a no-op where this process holds no lock (processes > 0, object stores)."""
    key = os.path.abspath(workdir)
    record = _HELD.get(key)
    if record is None:
        return
    path = os.path.join(workdir, LOCK)
    holder = _holder(path)
    if key in _LOST or not _mine(holder, record):
        _LOST.add(key)
        now = (
            f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')} "
            "holds it now" if holder.get("pid") is not None else "the file is gone"
        )  # fmt: skip
        raise LockLostError(
            f"{path}: this run no longer holds the workdir lock ({now}; a run that stalls for "
            f"over {STALE_S:.0f} s without a heartbeat is taken over): stopped before writing a "
            "checkpoint beside another trainer"
        )


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds `workdir`'s lock (process 0 only) with a heartbeat thread, released on exit."""
    if jax.process_index() != 0:
        yield
        return
    if "://" in workdir:  # object stores have no exclusive create
        logging.info("%s is not a local folder: training without a workdir lock", workdir)
        yield
        return
    record = acquire(workdir)
    path = os.path.join(workdir, LOCK)
    stop = threading.Event()
    key = os.path.abspath(workdir)
    _HELD[key] = record

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            holder = _holder(path)
            if not _mine(holder, record):
                _LOST.add(key)  # `check` stops the run before its next save
                logging.error(
                    "%s was taken over by another process: %s; this run stops before its next "
                    "checkpoint", path, holder,
                )  # fmt: skip
                return
            _refresh(path, record)

    thread = threading.Thread(target=beat, name="workdir-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        _HELD.pop(key, None)
        _LOST.discard(key)
        release(workdir, record)
