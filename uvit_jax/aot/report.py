"""What the compiler says of one program on one chip, and the roofline that follows from it.

    row = program_report(program, mesh, chip)   # a dict, JSON-ready

memory    per-chip bytes of XLA's buffer assignment: arguments, outputs, temporaries, generated
          code, and the output bytes that alias (donated) arguments; `peak` = arguments +
          outputs - aliased + temporaries + code, against the chip's HBM.
flops     the compiler's FLOPs per chip per execution (`cost_analysis()`), next to the
          model count (`train.flops`: the traced forward's matmuls and convolutions) divided by
          the chips; XLA's count adds the elementwise work and any rematerialized forward pass,
          and counts a loop's body once.
roofline  an estimate, not a measurement: the time each resource alone would need at its
          published peak (`parallel.chips`): compute at the bf16 peak, HBM traffic
          (`bytes accessed`) at the HBM bandwidth, collective bytes at the full ICI bandwidth
          (DCN for groups that cross slices). `step_s` is the largest (perfect overlap);
          the MFU ceiling and images/s/chip follow from it. Compute counts the larger of the
          two FLOP figures: XLA's misses all but one pass of every loop (the sampler's steps,
          the TPU compiler's windowed-einsum loops), the model count the elementwise work.
"""

from __future__ import annotations

import time
from typing import Any

import jax
from jax.sharding import Mesh

from uvit_jax.aot.collectives import collectives, summarize
from uvit_jax.aot.programs import Program
from uvit_jax.parallel.chips import Chip

GIB = 2**30


def memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    """Per-chip bytes of a compiled program (see the module docstring)."""
    m = compiled.memory_analysis()
    out = dict(
        arguments=int(m.argument_size_in_bytes),
        outputs=int(m.output_size_in_bytes),
        aliased=int(m.alias_size_in_bytes),
        temporaries=int(m.temp_size_in_bytes),
        code=int(m.generated_code_size_in_bytes),
    )
    out["peak"] = (
        out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
    )
    return out


def roofline(
    flops: float, hbm_bytes: float | None, ici_bytes: float, dcn_bytes: float, chip: Chip
) -> dict[str, float | None]:
    """Seconds per execution each resource alone would need, and their maximum (`step_s`);
    None where the amount (GPU programs carry no byte count) or the chip's rate is unknown."""

    def per(amount: float | None, rate: float | None) -> float | None:
        return None if amount is None or rate is None else amount / rate

    times = dict(
        compute_s=flops / chip.peak_bf16_flops,
        hbm_s=per(hbm_bytes, chip.hbm_bytes_per_s),
        ici_s=per(ici_bytes, chip.ici_bytes_per_s) if ici_bytes else 0.0,
        dcn_s=per(dcn_bytes, chip.dcn_bytes_per_s) if dcn_bytes else 0.0,
    )
    times["step_s"] = max(t for t in times.values() if t is not None)
    times["bound"] = max((k for k in times if times[k] is not None), key=lambda k: times[k])
    return times


def program_report(program: Program, mesh: Mesh, chip: Chip) -> dict[str, Any]:
    """Compiles `program` over `mesh` and reports memory, FLOPs, collectives and roofline.

    An out-of-memory compile is a result, not an error: `fits` False with the compiler's
    message under `error`.
    """
    chips = mesh.devices.size
    t0 = time.perf_counter()
    row: dict[str, Any] = dict(program=program.name, batch=program.batch, chips=chips)
    # Executables for devices that are not attached cannot be loaded back: keep them out of
    # the persistent compilation cache (it would store them and warn on every later read).
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        with jax.set_mesh(mesh):
            compiled = program.lower().compile()
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "memory" not in text.lower():
            raise
        row.update(fits=False, error=text.splitlines()[0][:400])
        row["compile_s"] = time.perf_counter() - t0
        return row
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    row["compile_s"] = time.perf_counter() - t0
    mem = memory(compiled)
    cost = compiled.cost_analysis()  # None for GPU programs compiled without a GPU
    flops = float(cost["flops"]) if cost else None
    hbm = float(cost["bytes accessed"]) if cost else None
    ops = summarize(collectives(compiled.as_text(), mesh))
    ici = sum(r["bytes"] for r in ops if not r["dcn"])
    dcn = sum(r["bytes"] for r in ops if r["dcn"])
    model = None if program.model_flops is None else program.model_flops / chips
    row.update(
        fits=chip.hbm_bytes is None or mem["peak"] <= chip.hbm_bytes,
        memory=mem,
        hbm_capacity=chip.hbm_bytes,
        flops_per_chip=flops,
        model_flops_per_chip=model,
        flops_ratio=None if not model or flops is None else flops / model,
        bytes_accessed=hbm,
        collectives=ops,
        ici_bytes=ici,
        dcn_bytes=dcn,
    )
    rl = roofline(max(flops or 0.0, model or 0.0), hbm, ici, dcn, chip)
    row["roofline"] = rl
    if model and rl["hbm_s"] is not None:  # without a byte count, compute alone: no ceiling
        rl["mfu_ceiling"] = model / (rl["step_s"] * chip.peak_bf16_flops)
        rl["images_per_s_per_chip"] = program.batch / chips / rl["step_s"]
    return row


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def _tflop(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e12:.3f}"


def format_table(rows: list[dict[str, Any]], chip: Chip) -> str:
    """One line per program: memory, FLOPs, collectives, roofline."""
    head = (
        f"{'program':<15}{'batch':>6} {'peak GiB':>9} {'args':>6} {'temp':>6} {'of HBM':>7} "
        f"{'TFLOP/chip':>11} {'xla/model':>9} {'coll. MiB':>9} {'roofline ms':>11} "
        f"{'bound':>8} {'MFU ceil':>8} {'img/s/chip':>10} {'compile s':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if not r.get("fits", True) and "memory" not in r:
            lines.append(f"{r['program']:<15}{r['batch']:>6}  does not fit: {r['error'][:90]}")
            continue
        m, rl = r["memory"], r["roofline"]
        cap = "-" if chip.hbm_bytes is None else f"{m['peak'] / chip.hbm_bytes:.0%}"
        ratio = "-" if r["flops_ratio"] is None else f"{r['flops_ratio']:.3f}"
        mfu = rl.get("mfu_ceiling")
        ips = rl.get("images_per_s_per_chip")
        lines.append(
            f"{r['program']:<15}{r['batch']:>6} {_gib(m['peak']):>9} {_gib(m['arguments']):>6} "
            f"{_gib(m['temporaries']):>6} {cap:>7} {_tflop(r['flops_per_chip']):>11} "
            f"{ratio:>9} {(r['ici_bytes'] + r['dcn_bytes']) / 2**20:>9.1f} "
            f"{rl['step_s'] * 1e3:>11.2f} {rl['bound'].removesuffix('_s'):>8} "
            f"{'-' if mfu is None else f'{mfu:.0%}':>8} "
            f"{'-' if ips is None else f'{ips:.1f}':>10} {r['compile_s']:>9.0f}"
        )
    return "\n".join(lines)
