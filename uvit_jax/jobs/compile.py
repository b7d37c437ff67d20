"""The compile job: `python main.py --mode compile --config ... --workdir W
--config.compile.topology=v5p:4x4x2` compiles the config's programs for a TPU slice that is
not there (compile-only devices from the TPU compiler, `parallel.topology`) and reports what
each chip holds, computes and sends, with a roofline estimate (`aot.report`).

Writes W/compile/<topology>.json and prints one table. With `--config.compile.fit=true` it
instead searches the mesh shape and remat policy that fit the train step (`aot.fit`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
from etils import epath

from uvit_jax import latent_scale
from uvit_jax.aot.fit import fit_search
from uvit_jax.aot.programs import PROGRAMS, make_programs
from uvit_jax.aot.report import format_table, program_report
from uvit_jax.errors import ConfigError
from uvit_jax.models.uvit import REMAT_POLICIES
from uvit_jax.parallel.mesh import make_mesh, num_slices
from uvit_jax.parallel.topology import parse_topology, topology_devices


def _names(value) -> tuple[str, ...]:
    """A tuple field given as ("a", "b") or, on the command line, as "a,b"."""
    return tuple(x.strip() for v in value for x in str(v).split(",") if x.strip())


def _check(config) -> None:
    c = config.compile
    c.programs, c.fit_remat = _names(c.programs), _names(c.fit_remat)
    if not c.topology:
        raise ConfigError(
            "--mode compile needs config.compile.topology, e.g. "
            "--config.compile.topology=v5p:4x4x2 (or v5e-256, v6e:16x16)"
        )
    unknown = [p for p in c.programs if p not in PROGRAMS]
    if unknown:
        raise ConfigError(
            f"config.compile.programs: unknown {unknown}; expected some of {PROGRAMS}"
        )
    bad = [r for r in c.fit_remat if r not in REMAT_POLICIES]
    if bad:
        raise ConfigError(
            f"config.compile.fit_remat: unknown {bad}; expected some of {tuple(REMAT_POLICIES)}"
        )


def output_name(topology: str, slices: int) -> str:
    """v5p:4x4x2, 2 slices -> "v5p-4x4x2x2slices" (a file name without a colon)."""
    name = parse_topology(topology).name.replace(":", "-")
    return name if slices == 1 else f"{name}x{slices}slices"


def compile_job(config, workdir: str) -> dict[str, Any]:
    """Compiles and reports (see the module docstring); returns what it writes."""
    _check(config)
    if latent_scale.is_auto(config):
        # One multiply in the step and the decoder: its value changes no memory, FLOP or
        # collective, so "auto" compiles with a stand-in and needs no dataset.
        config = latent_scale.with_scale(config, 1.0)
    topology = parse_topology(config.compile.topology)
    slices = int(config.compile.num_slices)
    devices = topology_devices(config.compile.topology, slices)
    chip = topology.chip
    header = dict(
        config=config.name,
        topology=topology.name,
        num_slices=slices,
        chips=len(devices),
        device_kind=devices[0].device_kind,
        chip=dataclasses.asdict(chip),
        jax=jax.__version__,
        note="compiler numbers and a roofline estimate, not measured runs",
    )
    t0 = time.perf_counter()
    if config.compile.fit:
        result = dict(header, **_fit(config, devices, chip))
    else:
        mesh = make_mesh(config.mesh, devices)
        header.update(mesh=dict(mesh.shape), remat=config.model.remat, dtype=config.model.dtype)
        rows = []
        for program in make_programs(config, mesh, tuple(config.compile.programs)):
            logging.info("compiling %s (batch %d) for %s", program.name, program.batch,
                         topology.name)  # fmt: skip
            rows.append(program_report(program, mesh, chip))
        result = dict(header, programs=rows)
        print(
            f"{config.name} on {topology.name} x {slices} slice(s) = {len(devices)} chips "
            f"({devices[0].device_kind}, {chip.hbm_bytes / 2**30:.1f} GiB HBM), mesh "
            f"{dict(mesh.shape)}, remat {config.model.remat}; compiler numbers and a roofline "
            "estimate, not a measured run"
        )
        print(format_table(rows, chip))
    result["wall_s"] = time.perf_counter() - t0
    out = epath.Path(workdir) / "compile" / f"{output_name(config.compile.topology, slices)}"
    if config.compile.fit:
        out = out.parent / f"{out.name}_fit"
    path = out.parent / f"{out.name}.json"
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=float))
        logging.info("wrote %s", os.fspath(path))
    return result


def _fit(config, devices: list, chip) -> dict[str, Any]:
    """`fit_search`, printing each compile as a line."""

    def log(row: dict[str, Any]) -> None:
        where = (
            f"remat={row['remat']:<5} mesh data={row['mesh']['data']} fsdp={row['mesh']['fsdp']}"
        )
        if "memory" not in row:
            print(
                f"  {where} batch {row['batch']}: does not fit ({row['error'][:120]})", flush=True
            )
            return
        peak, cap = row["memory"]["peak"] / 2**30, chip.hbm_bytes / 2**30
        verdict = "fits" if row["fits"] else "does not fit"
        print(
            f"  {where} batch {row['batch']}: {verdict}: needs {peak:.2f} GiB of {cap:.1f}; "
            f"roofline {row['roofline']['step_s'] * 1e3:.1f} ms "
            f"({row['compile_s']:.0f} s to compile)",
            flush=True,
        )

    remats = tuple(config.compile.fit_remat)
    print(
        f"fit search: {config.name}, train batch {config.train.batch_size}, "
        f"{len(devices)} chips in {num_slices(devices)} slice(s), remat {remats}"
    )
    result = fit_search(config, devices, chip, remats, log)
    best = result["best"]
    if best is None:
        print(f"no mesh and remat policy holds batch {config.train.batch_size}")
    else:
        rl = best["roofline"]
        print(
            f"best: remat={best['remat']} mesh data={best['mesh']['data']} "
            f"fsdp={best['mesh']['fsdp']}: {best['memory']['peak'] / 2**30:.2f} GiB per chip, "
            f"roofline {rl['step_s'] * 1e3:.1f} ms/step ({rl['bound'].removesuffix('_s')}-bound), "
            f"MFU ceiling {rl['mfu_ceiling']:.0%}"
        )
    for remat, b in result["largest_batch"].items():
        limit = result["predicted_limit"][remat]
        line = f", the line through its compiles predicts {limit}" if limit else ""
        print(f"largest global batch with remat={remat}: {b or 'none fits'}{line}")
    return result
