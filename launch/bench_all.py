"""Every job's throughput on this machine in one table, each beside its anchor.

    python launch/bench_all.py [--official_dir ~/U-ViT] [--json bench_all.json]

Rows come from the `summary()` of each benchmark script in `launch/` (each a short version of
that script), run one per fresh process so that their XLA flags, thread pools and imports
(torch before TensorFlow) cannot interfere:
  train step        ours vs the official PyTorch step at batch 16 and 32 (the default's)
                    (bench_train.py; `--official_dir`: a clone of the official U-ViT, else the
                    repository's PyTorch stand-in)
  sampling          guided sampling of the default vs the official network; one 2B pass vs two
                    B passes (bench_sampling.py)
  Inception         pool3 features vs pytorch-fid (bench_inception.py)
  extraction        the default's dataset extraction vs raw numpy + array_record (bench_extract.py)
  input pipeline    32x32x4 latents through the training iterator vs 10,000/s (bench_input.py)
A ratio above 1 means ours is faster than the anchor. The train and sampling rows time ours and
the official code each alone in fresh processes, alternating for 3 rounds (median; one runtime's
idle threads slow the other's, launch/alternate.py); the others alternate ours and the anchor in
one process. Either way load from other processes falls on both alike, so the ratios hold on a
loaded machine even when the absolute numbers do not. Every row names the host (CPU, vector
extensions, cores, load average).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alternate import run_json  # noqa: E402

from uvit_jax.parallel.host import describe_host  # noqa: E402

LAUNCH = os.path.dirname(os.path.abspath(__file__))
BENCHES = ("bench_train", "bench_sampling", "bench_inception", "bench_extract", "bench_input")


def run_summary(module: str, env: dict[str, str]) -> tuple[list[dict], float]:
    """`module.summary()` in a fresh interpreter; (its rows, wall seconds). Each row gets the
    `host` line (CPU, cores, load average) where its script did not name one."""
    code = (
        f"import sys; sys.path.insert(0, {LAUNCH!r}); import alternate, {module}; "
        f"alternate.emit({module}.summary())"
    )
    rows, error, seconds = run_json(["-c", code], env)
    if rows is None:
        rows = [dict(job=module, ours=None, anchor=None, unit="", ratio=None, note=error)]
    host = describe_host()
    return [dict(r, host=r.get("host", host)) for r in rows], seconds


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"


def _load(host: str) -> str:
    """The 1-minute load average of a `describe_host` line."""
    return host.rpartition("load average ")[2].split(" ")[0] or "-"


def table(rows: list[dict]) -> str:
    lines = [
        "| job | ours | anchor | unit | ours / anchor | load | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        lines.append(
            f"| {r['job']} | {_num(r.get('ours'))} | {_num(r.get('anchor'))} | {r.get('unit', '')} "
            f"| {ratio} | {_load(r.get('host', ''))} | {r.get('note', '')} |"
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
    print(f"\nhost: {describe_host()}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
