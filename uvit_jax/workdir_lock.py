"""One training process per workdir: `W/lock.json` names its holder (host, pid, start time).

A second trainer on the same workdir would delete the first one's in-progress save (orbax
cleans temporary folders at start) and interleave steps of two runs. So `hold` creates the lock
file exclusively (O_EXCL) and refuses to start while a live holder has it. A holder refreshes
the file's `heartbeat` every HEARTBEAT_S seconds; a lock whose holder is a dead process on this
host, or whose heartbeat is older than STALE_S (a holder on a machine that went away), is stale
and taken over with a warning. Only process 0 of a multi-host run holds it: one lock per run.
Needs a filesystem with exclusive create (local disks, NFS v3+).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
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
    age = now - float(holder.get("heartbeat", 0))
    if age > STALE_S:
        return f"its last heartbeat was {age:.0f} s ago (stale after {STALE_S:.0f} s)"
    return None


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        return {}  # a holder killed while writing: no heartbeat, so stale


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
    for _ in range(3):  # another process may take over a stale lock at the same moment
        if _write_exclusive(path, me):
            return me
        try:
            holder = _read(path)
        except FileNotFoundError:
            continue  # released in between
        reason = stale_reason(holder, time.time())
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
    with contextlib.suppress(FileNotFoundError):
        holder = _read(path)
        if (holder.get("host"), holder.get("pid")) == (record["host"], record["pid"]):
            os.remove(path)


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

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            holder = _read(path) if os.path.exists(path) else {}
            if (holder.get("host"), holder.get("pid")) != (record["host"], record["pid"]):
                logging.error("%s was taken over by another process: %s", path, holder)
                return
            _refresh(path, record)

    thread = threading.Thread(target=beat, name="workdir-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        release(workdir, record)
