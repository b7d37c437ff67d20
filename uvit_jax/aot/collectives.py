"""The collectives of a compiled program, read from its optimized HLO text.

    ops = collectives(compiled.as_text(), mesh)
    # [Collective(kind="all-gather", axes=("fsdp",), bytes_moved=..., dcn=False, count=...)]

Every all-gather, all-reduce, reduce-scatter, all-to-all and collective-permute (their async
`-start` halves included, `-done` skipped) is matched to the mesh axes its replica groups span
(the partition ids of an SPMD program index `mesh.devices.flat`). A collective inside a while
loop whose condition compares the counter with a constant counts that many times. Each op
keeps the JAX operation it came from (`source`, e.g. "transpose(jvp())/dot_general": a weight
gradient), which tells, say, the gradient reduce-scatter that the TPU compiler splits into
rings of collective-permutes inside the weight-gradient matmul ("windowed einsum") from the
parameter gathers of the forward pass.

Across TPU slices the compiler emits no collective: the DCN part of a reduction is a host
transfer (`send` with a `_xla_megascale_transfer_type`), counted here as that collective
(kind from the transfer type, axes "slices", `dcn` True, one group of all slices).

Bytes moved are per device, per execution, for ring algorithms over a group of n devices:
all-gather and all-to-all receive (n - 1) / n of their output, reduce-scatter sends
(n - 1) / n of its input, all-reduce 2 (n - 1) / n of its operand (a reduce-scatter then an
all-gather); a collective-permute sends its operand once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

import numpy as np
from jax.sharding import Mesh

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}  # fmt: skip
_OP = re.compile(
    r"^\s*(?:ROOT )?%?[\w.\-]+ = (?P<shape>.+?) (?P<kind>" + "|".join(KINDS) + r")(?:-start)?\("
)
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_MEGASCALE = re.compile(
    r"^\s*%?[\w.\-]+ = \((?P<shape>\w+\[[\d,]*\])\S*, .*\bsend\(.*"
    r'_xla_megascale_transfer_type="(?P<type>\w+)"'
)
_SOURCE = re.compile(r'op_name="(?:jit\([^)]*\)/)?([^"]*)"')
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?(?P<name>[\w.\-]+) [(].*[{]\s*$")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op: kind, the mesh axes its groups span, group size, whether a group
    crosses TPU slices (DCN), executions per program run, bytes per device per execution."""

    kind: str
    axes: tuple[str, ...]
    group_size: int
    dcn: bool
    count: int
    bytes_moved: float
    result_bytes: int
    source: str = ""


def _array_bytes(text: str) -> int:
    """Bytes of the arrays in an HLO shape string (a tuple adds its elements)."""
    return sum(
        _BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
        for dt, dims in _ARRAY.findall(text)
    )


def _groups(line: str, num_devices: int) -> np.ndarray | None:
    """The replica groups of a collective as [groups, size] partition ids (None: none given)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
    if m:  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: groups along the named axes of an iota
        dims = [(n.strip("'"), int(v)) for n, v in (a.split("=") for a in m.group(1).split(","))]
        along = [a.strip().strip("'") for a in m.group(2).split(",") if a.strip()]
        names = [n for n, _ in dims]
        ids = np.arange(math.prod(v for _, v in dims)).reshape([v for _, v in dims])
        order = [i for i, n in enumerate(names) if n not in along] + [names.index(a) for a in along]
        size = math.prod(dict(dims)[a] for a in along)
        return ids.transpose(order).reshape(-1, size)
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:  # iota form [G,S]<=[dims]T(perm)
        dims = [int(d) for d in m.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(p) for p in m.group(4).split(",")])
        return ids.reshape(int(m.group(1)), int(m.group(2)))
    m = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
    if m:
        groups = [
            [int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d,]*)\}", m.group(1))
        ]
        if groups and all(groups) and len({len(g) for g in groups}) == 1:
            return np.array(groups)
    if re.search(r"source_target_pairs=", line):
        return None
    return np.arange(num_devices)[None]  # no groups: every device


def _axes(groups: np.ndarray, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes along which the members of the first group differ."""
    coords = np.array(np.unravel_index(groups[0], mesh.devices.shape)).T
    return tuple(n for i, n in enumerate(mesh.axis_names) if len(set(coords[:, i])) > 1)


def _crosses_slices(groups: np.ndarray, mesh: Mesh) -> bool:
    flat = mesh.devices.flat
    return any(len({getattr(flat[i], "slice_index", 0) for i in g}) > 1 for g in groups)


def _trip_counts(hlo: str) -> dict[str, int]:
    """computation name -> how many times one program run executes it (1 where unknown)."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group("name")
            bodies[current] = []
        elif current is not None:
            bodies[current].append(line)
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, lines in bodies.items():
        for line in lines:
            w = re.search(r" while\(.*condition=%?([\w.\-]+), body=%?([\w.\-]+)", line)
            if w:
                limit = _loop_limit(bodies.get(w.group(1), []))
                calls[name] += [(w.group(1), limit + 1), (w.group(2), limit)]
                continue
            for callee in re.findall(
                r"(?:to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)", line
            ):
                calls[name].append((callee, 1))
            for branches in re.findall(r"branch_computations=\{([^}]*)\}", line):
                calls[name] += [(b.strip().lstrip("%"), 1) for b in branches.split(",")]
    entry = next((m.group(1) for m in re.finditer(r"^ENTRY %?([\w.\-]+)", hlo, re.M)), None)
    counts: dict[str, int] = defaultdict(int)

    def visit(name: str, times: int) -> None:
        counts[name] += times
        for callee, k in calls.get(name, []):
            visit(callee, times * k)

    if entry is not None:
        visit(entry, 1)
    return counts


def _loop_limit(condition: list[str]) -> int:
    """A loop's trip count from its condition `counter < constant` (1 where not of that form)."""
    text = "\n".join(condition)
    const = re.findall(r"constant\((\d+)\)", text)
    if len(const) == 1 and "direction=LT" in text:
        return int(const[0])
    return 1


def _moved(kind: str, result: float, n: int) -> float:
    """Bytes one device moves in a ring collective over n devices (module docstring)."""
    frac = (n - 1) / n if n > 1 else 0.0
    return {
        "all-gather": result * frac,
        "all-to-all": result * frac,
        "reduce-scatter": result * n * frac,
        "all-reduce": 2 * result * frac,
        "collective-permute": float(result),
    }[kind]


def collectives(hlo: str, mesh: Mesh) -> list[Collective]:
    """Every collective of an optimized SPMD program over `mesh` (see the module docstring)."""
    counts = _trip_counts(hlo)
    slices = len({getattr(d, "slice_index", 0) for d in mesh.devices.flat})
    out = []
    current = None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group("name")
            continue
        src = _SOURCE.search(line)
        source = src.group(1) if src else ""
        times = max(counts.get(current, 1), 1)
        dcn_op = _MEGASCALE.match(line)
        if dcn_op is not None:
            kind = dcn_op.group("type").lower().replace("_", "-")
            size = _array_bytes(dcn_op.group("shape"))
            moved = _moved(kind, size, slices) if kind in KINDS else float(size)
            out.append(Collective(kind, ("slices",), slices, True, times, moved, size, source))
            continue
        op = _OP.match(line)
        if op is None:
            continue
        kind = op.group("kind")
        groups = _groups(line, mesh.devices.size)
        result = _array_bytes(op.group("shape"))
        operand = _array_bytes(line[op.end() : line.find(")", op.end())])
        if groups is None:  # collective-permute: pairs, not groups
            axes, n, dcn = ("pairs",), 2, False
        else:
            axes, n, dcn = _axes(groups, mesh), groups.shape[1], _crosses_slices(groups, mesh)
        if op.group(0).rstrip("(").endswith("-start") and kind != "collective-permute":
            # async start: the result tuple holds (operand, result); count the result only.
            result = max(result - operand, 0) if operand else result
        out.append(Collective(kind, axes, n, dcn, times, _moved(kind, result, n), result, source))
    return out


def summarize(ops: list[Collective]) -> list[dict]:
    """Rows per (kind, axes, dcn, source): ops (static), executions, bytes per device per
    program run; the largest first."""
    rows: dict[tuple, dict] = {}
    for c in ops:
        row = rows.setdefault(
            (c.kind, c.axes, c.dcn, c.source),
            dict(
                kind=c.kind,
                axes="+".join(c.axes) or "-",
                dcn=c.dcn,
                source=c.source,
                ops=0,
                executions=0,
                bytes=0.0,
            ),  # fmt: skip
        )
        row["ops"] += 1
        row["executions"] += c.count
        row["bytes"] += c.count * c.bytes_moved
    return sorted(rows.values(), key=lambda r: -r["bytes"])
