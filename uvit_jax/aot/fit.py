"""Fit search: which mesh shape and remat policy hold a config's train step on a slice, with the
best roofline time, and the largest global batch each remat policy holds.

Every answer comes from a real compile (`report.program_report`); an out-of-memory compile is a
row ("does not fit"), never a crash. To keep the compiles few (a U-ViT-H/2 step takes minutes
on a 2-core host):
- meshes: fsdp = 1, 2, 4, ... up to the chips of one slice (data takes the rest). The first
  remat policy walks up to the first fsdp size that fits, then also compiles full sharding
  (fewer bytes of optimizer update per chip, more gathers: the roofline decides); the other
  policies compile full sharding only (the roofline compares every fitting row);
- largest batch: on the fully sharded mesh, the per-chip peak is about a line in the batch
  (the state fixed, the activations in proportion): the batch it predicts for the chip's HBM
  (a multiple of the chips) is compiled, and if it does not fit, the batch the line through
  the two compiles predicts (`MAX_TRIES` compiles at most). The answer is the largest batch
  that compiled to fit, with the limit the line predicts beside it (not compiled).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from uvit_jax.aot.programs import make_programs
from uvit_jax.aot.report import program_report
from uvit_jax.parallel.chips import Chip
from uvit_jax.parallel.mesh import make_mesh, num_slices

MAX_TRIES = 2


def fsdp_sizes(devices: list) -> list[int]:
    """1, 2, 4, ... up to the devices of one slice (FSDP stays on a slice's ICI)."""
    per_slice = len(devices) // num_slices(devices)
    sizes, f = [], 1
    while f <= per_slice:
        if per_slice % f == 0:
            sizes.append(f)
        f *= 2
    return sizes


def _variant(config, remat: str, fsdp: int, batch: int, chips: int):
    c = config.copy_and_resolve_references()
    c.model.remat = remat
    c.mesh.update(data=chips // fsdp, fsdp=fsdp)
    c.train.batch_size = batch
    return c


def fit_search(
    config,
    devices: list,
    chip: Chip,
    remats: tuple[str, ...],
    log: Callable[[dict[str, Any]], None] = lambda row: None,
) -> dict[str, Any]:
    """Searches as the module docstring says; returns {"rows": every compile, "best": the
    fitting (remat, mesh) at the config's batch with the least roofline time or None,
    "largest_batch": {remat: the largest batch compiled to fit, or None},
    "predicted_limit": {remat: where the line through its compiles reaches the HBM, or None}}.
    `log` sees each row as it is compiled."""
    chips = len(devices)
    batch = int(config.train.batch_size)
    rows: list[dict[str, Any]] = []

    def compile_row(remat: str, fsdp: int, b: int) -> dict[str, Any]:
        c = _variant(config, remat, fsdp, b, chips)
        mesh = make_mesh(c.mesh, devices)
        (program,) = make_programs(c, mesh, ("train_step",))
        row = program_report(program, mesh, chip)
        row.update(remat=remat, mesh=dict(data=chips // fsdp, fsdp=fsdp))
        rows.append(row)
        log(row)
        return row

    fitting: dict[str, dict[str, Any]] = {}  # per remat: the fully sharded mesh, if it fits
    candidates = []  # every fitting (remat, mesh) at the config's batch
    sizes = fsdp_sizes(devices)
    for i, remat in enumerate(remats):
        # The first policy walks up the fsdp sizes to the first that fits; the others, which
        # trade compute for memory, compile the most memory-frugal mesh only (where they are
        # wanted, and where the largest batch is searched). Every fitting row competes for
        # the best roofline: remat also cuts the bytes an HBM-bound step moves.
        for fsdp in sizes if i == 0 else sizes[-1:]:
            row = compile_row(remat, fsdp, batch)
            if row["fits"]:
                candidates.append(row)
                break
        if sizes[-1] != row["mesh"]["fsdp"]:  # full sharding: less optimizer traffic per chip
            row = compile_row(remat, sizes[-1], batch)
            candidates += [row] if row["fits"] else []
        if row["fits"]:
            fitting[remat] = row
    best = min(candidates, key=lambda r: r["roofline"]["step_s"], default=None)

    largest: dict[str, int | None] = {}
    limits: dict[str, int | None] = {}
    for remat in remats:
        if remat not in fitting or chip.hbm_bytes is None:
            largest[remat] = limits[remat] = None
            continue
        largest[remat], limits[remat] = _largest_batch(
            compile_row, fitting[remat], chip.hbm_bytes, chips
        )
    return dict(rows=rows, best=best, largest_batch=largest, predicted_limit=limits)


def _predict(rows: list[dict[str, Any]], hbm: float, granule: int) -> int | None:
    """The batch at which the per-chip peak reaches `hbm`: a line through the two largest
    compiled batches, or with one, temporaries in proportion to the batch (the arguments fixed).
    None where the line does not rise (micro-batches: `train.micro_batch_per_device` keeps a
    pass's activations at one size whatever the batch)."""
    fitted = sorted((r for r in rows if "memory" in r), key=lambda r: r["batch"])[-2:]
    last = fitted[-1]
    if len(fitted) == 2 and fitted[1]["batch"] > fitted[0]["batch"]:
        (b0, p0), (b1, p1) = ((r["batch"], r["memory"]["peak"]) for r in fitted)
        slope = (p1 - p0) / (b1 - b0)
        if slope <= 0:
            return None
        fixed = p1 - slope * b1
    else:
        slope = last["memory"]["temporaries"] / last["batch"]
        fixed = last["memory"]["peak"] - last["memory"]["temporaries"]
    return int((hbm - fixed) / max(slope, 1.0)) // granule * granule


def _largest_batch(compile_row, first: dict[str, Any], hbm: float, granule: int) -> tuple[int, int]:
    """(the largest global batch, a multiple of `granule`, that compiled to fit on `first`'s
    mesh and remat; the batch the line through the compiles predicts as the limit).

    The first guess assumes the temporaries grow in proportion to the batch, which overstates
    their growth (part of them does not depend on the batch), so it tends to fit; a guess that
    does not fit is followed by one from the line through the two largest compiles, at most
    `MAX_TRIES` compiles in all."""
    remat, fsdp = first["remat"], first["mesh"]["fsdp"]
    rows, best = [first], first["batch"]
    refused = None  # the smallest batch that did not fit
    for _ in range(MAX_TRIES):
        guess = _predict(rows, hbm, granule)
        if guess is None:
            break
        if refused is not None:
            guess = min(guess, refused - granule)
        if guess <= best or any(r["batch"] == guess for r in rows):
            break
        row = compile_row(remat, fsdp, guess)
        if "memory" in row:  # a compile the compiler itself refused has no peak for the line
            rows.append(row)
        logging.info("remat=%s: batch %d %s", remat, guess, "fits" if row["fits"] else "does not")
        if row["fits"]:
            best = guess
            break
        refused = guess if refused is None else min(refused, guess)
    limit = _predict(rows, hbm, granule) if len(rows) > 1 else None
    if refused is not None and limit is not None:
        limit = min(limit, refused - granule)
    return best, limit
