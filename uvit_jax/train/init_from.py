"""Fine-tuning: a new run's first weights from another run's (`config.train.init_from`).

Pure functions over parameter trees (an `nnx.State`, or any pytree whose leaves have `.shape`),
each parameter named by its path (`in_blocks/0/attn/qkv/kernel`, as `uvit_jax.convert.uvit`
names them). `plan_transfer` decides from the shapes and model fields alone what each parameter
of the new model starts from, and refuses every difference it cannot bridge, before any weight
is read; `transfer` applies the plan (traced once, inside the jitted state creation:
`uvit_jax.train.state.create_train_state`).

What may differ between the checkpoint's model and the new config's:
- the class count (`model.num_classes`): the label table `label_emb/embedding` [K, D] is
  re-initialised whole, as the new model initialises it (N(0, 1) from `config.seed`). The new
  classes are other classes (`config.data.classes` renumbers a subset from 0), so no row
  carries over; the null class is the new table's last row, as in every class model.
- the patch grid (`model.img_size / model.patch_size`): learned positions (`pos_embed`
  [1, E + n^2, D]: the E extra tokens (label, time) first, then the n x n patches in row-major
  order) are resized as ViT fine-tuning at another resolution does: the patch rows, reshaped to
  an n x n x D image, go through `jax.image.resize(..., "bicubic")` (Keys' cubic kernel,
  antialiased when the grid shrinks) to the new m x m grid; the E extra rows are kept as they
  are. Fixed 2D sinusoids (`model.pos_embed="sinusoidal_2d"`) are no parameter: the new model
  computes them for its grid, and nothing is loaded.
Every other difference is an error of one line: a parameter of another shape (width, depth,
patch size, channels, ...) names its path and both shapes; one that only one side has, its path
and shape; a field that changes the function but no shape (`model.num_heads`, `skip_fusion`
between its two D x D forms) names the field and both values. The objective
(`config.diffusion`) may change: that is the fine-tuning's business.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from uvit_jax.config_defaults import ARCHITECTURE_FIELDS, UViTConfig
from uvit_jax.errors import ConfigError

LOAD, REINIT, INTERPOLATE = "load", "reinit", "interpolate"
LABEL_TABLE = "label_emb/embedding"
POSITIONS = "pos_embed"
# The model fields whose change `plan_transfer` bridges (the label table, the positions).
RESHAPABLE = ("num_classes", "img_size")


def param_name(keypath: tuple) -> str:
    """A parameter's path in a tree (`jax.tree_util` keys) -> `in_blocks/0/attn/qkv/kernel`."""
    return "/".join(str(k.key) for k in keypath if isinstance(k, jax.tree_util.DictKey))


def by_name(tree: Any) -> dict[str, Any]:
    """{parameter path: leaf} of a parameter tree."""
    return {param_name(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def grid_side(model_config: Mapping) -> int:
    """The side n of a model's n x n patch grid (`img_size // patch_size`)."""
    return int(model_config["img_size"]) // int(model_config["patch_size"])


@dataclasses.dataclass(frozen=True)
class TransferPlan:
    """What each parameter of the new model starts from.

    actions: parameter path -> LOAD (the checkpoint's, as it is), REINIT (the new model's own
        initialisation) or INTERPOLATE (the checkpoint's positions on the new grid).
    changed: parameter path -> (checkpoint shape, new shape) of those not loaded as they are.
    extras: tokens before the patches (their position rows are kept as they are).
    source_side, side: the checkpoint's and the new model's patch grid sides.
    fixed_positions: the new model's positions are fixed sinusoids (no parameter).
    """

    actions: Mapping[str, str]
    changed: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]
    extras: int
    source_side: int
    side: int
    fixed_positions: bool

    def summary(self) -> str:
        """One line: how many parameters were loaded, which re-initialised, which resized."""

        def listed(action: str) -> str:
            names = [n for n, a in self.actions.items() if a == action]
            return ", ".join(
                f"{n} {list(self.changed[n][0])} -> {list(self.changed[n][1])}" for n in names
            )

        loaded = sum(a == LOAD for a in self.actions.values())
        parts = [f"loaded {loaded} of {len(self.actions)} parameters"]
        parts.append(f"re-initialised {listed(REINIT) or 'nothing'}")
        grid = f"{self.source_side}x{self.source_side} -> {self.side}x{self.side} patch grid"
        if INTERPOLATE in self.actions.values():
            parts.append(f"interpolated {listed(INTERPOLATE)} ({grid}, bicubic)")
        elif self.fixed_positions and self.source_side != self.side:
            parts.append(f"interpolated nothing (fixed 2D sinusoids recomputed: {grid})")
        else:
            parts.append("interpolated nothing")
        return "; ".join(parts)


def _regridded(
    have: tuple[int, ...], want: tuple[int, ...], source_side: int, side: int
) -> int | None:
    """The extra-token count E when `have` and `want` are [1, E + n^2, D] positions of the two
    grids (same E, same D, another side); else None."""
    if len(have) != 3 or have[0] != 1 or have[::2] != want[::2] or source_side == side:
        return None
    extras = have[1] - source_side**2
    return extras if extras >= 0 and want[1] - side**2 == extras else None


def plan_transfer(
    source: Any,
    target: Any,
    *,
    source_model: Mapping,
    target_model: Mapping,
    where: str = "the checkpoint",
) -> TransferPlan:
    """Decides what each parameter of `target` starts from (module docstring).

    Args:
      source, target: the checkpoint's and the new model's parameter trees; only the leaves'
        shapes are read (`jax.ShapeDtypeStruct`s will do).
      source_model, target_model: their `config.model` sections (the grids, the fields).
      where: how errors name the checkpoint (e.g. "config.train.init_from='w:500'").
    Raises:
      ConfigError: one line naming the first difference that cannot be bridged (a parameter's
        path and both shapes, or a field and both values) and how many more there are.
    """
    source_side, side = grid_side(source_model), grid_side(target_model)
    have = {n: tuple(x.shape) for n, x in by_name(source).items()}
    want = {n: tuple(x.shape) for n, x in by_name(target).items()}
    actions: dict[str, str] = {}
    changed: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    problems: list[str] = []
    extras = 0
    for name, shape in want.items():
        old = have.get(name)
        if old is None:
            problems.append(f"parameter {name} {list(shape)} of this config's model is not there")
            continue
        regrid = _regridded(old, shape, source_side, side) if name == POSITIONS else None
        if old == shape:
            actions[name] = LOAD
        elif name == LABEL_TABLE and old[1:] == shape[1:]:
            actions[name] = REINIT
        elif regrid is not None:
            actions[name], extras = INTERPOLATE, regrid
        else:
            problems.append(f"parameter {name} has shape {list(old)} there, {list(shape)} here")
            continue
        if actions[name] != LOAD:
            changed[name] = (old, shape)
    problems += [
        f"parameter {n} {list(s)} there has no place in this config's model"
        for n, s in have.items()
        if n not in want
    ]
    if not problems:
        defaults = UViTConfig.defaults()
        problems = [
            f"model.{f} is {a!r} there, {b!r} here"
            for f in ARCHITECTURE_FIELDS
            if f not in RESHAPABLE
            for a, b in [(source_model.get(f, defaults[f]), target_model.get(f, defaults[f]))]
            if a != b
        ]
    if problems:
        n = len(problems) - 1
        more = f" (and {n} more difference{'s' * (n > 1)})" if n else ""
        raise ConfigError(
            f"{where}: {problems[0]}{more}; only model.num_classes (the label table) and the "
            "patch grid (learned positions) may differ"
        )
    return TransferPlan(
        actions=actions,
        changed=changed,
        extras=extras,
        source_side=source_side,
        side=side,
        fixed_positions=POSITIONS not in want,
    )


def resize_positions(positions: jax.Array, extras: int, side: int) -> jax.Array:
    """Learned positions on another patch grid.

    Args:
      positions: [1, extras + n^2, D] float32, the extra tokens' rows first, then the n x n
        patches in row-major order.
      extras: the number of extra (label, time, context) tokens; their rows are kept.
      side: the new grid's side m.
    Returns:
      [1, extras + m^2, D] float32: the patch rows as an n x n x D image, bicubic-resized
      (`jax.image.resize`, antialiased when m < n) to m x m, after the extra rows unchanged.
    """
    _, tokens, dim = positions.shape
    n = math.isqrt(tokens - extras)
    grid = positions[0, extras:].reshape(n, n, dim)
    resized = jax.image.resize(grid, (side, side, dim), "bicubic").astype(positions.dtype)
    return jnp.concatenate([positions[:, :extras], resized.reshape(1, side * side, dim)], axis=1)


def transfer(plan: TransferPlan, source: Any, fresh: Any) -> Any:
    """The new model's first parameters: `fresh` (its own initialisation, a tree of arrays) with
    each leaf replaced as `plan` says by the checkpoint's (`source`), or resized from it."""
    loaded = by_name(source)

    def pick(keypath: tuple, leaf: jax.Array) -> jax.Array:
        name = param_name(keypath)
        action = plan.actions[name]
        if action == LOAD:
            return loaded[name]
        if action == INTERPOLATE:
            return resize_positions(loaded[name], plan.extras, plan.side)
        return leaf

    return jax.tree_util.tree_map_with_path(pick, fresh)
