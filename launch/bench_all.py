"""Every job's throughput on this machine in one table, each beside its anchor.

    python launch/bench_all.py [--official_dir ~/U-ViT] [--json bench_all.json]

Rows come from the `summary()` of each benchmark script in `launch/` (each a short version of
that script), run one per fresh process so that their XLA flags, thread pools and imports
(torch before TensorFlow) cannot interfere:
  train step        ours vs the official PyTorch step (bench_train.py; `--official_dir`: a clone
                    of the official U-ViT, else the repository's PyTorch stand-in)
  sampling          guided sampling of the default, one 2B pass vs two B passes (bench_sampling.py)
  Inception         pool3 features vs pytorch-fid (bench_inception.py)
  extraction        the default's dataset extraction vs raw numpy + array_record (bench_extract.py)
  input pipeline    32x32x4 latents through the training iterator vs 10,000/s (bench_input.py)
A ratio above 1 means ours is faster than the anchor. The anchors run on the same machine in the
same process, alternated with ours, so the ratios hold on a loaded machine even when the
absolute numbers do not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LAUNCH = os.path.dirname(os.path.abspath(__file__))
BENCHES = ("bench_train", "bench_sampling", "bench_inception", "bench_extract", "bench_input")
MARK = "BENCH_ALL_ROWS "


def run_summary(module: str, env: dict[str, str]) -> tuple[list[dict], float]:
    """`module.summary()` in a fresh interpreter; (its rows, wall seconds)."""
    code = (
        f"import json, sys; sys.path.insert(0, {LAUNCH!r}); import {module}; "
        f"print({MARK!r} + json.dumps({module}.summary()))"
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        error = " | ".join(tail) or f"exit status {proc.returncode}"
        return [dict(job=module, ours=None, anchor=None, unit="", ratio=None, note=error)], seconds
    return json.loads(lines[-1][len(MARK) :]), seconds


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| job | ours | anchor | unit | ours / anchor | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        lines.append(
            f"| {r['job']} | {_num(r.get('ours'))} | {_num(r.get('anchor'))} | {r.get('unit', '')} "
            f"| {ratio} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official_dir", default="", help="a clone of the official U-ViT")
    parser.add_argument("--json", default="", help="also write the rows here")
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BENCHES))
    args = parser.parse_args()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if args.official_dir:
        env["UVIT_OFFICIAL_DIR"] = os.path.abspath(os.path.expanduser(args.official_dir))
    benches = [b for b in BENCHES if not args.only or b in args.only.split(",")]
    rows = []
    for module in benches:
        module_rows, seconds = run_summary(module, env)
        print(f"{module}: {len(module_rows)} row(s) in {seconds:.0f} s", flush=True)
        rows += module_rows
    import jax  # after the benchmarks: this process only names the machine

    device = jax.devices()[0]
    print(f"\n{jax.device_count()} x {device.device_kind} ({device.platform}), ", end="")
    print(f"{os.cpu_count()} CPUs")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
