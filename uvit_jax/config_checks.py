"""What every config field allows, checked once by `jobs.run` before a job compiles or reads.

`FIELD_CHECKS` holds one check per field of the schema (`config_defaults.default_config`): the
range of every number (and that it is finite), the names a name field may take. A field the
schema adds gets its line here (tests/test_faults_config.py fails for a number without one).
Names whose registry lives in a higher layer (the samplers, the diffusion formulations, ...)
come from the caller (`jobs.registry_choices`), so this module imports nothing of uvit_jax but
the schema and the errors. `config.model` is checked by `UViTConfig` itself (choices, divisors)
after its numbers here.

A failure is a `ConfigError` of one line: the field, its value and what is allowed, e.g.
`config.train.ema_rate=1.5: expected a finite number in [0, 1)`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Collection, Mapping
from typing import Any

from input_pipeline.latent_stats import AUTO_SCALE
from uvit_jax.config_defaults import UViTConfig
from uvit_jax.errors import ConfigError


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Int:
    """An integer >= lo (and <= hi); `also` lists further values allowed (e.g. -1: fill)."""

    lo: int | None = None
    hi: int | None = None
    also: tuple[int, ...] = ()

    def __call__(self, value: Any) -> str | None:
        ok = _is_int(value) and (
            value in self.also
            or ((self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi))
        )
        if ok:
            return None
        what = "an integer"
        if self.lo is not None and self.hi is not None:
            what += f" in [{self.lo}, {self.hi}]"
        elif self.lo is not None:
            what += f" >= {self.lo}"
        elif self.hi is not None:
            what += f" <= {self.hi}"
        return what + "".join(f" or {v}" for v in self.also)


@dataclasses.dataclass(frozen=True)
class Real:
    """A finite number in the interval; `lo_open` / `hi_open` leave out the ends; `also` lists
    names allowed besides (e.g. "auto")."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple[str, ...] = ()

    def __call__(self, value: Any) -> str | None:
        if isinstance(value, str) and value in self.also:
            return None
        what = self._range(value)
        if what is None:
            return None
        return what + "".join(f" or {v!r}" for v in self.also)

    def _range(self, value: Any) -> str | None:
        ok = _is_real(value) and math.isfinite(value)
        if ok and self.lo is not None:
            ok = value > self.lo if self.lo_open else value >= self.lo
        if ok and self.hi is not None:
            ok = value < self.hi if self.hi_open else value <= self.hi
        if ok:
            return None
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"a finite number in {left}{self.lo:g}, {self.hi:g}{right}"
        if self.lo is not None:
            return f"a finite number {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"a finite number {'<' if self.hi_open else '<='} {self.hi:g}"
        return "a finite number"


@dataclasses.dataclass(frozen=True)
class OneOf:
    """One of `choices`; with `registry` set, the caller's names for that field are used."""

    choices: tuple[str, ...] = ()
    registry: bool = False

    def allowed(self, choices: Collection[str] | None) -> tuple[str, ...]:
        return tuple(choices) if self.registry and choices is not None else self.choices

    def __call__(self, value: Any, choices: Collection[str] | None = None) -> str | None:
        allowed = self.allowed(choices)
        if not allowed or value in allowed:  # a registry the caller did not give: unchecked
            return None
        return "one of " + ", ".join(repr(c) for c in allowed)


@dataclasses.dataclass(frozen=True)
class Each:
    """A list (tuple) whose every element passes `check`."""

    check: Int | Real | OneOf

    def __call__(self, value: Any, choices: Collection[str] | None = None) -> str | None:
        if not isinstance(value, (tuple, list)):
            return "a list"
        for v in value:
            args = (v, choices) if isinstance(self.check, OneOf) else (v,)
            what = self.check(*args)
            if what is not None:
                return f"a list of {what} (element {v!r} is not)"
        return None


COUNT, NONNEG, PROBABILITY = Int(1), Int(0), Real(0, 1)

# The widest power-function EMA's relative std: exponent 0, the plain average over the run
# (uvit_jax/train/power_ema.py). EMA_STD: a power-function EMA's; SAMPLE_EMA_STD: 0 is the
# classic EMA.
MAX_EMA_STD = 12**-0.5
EMA_STD, SAMPLE_EMA_STD = Real(0, MAX_EMA_STD, lo_open=True), Real(0, MAX_EMA_STD)

# field under `config` -> its check. Numbers: every one of the schema's; names: those whose
# values are known (OneOf(registry=True): the caller gives them, see `check_config`).
FIELD_CHECKS: dict[str, Int | Real | OneOf | Each] = {
    "seed": Int(),
    # ---- model (its names and divisors: UViTConfig) ----
    "model.img_size": COUNT,
    "model.patch_size": COUNT,
    "model.in_chans": COUNT,
    "model.embed_dim": COUNT,
    "model.depth": COUNT,
    "model.num_heads": COUNT,
    "model.mlp_ratio": Real(0, lo_open=True),
    "model.num_classes": Int(1, also=(-1,)),
    "model.clip_dim": COUNT,
    "model.num_clip_token": COUNT,
    # ---- diffusion ----
    "diffusion.formulation": OneOf(registry=True),
    "diffusion.target": OneOf(registry=True),
    "diffusion.time_sampling": OneOf(registry=True),
    "diffusion.time_mean": Real(),
    "diffusion.time_std": Real(0, lo_open=True),
    "diffusion.time_shift": Real(0, lo_open=True),
    "diffusion.p_uncond": PROBABILITY,
    "diffusion.loss_weighting": OneOf(registry=True),
    "diffusion.min_snr_gamma": Real(0, lo_open=True),
    # ---- autoencoder ----
    "autoencoder.kind": OneOf(("identity", "kl_f8")),
    "autoencoder.scale_factor": Real(0, lo_open=True, also=(AUTO_SCALE,)),
    "autoencoder.embed_dim": NONNEG,
    # ---- data ----
    "data.resolution": COUNT,
    "data.num_workers": NONNEG,
    "data.prefetch": NONNEG,
    "data.read_threads": COUNT,
    "data.max_examples": NONNEG,
    "data.extract_shard_size": COUNT,
    "data.extract_batch_size": COUNT,
    "data.classes": Each(NONNEG),
    # ---- text encoder ----
    "text_encoder.batch_size": COUNT,
    # ---- optim ----
    "optim.name": OneOf(registry=True),
    "optim.lr": Real(0, lo_open=True),
    "optim.b1": Real(0, 1, hi_open=True),
    "optim.b2": Real(0, 1, hi_open=True),
    "optim.eps": Real(0),
    "optim.weight_decay": Real(0),
    "optim.decay_mask": OneOf(("all", "no_bias_norm")),
    "optim.warmup_steps": NONNEG,
    "optim.schedule": OneOf(registry=True),
    "optim.grad_clip": Real(0),
    "optim.muon_momentum": Real(0, 1, hi_open=True),
    "optim.muon_rms": Real(0, lo_open=True),
    # ---- train ----
    "train.batch_size": COUNT,
    "train.accum_steps": COUNT,
    "train.micro_batch_per_device": NONNEG,
    "train.num_steps": COUNT,
    "train.ema_rate": Real(0, 1, hi_open=True),
    "train.ema_stds": Each(EMA_STD),
    "train.ema_snapshot_every": NONNEG,  # >= 1 with ema_stds (jobs/train.py's check)
    "train.ema_snapshot_keep": NONNEG,  # 0: all
    "train.log_every": COUNT,
    "train.ckpt_every": COUNT,
    "train.keep_ckpts": COUNT,
    "train.on_nonfinite": OneOf(("stop", "skip")),
    # ---- mesh ----
    "mesh.data": Int(1, also=(-1,)),
    "mesh.fsdp": Int(1, also=(-1,)),
    # ---- sample ----
    "sample.sampler": OneOf(registry=True),
    "sample.steps": COUNT,
    "sample.grid": OneOf(registry=True),
    "sample.cfg_scale": Real(0),
    "sample.cfg_interval": Each(Real(0)),
    "sample.cfg_schedule": OneOf(registry=True),
    "sample.guidance": OneOf(registry=True),
    "sample.num_samples": COUNT,
    "sample.batch_size": COUNT,
    "sample.ema_std": SAMPLE_EMA_STD,
    # ---- eval ----
    "eval.num_samples": COUNT,
    "eval.batch_size": COUNT,
    "eval.protocol": OneOf(registry=True),
    "eval.train_num_samples": NONNEG,  # 0 where training has no FID
    "eval.min_samples": NONNEG,
    "eval.nearest_k": COUNT,
    "eval.kid_subsets": NONNEG,
    "eval.kid_subset_size": COUNT,
    "eval.ref_num_images": NONNEG,
    # ---- sweep: each value as for config.sample ----
    "sweep.samplers": Each(OneOf(registry=True)),
    "sweep.steps": Each(COUNT),
    "sweep.cfg_scales": Each(Real(0)),
    "sweep.cfg_schedules": Each(OneOf(registry=True)),
    "sweep.grids": Each(OneOf(registry=True)),
    "sweep.guidances": Each(OneOf(registry=True)),
    "sweep.ema_stds": Each(SAMPLE_EMA_STD),
    # ---- posthoc ----
    "posthoc.stds": Each(EMA_STD),
    "posthoc.step": NONNEG,
    "posthoc.max_residual": Real(0, lo_open=True),
    # ---- ablate, compile, logging ----
    "ablate.seeds": Each(Int()),
    "ablate.eval_every": NONNEG,
    "compile.num_slices": COUNT,
    # train/wandb_writer.py's MODES (that module loads TensorFlow: not imported here)
    "logging.wandb.mode": OneOf(("online", "offline", "disabled")),
}

# A registry-backed list field takes the names of its single-valued field.
_REGISTRY_OF = {
    "sweep.samplers": "sample.sampler",
    "sweep.cfg_schedules": "sample.cfg_schedule",
    "sweep.grids": "sample.grid",
    "sweep.guidances": "sample.guidance",
}

_MISSING = object()


def _get(config: Any, field: str) -> Any:
    node = config
    for key in field.split("."):
        if not hasattr(node, "get"):
            return _MISSING
        node = node.get(key, _MISSING)
        if node is _MISSING:
            return _MISSING
    return node


def check_config(config: Any, choices: Mapping[str, Collection[str]] | None = None) -> None:
    """Raises ConfigError (one line: field, value, what is allowed) for the first field of
    `config` that fails its `FIELD_CHECKS` line, then checks `config.model` with `UViTConfig`.

    `choices` maps a `OneOf(registry=True)` field to its registry's names (see
    `jobs.registry_choices`); a field absent from `config` (a config saved by an older
    version) is not checked.
    """
    choices = dict(choices or {})
    for field, check in FIELD_CHECKS.items():
        value = _get(config, field)
        if value is _MISSING:
            continue
        if isinstance(check, (OneOf, Each)):
            what = check(value, choices.get(_REGISTRY_OF.get(field, field)))
        else:
            what = check(value)
        if what is not None:
            raise ConfigError(f"config.{field}={value!r}: expected {what}")
    model = _get(config, "model")
    if model is not _MISSING:
        UViTConfig.from_config(model)
