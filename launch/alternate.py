"""Benchmarks in fresh processes taking turns: what `bench_all.py` and the `--vs_official`
comparisons run their programs through.

A program timed in the same process as another runtime's is timed against that runtime's
thread pools: PyTorch's OpenMP threads spin for a while after each parallel region, XLA's device
threads after each step, and each slows the other by up to 2x on a 2-core host (measured both
ways, docs/benchmarks.md). So each program runs alone in its own interpreter, and the programs
alternate (A B, B A, A B, ...) so that load from other processes and drift fall on all alike.

A program reports by printing one line `MARK + json` (`emit`); the last such line counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

MARK = "BENCH_JSON "


def emit(value: Any) -> None:
    """Prints `value` as the line `alternate`/`run_json` read back."""
    print(MARK + json.dumps(value), flush=True)


def run_json(argv: list[str], env: dict[str, str] | None = None) -> tuple[Any, str, float]:
    """Runs `python argv...` in a fresh interpreter: (its last `emit`ted value or None, the
    last lines of its error output when it failed or emitted nothing, wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *argv], env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1][len(MARK) :]), "", seconds
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return None, " | ".join(tail) or f"exit status {proc.returncode}", seconds


def alternate(
    programs: dict[str, list[str]], rounds: int, env: dict[str, str] | None = None
) -> dict[str, list[Any]]:
    """{name: [its emitted value per round]}: each round runs every program once, each in a
    fresh process, the order reversed every other round.

    Raises:
      RuntimeError: a program failed or emitted nothing (its name and error lines).
    """
    results: dict[str, list[Any]] = {name: [] for name in programs}
    names = list(programs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            value, error, seconds = run_json(programs[name], env)
            if value is None:
                raise RuntimeError(f"{name}: {error}")
            print(f"  round {r + 1}/{rounds}: {name} ({seconds:.0f} s)", file=sys.stderr)
            results[name].append(value)
    return results


def without_flags(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """`argv` without the absl flags `names` in any spelling: `--f=v`, `--f v` (a next token
    that does not start with "--" is taken as the value), `--f`, `--nof`."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name = a[2:].split("=")[0] if a.startswith("--") else ""
        if name in names or (name.startswith("no") and name[2:] in names):
            valued = "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            i += 2 if valued and name in names else 1
            continue
        out.append(a)
        i += 1
    return out
