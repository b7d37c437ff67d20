"""Compile-only devices for any TPU slice shape (the TPU compiler, `libtpu`) or H100s (the CUDA
plugin, `parallel.gpu_target`), on any x86 host without them.

    devices = topology_devices("v5p:4x4x2")               # 32 chips, nothing to run on
    devices = topology_devices("v5e-256", num_slices=2)   # 2 x 256 chips, `slice_index` 0 / 1

With `libtpu` installed (`pip install "jax[tpu]==<jax version>"`) and the CPU as JAX's platform,
`jax.experimental.topologies` returns devices that programs can be lowered and compiled for (the
real TPU compiler, its memory assignment and collectives), but never run on. Names take two
forms: `<chip>:<shape>` (the chips along each torus axis: `v5e:16x16`, `v5p:4x4x8`) or the
accelerator-type form `<chip>-<n>` (`v5e-256`, `v6e-256`: chips; `v5p-128`, `v4-32`: TensorCores,
two per chip), mapped to the standard slice shapes below. `h100` is one H100 SXM, `h100-8` the
eight of one host (NVLink); their compiled programs carry memory but no FLOP counts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from uvit_jax.errors import ConfigError
from uvit_jax.parallel.chips import CHIPS, Chip

# Chips -> the standard slice shape (2-D torus chips; 3-D for v4 / v5p).
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}  # fmt: skip
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16), 4096: (16, 16, 16)}  # fmt: skip
# chip -> (torus dimensions, TensorCores counted per chip in the `<chip>-<n>` form)
_FORMS = {"v5e": (2, 1), "v6e": (2, 1), "v5p": (3, 2), "v4": (3, 2)}

KNOWN_FORMS = (
    "h100 / h100-N (N GPUs of one host, up to 8), v5e:AxB / v6e:AxB (A, B powers of 2, up "
    "to 16x16), v5p:AxBxC / v4:AxBxC, or the "
    f"accelerator types v5e-N / v6e-N (N chips: {sorted(_SHAPES_2D)}), v5p-N / v4-N "
    f"(N TensorCores = 2 x chips: {sorted(2 * n for n in _SHAPES_3D)})"
)


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: its chip and the chips along each torus axis."""

    chip: Chip
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        """The `<chip>:<shape>` form, e.g. "v5p:4x4x2" (GPUs: "h100-8")."""
        if self.is_gpu:
            return f"{self.chip.name}-{self.shape[0]}"
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def is_gpu(self) -> bool:
        return self.chip.name not in _FORMS

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)


def parse_topology(name: str, *, field: str = "config.compile.topology") -> Topology:
    """ "v5p:4x4x2" or "v5p-64" -> Topology; a name of neither form lists the known ones."""
    bad = ConfigError(f"{field}={name!r}: unknown topology; expected {KNOWN_FORMS}")
    gpu = re.fullmatch(r"h100(?:-(\d+))?", name.strip())
    if gpu is not None:
        n = int(gpu.group(1) or 1)
        if not 1 <= n <= 8:
            raise bad
        return Topology(CHIPS["h100"], (n,))
    m = re.fullmatch(r"(v\d+[a-z]?)(?::(\d+(?:x\d+)*)|-(\d+))", name.strip())
    if m is None or m.group(1) not in _FORMS:
        raise bad
    chip, (ndim, cores_per_chip) = m.group(1), _FORMS[m.group(1)]
    if m.group(2) is not None:
        shape = tuple(int(s) for s in m.group(2).split("x"))
        if len(shape) != ndim or min(shape) < 1:
            raise bad
    else:
        cores = int(m.group(3))
        shapes = _SHAPES_2D if ndim == 2 else _SHAPES_3D
        if cores % cores_per_chip or cores // cores_per_chip not in shapes:
            raise bad
        shape = shapes[cores // cores_per_chip]
    return Topology(CHIPS[chip], shape)


def accelerator_type(topology: Topology) -> str:
    """Cloud TPU's name of a slice: v5litepod-16, v6e-16 (chips), v5p-32, v4-32 (TensorCores)."""
    _, cores_per_chip = _FORMS[topology.chip.name]
    prefix = "v5litepod" if topology.chip.name == "v5e" else topology.chip.name
    return f"{prefix}-{cores_per_chip * topology.num_chips}"


def check_compiler(topology: Topology) -> None:
    """Raises ConfigError with the pip command when the topology's compiler is not installed
    (libtpu for TPUs, the CUDA 12 plugin for GPUs)."""
    import jax

    if topology.is_gpu:
        plugins = importlib.util.find_spec("jax_plugins")
        found = plugins is not None and any(
            importlib.util.find_spec(f"jax_plugins.{m}") for m in ("xla_cuda12", "xla_cuda13")
        )
        if not found:
            raise ConfigError(
                f"compiling for {topology.name} needs JAX's CUDA plugin, which is not "
                f'installed: pip install "jax[cuda12]=={jax.__version__}" (no GPU needed)'
            )
    elif importlib.util.find_spec("libtpu") is None:
        raise ConfigError(
            "compiling for a TPU topology needs the TPU compiler (libtpu), which is not "
            f'installed: pip install "jax[tpu]=={jax.__version__}"'
        )


def topology_devices(name: str, num_slices: int = 1) -> list:
    """Compile-only devices of `num_slices` slices of topology `name` (every chip of every slice;
    multi-slice devices carry `slice_index`). Call with JAX's platform set to the CPU
    (`jax_platforms="cpu"`), before anything else asks for TPU devices.

    Raises:
      ConfigError: unknown name, libtpu missing, or a shape the TPU runtime refuses.
    """
    topology = parse_topology(name)
    if num_slices < 1:
        raise ConfigError(f"config.compile.num_slices={num_slices}: expected an integer >= 1")
    check_compiler(topology)
    if topology.is_gpu:
        return _gpu_devices(topology, num_slices)
    # No metadata server to ask: the slice is described by its name alone. No TPU to guard
    # either: other processes (a training job, a second compile) may load libtpu beside this.
    # Naming the host and slice keeps libtpu from printing its start-up complaints (it reads
    # them when it first loads; the compiled topology is the one passed below either way).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(topology))
    import jax
    from jax.experimental import topologies

    kwargs = dict(topology_name=topology.name, platform="tpu")
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    host = (2, 2, 1)  # chips per host: a TPU VM holds 2 x 2 (x 1) chips, or the whole slice
    shape = (*topology.shape, 1)[:3]
    if any(d < h for d, h in zip(shape, host, strict=True)):
        kwargs["chips_per_host_bounds"] = tuple(min(d, h) for d, h in zip(shape, host, strict=True))
    if topology.chip.name == "v4":
        kwargs["chip_config_name"] = "megacore"  # one device per chip, as v5p
    try:
        return list(topologies.get_topology_desc(**kwargs).devices)
    except jax.errors.JaxRuntimeError as e:
        reason = str(e).splitlines()[0]
        raise ConfigError(
            f"config.compile.topology={name!r}: the TPU runtime refuses it: {reason}"
        ) from None


def _gpu_devices(topology: Topology, num_hosts: int) -> list:
    """Compile-only H100s: `num_hosts` hosts of `topology.shape[0]` GPUs each."""
    import jax
    from jax.experimental import topologies

    from uvit_jax.parallel.gpu_target import h100_target_config

    try:
        return list(
            topologies.get_topology_desc(
                platform="cuda",
                topology=f"1x{num_hosts}x{topology.shape[0]}",
                target_config=h100_target_config(),
            ).devices
        )
    except (jax.errors.JaxRuntimeError, NotImplementedError) as e:
        reason = str(e).splitlines()[0]
        raise ConfigError(
            f"config.compile.topology={topology.name!r}: the CUDA plugin refuses it: {reason}"
        ) from None
