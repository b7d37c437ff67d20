"""Watching the other processes of a multi-process job, so that one death stops them all.

JAX learns that a process died only when its heartbeats have been missing long enough, and then
aborts the others with a C++ stack dump; a process blocked in a collective with the dead one
waits until then. Here every process keeps a beat counter in the coordination service's
key-value store, and a daemon thread in each watches the next live process of the ring
(i + 1, i + 2, ... mod N: O(N) traffic however large the job), so:

  - a process that fails (an error, a bug) first waits up to the timeout for a report (its error
    is most often a collective broken by another's death), then writes why to
    `uvit_peers/stopped`;
  - a process whose counter stops moving for `UVIT_PEER_TIMEOUT` seconds (default 30; killed,
    or its host is down) is declared dead by its watcher, which writes that;
  - every process reads `uvit_peers/stopped` each beat and, once it is set, prints one line
    naming the process and the cause, and ends with exit status 2.

A process that finishes normally writes `uvit_peers/done/<i>` and is skipped by its watcher.
The exit is `os._exit`: the main thread may be blocked in a collective that will never finish,
and JAX's exit barrier would wait for the dead process. Beats are counters read against this
host's monotonic clock, so the hosts' clocks need not agree. `UVIT_PEER_TIMEOUT=0` turns the
watch off.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from uvit_jax.errors import ConfigError

_PREFIX = "uvit_peers"
_STOPPED = f"{_PREFIX}/stopped"
_TIMEOUT_DEFAULT_S = 30.0


def peer_timeout_s(env: dict[str, str] | None = None) -> float:
    """`UVIT_PEER_TIMEOUT` in seconds (default 30; 0: no watch)."""
    env = os.environ if env is None else env
    text = env.get("UVIT_PEER_TIMEOUT", "")
    try:
        value = float(text) if text else _TIMEOUT_DEFAULT_S
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"UVIT_PEER_TIMEOUT={text!r}: expected a number of seconds >= 0")
    return value


class PeerWatch:
    """The watch of one process (see the module docstring).

    Args:
      client: the coordination service's key-value client (`key_value_set`,
        `key_value_try_get`); JAX's distributed client in a job.
      index, count: this process and the number of processes.
      timeout_s: silence after which a watched process is declared dead.
      exit: called with the exit status once another process has stopped (default `os._exit`).
    """

    def __init__(
        self,
        client: Any,
        index: int,
        count: int,
        timeout_s: float,
        exit: Callable[[int], None] = os._exit,
    ):
        self.client, self.index, self.count = client, index, count
        self.timeout_s, self.interval_s = timeout_s, max(timeout_s / 10, 0.05)
        self._exit = exit
        self._beats = 0
        self._failing = threading.Event()  # this process failed: `failed` decides its exit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peer-watch", daemon=True)

    def start(self) -> PeerWatch:
        self._beat()
        self._thread.start()
        return self

    def close(self) -> None:
        """Stops the thread (tests; a job's watch runs until the process ends)."""
        self._stop.set()
        self._thread.join()

    def finished(self) -> None:
        """This process's job ended normally: its watcher stops watching it (this process keeps
        watching the others until it exits: JAX's exit barrier waits for them)."""
        self._set(f"{_PREFIX}/done/{self.index}", "1")

    def failed(self, why: str, status: int, wait: bool = True) -> None:
        """This process's job failed with `why`; returns only to let the error be printed.

        A collective's error is most often another process's death, which its watcher names
        within the timeout: this waits that long for a report and, if one comes, leaves with
        it. Otherwise it reports `why`, so that every other process stops, and makes this
        process's exit skip JAX's exit barrier (which would wait for those processes) with
        `status`, a moment after the others could read the report. `wait=False` (Ctrl-C: the
        cause is known) reports at once.
        """
        self._failing.set()
        first_line = (why.strip().splitlines() or ["(no message)"])[0]
        if wait:
            logging.warning(
                "process %d failed (%s); waiting up to %g s to learn whether another died first",
                self.index, first_line, self.timeout_s,
            )  # fmt: skip
        deadline = time.monotonic() + (self.timeout_s + 3 * self.interval_s if wait else 0)
        while time.monotonic() < deadline:
            try:
                stopped = self._get(_STOPPED)
            except Exception as e:
                self._leave(_unreachable(self.timeout_s, e, waited=False))
                return
            if stopped is not None:
                self._leave(stopped)
                return
            time.sleep(self.interval_s)
        self._report(f"process {self.index} of {self.count} failed: {first_line}")
        atexit.register(self._exit_after_report, status)

    def _exit_after_report(self, status: int) -> None:
        time.sleep(3 * self.interval_s)  # process 0 holds the store the others read it from
        self._exit(status)

    # ---- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        watched, seen, since = None, None, time.monotonic()
        unreachable_since = None
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
                stopped = self._get(_STOPPED)
                target = self._next_live()
                beat = None if target is None else self._get(f"{_PREFIX}/beat/{target}")
            except Exception as e:  # the coordination service is gone (process 0 died)
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self.timeout_s and not self._failing.is_set():
                    self._leave(_unreachable(self.timeout_s, e, waited=True))
                    return
                continue
            unreachable_since = None
            if stopped is not None and not self._failing.is_set():
                self._leave(stopped)
                return
            now = time.monotonic()
            if target != watched or beat != seen:
                watched, seen, since = target, beat, now
            elif target is not None and now - since > self.timeout_s:
                self._report(
                    f"process {target} of {self.count} stopped answering for "
                    f"{self.timeout_s:g} s (killed, or its host is down)"
                )

    def _next_live(self) -> int | None:
        """The first process after this one (in ring order) that has not finished."""
        for step in range(1, self.count):
            other = (self.index + step) % self.count
            if self._get(f"{_PREFIX}/done/{other}") is None:
                return other
        return None

    def _leave(self, why: str) -> None:
        # One write of the whole line: print's separate newline can interleave with another
        # thread's line (several watches share a process in tests).
        sys.stderr.write(f"error: {why}; stopping process {self.index} too\n")
        sys.stderr.flush()
        self._exit(2)

    # ---- the store -------------------------------------------------------------------------

    def _beat(self) -> None:
        self._beats += 1
        self._set(f"{_PREFIX}/beat/{self.index}", str(self._beats))

    def _report(self, why: str) -> None:
        try:  # the first report stands: a later one (a consequence) is refused
            self.client.key_value_set(_STOPPED, why, allow_overwrite=False)
        except Exception:
            pass

    def _set(self, key: str, value: str) -> None:
        self.client.key_value_set(key, value, allow_overwrite=True)

    def _get(self, key: str) -> str | None:
        try:
            return self.client.key_value_try_get(key)
        except Exception as e:
            if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
                return None
            raise


def _unreachable(timeout_s: float, error: Exception, waited: bool) -> str:
    first = str(error).splitlines()[0] if str(error) else repr(error)
    when = f"has not answered for {timeout_s:g} s" if waited else "does not answer"
    return f"the coordination service (on process 0's host) {when}: {first}"


_WATCH: PeerWatch | None = None


def watch_peers() -> PeerWatch | None:
    """Starts this process's watch in a multi-process job (once); None for one process or
    `UVIT_PEER_TIMEOUT=0`."""
    global _WATCH
    import jax
    from jax._src import distributed  # the client JAX itself uses for multihost_utils

    timeout = peer_timeout_s()
    if _WATCH is None and jax.process_count() > 1 and timeout > 0:
        client = distributed.global_state.client
        _WATCH = PeerWatch(client, jax.process_index(), jax.process_count(), timeout).start()
    return _WATCH
