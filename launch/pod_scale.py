"""The "Will it fit?" table of docs/pod_scale.md: every paper config's train step, at its paper
batch, compiled for v5e, v5p and v6e slices by `--mode compile` (the job, in process).

  python launch/pod_scale.py --workdir /tmp/pod_scale    # every config: about an hour, 2 cores
  python launch/pod_scale.py --workdir W --configs imagenet256_uvit_huge --chips v5p

For each (config, chip):
- the large slice: min(256, batch) chips, FSDP over every chip (on a slice this size it holds
  the least and, with the optimizer update split 256 ways, also has the shorter roofline than
  pure data parallelism: 46.5 vs 58.8 ms for U-ViT-H/2 on v5p-128), the first of remat none /
  dots / full that fits;
- the smallest slice: FSDP over every chip with full remat (the most frugal setting), found
  by bisection over the slice sizes below the large slice (three compiles); all large slices
  come first, then the smallest-slice searches, each config in the order given.
Each compile's JSON stays under W/<config>/... (a rerun reuses it); the markdown table is
printed after every config.
Compiler numbers and a roofline estimate, not measured runs.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from uvit_jax.parallel.xla_flags import add_cpu_flags  # noqa: E402

add_cpu_flags()  # JAX_PLATFORMS=cpu where libtpu is installed without a TPU

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from configs.paper import PAPER, paper_config  # noqa: E402
from uvit_jax.jobs.compile import compile_job, output_name  # noqa: E402
from uvit_jax.parallel.chips import CHIPS  # noqa: E402

flags.DEFINE_string("workdir", None, "Where each compile's JSON goes.")
flags.DEFINE_list("configs", sorted(PAPER), "Paper configs (configs/paper.py names).")
flags.DEFINE_list("chips", ["v5e", "v5p", "v6e"], "TPU generations.")
flags.DEFINE_bool("smallest", True, "Also bisect each config's smallest slice (3 compiles each).")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS

# Slice sizes in chips (v5p's smallest slice is v5p-8: 4 chips).
SLICES = {"v5e": (1, 4, 8, 16, 32, 64, 128, 256), "v6e": (1, 4, 8, 16, 32, 64, 128, 256),
          "v5p": (4, 8, 16, 32, 64, 128, 256)}  # fmt: skip


def topology(chip: str, chips: int) -> str:
    """v5e / v6e accelerator types count chips, v5p TensorCores (two per chip)."""
    return f"{chip}-{2 * chips}" if chip == "v5p" else f"{chip}-{chips}"


def compile_train_step(name: str, chip: str, chips: int, fsdp: int, remat: str, workdir: str):
    """The job's report of one train step compile; None where the batch cannot split."""
    c = paper_config(name)
    if c.train.batch_size % chips:
        return None
    c.compile.update(topology=topology(chip, chips), programs=("train_step",))
    c.mesh.update(data=chips // fsdp, fsdp=fsdp)
    c.model.remat = remat
    out = os.path.join(workdir, name, f"fsdp{fsdp}_{remat}")
    done = os.path.join(out, "compile", output_name(c.compile.topology, 1) + ".json")
    if os.path.exists(done):  # compiled by an earlier run: the table resumes, not recompiles
        with open(done) as f:
            (row,) = json.load(f)["programs"]
        hbm = CHIPS[chip].hbm_bytes  # judged against today's chip table
        row.update(hbm_capacity=hbm, fits="memory" in row and row["memory"]["peak"] <= hbm)
    else:
        (row,) = compile_job(c, out)["programs"]
    row.update(topology=topology(chip, chips), fsdp=fsdp, remat=remat)
    return row


def large_slice(name: str, chip: str, workdir: str) -> dict:
    chips = min(256, int(paper_config(name).train.batch_size))
    for remat in ("none", "dots", "full"):
        row = compile_train_step(name, chip, chips, chips, remat, workdir)
        if row["fits"]:
            return row
    return row


def smallest_slice(name: str, chip: str, large: dict, workdir: str) -> dict | None:
    """The smallest slice that holds the step with FSDP over every chip and full remat (the
    most frugal setting), by bisection over the slice sizes below the large slice, which
    fits: per-chip bytes do not follow one simple law in the chips (at a few examples per
    chip, gathered weights outweigh the split state and activations), so only compiles
    decide."""
    sizes = [n for n in SLICES[chip] if n <= large["chips"] and large["batch"] % n == 0]
    lo, hi, best = -1, len(sizes) - 1, None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        row = compile_train_step(name, chip, sizes[mid], sizes[mid], "full", workdir)
        if row["fits"]:
            hi, best = mid, row
        else:
            lo = mid
    return best


def markdown(rows: list[dict]) -> str:
    head = (
        "| config | slice | chips | mesh (data x fsdp) | remat | per-chip HBM (GiB, of) | "
        "TFLOP/chip/step (XLA / model) | collectives (GiB/chip/step) | compute / HBM / "
        "collective ms | roofline step (ms) | MFU ceiling | hours for the paper's steps |\n|"
        + "---|"
        * 12
    )
    lines = [head]
    for r in rows:
        if r is None or "memory" not in r:
            continue
        rl = r["roofline"]
        hours = r["num_steps"] * rl["step_s"] / 3600
        lines.append(
            f"| {r['config']} | {r['topology']} | {r['chips']} | {r['chips'] // r['fsdp']} x "
            f"{r['fsdp']} | {r['remat']} | {r['memory']['peak'] / 2**30:.1f} "
            f"({r['hbm_capacity'] / 2**30:.1f}) | {r['flops_per_chip'] / 1e12:.2f} / "
            f"{r['model_flops_per_chip'] / 1e12:.2f} | "
            f"{(r['ici_bytes'] + r['dcn_bytes']) / 2**30:.2f} | {rl['compute_s'] * 1e3:.1f} / "
            f"{rl['hbm_s'] * 1e3:.1f} / {(rl['ici_s'] + rl['dcn_s']) * 1e3:.1f} | "
            f"{rl['step_s'] * 1e3:.1f} ({rl['bound'].removesuffix('_s')}) | "
            f"{rl['mfu_ceiling']:.0%} | {hours:.1f} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    pairs = [(name, chip) for name in FLAGS.configs for chip in FLAGS.chips]
    large = {}
    for name, chip in pairs:
        large[name, chip] = large_slice(name, chip, FLAGS.workdir)
        large[name, chip].update(config=name, num_steps=int(paper_config(name).train.num_steps))
        print(markdown(list(large.values())), flush=True)
    rows = {pair: [row] for pair, row in large.items()}
    for pair in pairs if FLAGS.smallest else []:
        small = smallest_slice(*pair, large[pair], FLAGS.workdir) if large[pair]["fits"] else None
        if small is not None:
            small.update(config=pair[0], num_steps=large[pair]["num_steps"])
            rows[pair].insert(0, small)
        with open(os.path.join(FLAGS.workdir, "rows.json"), "w") as f:
            json.dump([r for p in pairs for r in rows[p]], f, indent=1, default=float)
        print(markdown([r for p in pairs for r in rows[p]]), flush=True)
    print(f"jax {jax.__version__}")


if __name__ == "__main__":
    app.run(main)
