"""The notebook API: load a checkpoint, sample, decode and look, in three lines.

    import uvit_jax
    m = uvit_jax.load("workdirs/fashion_mnist")        # EMA weights of the latest step
    plt.imshow(uvit_jax.grid(uvit_jax.sample(m, labels=range(10))))

`load` reads only the `ema` (or `state`) item and the saved config of a checkpoint written by
training or by `--mode convert`: no optimizer, no data pipeline, no trainer. It restores onto the
devices at hand, whatever topology wrote the checkpoint: one device by default, or a ("data",
"fsdp") mesh with the training FSDP layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from uvit_jax import checkpoints
from uvit_jax import images as image_utils
from uvit_jax.checkpoints import CheckpointError
from uvit_jax.config_defaults import default_config
from uvit_jax.errors import ConfigError
from uvit_jax.latent_codec import autoencoder_from_config
from uvit_jax.models.uvit import abstract_uvit
from uvit_jax.parallel.mesh import batch_sharding, state_shardings
from uvit_jax.sampling.generate import (
    check_guide,
    guidance_from_config,
    guide_checkpoint_of,
    sample_images,
)
from uvit_jax.sampling.prompts import prompt_conditions

__all__ = ["CheckpointError", "Loaded", "decode", "grid", "load", "load_guide", "sample"]


@dataclasses.dataclass(repr=False)
class Loaded:
    """A restored U-ViT and what it needs to sample.

    model: the `nnx` module with the weights merged in: `model(x, t, y=..., context=...)`.
    graphdef, params: the same model split for pure functions (`nnx.merge(graphdef, params)`);
        params are float32 arrays on the devices `load` was given.
    config: the resolved run config (an `ml_collections.ConfigDict`) saved with the checkpoint.
    step: the checkpoint's training step (0 for a converted official checkpoint).
    path: the checkpoint folder (`<workdir>/checkpoints/<step>`).
    ema: whether params are the EMA weights (True) or the raw training weights.
    mesh: the mesh the params are laid out on, None for one device.
    ema_std: 0 for the classic EMA (or raw weights); the relative std of a post-hoc EMA
        (`--mode posthoc_ema`) otherwise.
    """

    model: nnx.Module
    graphdef: nnx.GraphDef
    params: nnx.State
    config: ml_collections.ConfigDict
    step: int
    path: str
    ema: bool = True
    mesh: jax.sharding.Mesh | None = None
    ema_std: float = 0.0

    @property
    def weights(self) -> str:
        """Which weights: "ema", "raw" or "posthoc_ema std <std>"."""
        if self.ema_std:
            return f"posthoc_ema std {self.ema_std:g}"
        return "ema" if self.ema else "raw"

    def __repr__(self) -> str:
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
        where = "1 device" if self.mesh is None else f"mesh {dict(self.mesh.shape)}"
        return (
            f"Loaded({self.config.get('name') or 'U-ViT'!r}, step={self.step}, "
            f"{self.weights} weights, {n / 1e6:.2f}M parameters on {where}, path={self.path!r})"
        )


# ---- loading -------------------------------------------------------------------------------


def load(
    workdir_or_checkpoint: str | os.PathLike,
    step: int | None = None,
    *,
    ema: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    ema_std: float = 0.0,
) -> Loaded:
    """Restores a U-ViT checkpoint for sampling and inspection.

    Args:
      workdir_or_checkpoint: a run's workdir, its `checkpoints` folder, or one step's folder
          (`<workdir>/checkpoints/<step>`).
      step: the training step to load; default the newest one whose files pass their
          checksums (a warning names each damaged newer step skipped), or the folder's step.
          Without a step, a step that a trainer deletes while it is read is replaced by the
          newest good one left (with a warning).
      ema: True: the EMA weights (what sampling and FID use); False: the raw training weights
          from the `state` item (training checkpoints only).
      mesh: None: everything on the first device (`jax.devices()[0]`). A ("data", "fsdp") mesh
          (`uvit_jax.parallel.mesh.make_mesh`): weights laid out by the training FSDP rule
          (replicated where fsdp=1), and `sample` shards its batch over the mesh.
      ema_std: 0: the run's own (classic) EMA. A relative std: the post-hoc EMA that
          `--mode posthoc_ema` reconstructed for it, from `<workdir>/posthoc_ema/std_<std>/`
          (also loadable as a workdir of its own); `step`: its reconstruction step.
    Returns:
      A `Loaded` (model, graphdef, params, config, step).
    Raises:
      CheckpointError: no checkpoint there, no such step (the message lists the steps there
          are), a damaged step asked for by number (or every step damaged: the message names
          the file and the reason), a checkpoint format newer than this uvit_jax, ema=False
          on a checkpoint without raw weights, or no post-hoc EMA of `ema_std` there.
    """
    if ema_std:
        if not ema:
            raise ValueError(f"ema=False with ema_std={ema_std}: a post-hoc EMA is EMA weights")
        workdir_or_checkpoint = posthoc_ema_workdir(workdir_or_checkpoint, ema_std)
    with _reader(workdir_or_checkpoint) as (manager, folder_step):
        root = epath.Path(manager.directory)
        asked = step
        for attempt in range(_VANISHED_RETRIES + 1):
            step = _pick(manager, asked, folder_step, "ema" if ema else "state")
            try:
                config, graphdef, params, std = _read_weights(manager, step, ema, mesh)
                break
            except Exception as e:
                # A trainer writing the workdir may move the step to its trash (keep-N) between
                # the check and the read: the newest good step is then another one.
                if (root / str(step)).exists():
                    raise
                if asked is not None or folder_step is not None or attempt == _VANISHED_RETRIES:
                    raise CheckpointError(
                        f"{root / str(step)} vanished while it was read (a trainer writing the "
                        f"workdir deleted it?): {type(e).__name__}: {e}"
                    ) from e
                logging.warning(
                    "checkpoint step %d vanished from %s while it was read (a trainer deleted "
                    "it): reading the newest good step again", step, root,
                )  # fmt: skip
                manager.reload()
    logging.info("loaded checkpoint step %d from %s", step, root / str(step))
    return Loaded(
        model=nnx.merge(graphdef, params),
        graphdef=graphdef,
        params=params,
        config=config,
        step=step,
        path=os.fspath(root / str(step)),
        ema=ema,
        mesh=mesh,
        ema_std=std,
    )


def saved_config(
    workdir_or_checkpoint: str | os.PathLike, step: int | None = None
) -> tuple[ml_collections.ConfigDict, int]:
    """(the saved config, the step) of the checkpoint whose EMA weights `load` would read with
    these arguments, without reading the weights (their files' checksums are checked). Raises
    CheckpointError as `load` does."""
    with _reader(workdir_or_checkpoint) as (manager, folder_step):
        step = _pick(manager, step, folder_step, "ema")
        return config_from_dict(checkpoints.read_config(manager, step)), step


def posthoc_ema_workdir(workdir: str | os.PathLike, std: float) -> epath.Path:
    """`<workdir>/posthoc_ema/std_<std>`, where `--mode posthoc_ema` wrote the EMA of relative
    std `std`. Raises CheckpointError, naming the stds there are, when it has none of `std`."""
    folder = checkpoints.posthoc_ema_dir(workdir, std)
    if not folder.exists():
        there = sorted(
            float(p.name.removeprefix("std_"))
            for p in (folder.parent.iterdir() if folder.parent.exists() else ())
            if p.name.startswith("std_")
        )
        raise CheckpointError(
            f"no post-hoc EMA of std {float(std):g} in {workdir}: {folder} does not exist "
            f"(reconstructed there: {', '.join(f'{s:g}' for s in there) or 'none'}; make it "
            f"with --mode posthoc_ema --config.posthoc.stds={float(std):g})"
        )
    return folder


# How many times `load` without a step picks again when the step it chose is deleted under it.
_VANISHED_RETRIES = 3


def _read_weights(
    manager: ocp.CheckpointManager, step: int, ema: bool, mesh: jax.sharding.Mesh | None
) -> tuple[ml_collections.ConfigDict, nnx.GraphDef, nnx.State, float]:
    """(config, graphdef, params, post-hoc EMA std or 0) of `step`: its EMA weights or the raw
    ones."""
    config = config_from_dict(checkpoints.read_config(manager, step))
    graphdef, abstract = nnx.split(abstract_uvit(config.model))
    target = restore_target(abstract, mesh)
    if ema:
        params = checkpoints.restore(manager, step, ema_target=target)["ema"]
    else:
        params = checkpoints.restore(manager, step, params_target=target)["params"]
    posthoc = checkpoints.read_posthoc_ema(manager, step)
    return config, graphdef, params, float(posthoc["std"]) if posthoc else 0.0


def config_from_dict(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The ConfigDict of a checkpoint's saved config.

    Fields this version has but the checkpoint's writer did not get their defaults, so code that
    reads a newer field still works on an older checkpoint.
    """
    config = ml_collections.ConfigDict(dict(saved))
    _fill_missing(config, default_config())
    return config


def _fill_missing(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> None:
    for key, value in defaults.items():
        if key not in config:
            config[key] = value
        elif isinstance(value, ml_collections.ConfigDict) and isinstance(
            config[key], ml_collections.ConfigDict
        ):
            _fill_missing(config[key], value)


@contextlib.contextmanager
def _reader(path: str | os.PathLike) -> Iterator[tuple[ocp.CheckpointManager, int | None]]:
    """(read-only manager, the step of a step folder or None) for a workdir, its checkpoints
    folder or one step's folder."""
    p = checkpoints.absolute(path)
    if p.is_file():
        raise CheckpointError(
            f"{p} is a file; uvit_jax.load reads a workdir's orbax checkpoints. Import an official "
            f"checkpoint first: python main.py --config configs/<model>.py --mode convert "
            f"--config.convert.source={p} --workdir <new workdir>"
        )
    folder_step = int(p.name) if p.name.isdigit() and (p / "config").exists() else None
    with checkpoints.open_manager(p.parent if folder_step is not None else p, read_only=True) as m:
        yield m, folder_step


def _pick(
    manager: ocp.CheckpointManager, step: int | None, folder_step: int | None, item: str
) -> int:
    """The step to load once its `item` and config pass their checksums."""
    if folder_step is not None:
        if step is not None and step != folder_step:
            raise CheckpointError(
                f"{manager.directory}/{folder_step} is the checkpoint of step {folder_step}, but "
                f"step={step} given"
            )
        step = folder_step
    picked = checkpoints.good_step(manager, step, (item,))
    if picked is None:
        raise CheckpointError(f"no checkpoint in {manager.directory}")
    return picked


def restore_target(abstract: nnx.State, mesh: jax.sharding.Mesh | None) -> nnx.State:
    """ShapeDtypeStructs carrying the shardings to restore onto (orbax needs them to restore a
    checkpoint written on another topology): one device (None) or the FSDP layout on `mesh`."""
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract)
    else:
        shardings = state_shardings(abstract, mesh)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


def load_guide(loaded: Loaded, config: ml_collections.ConfigDict | None = None) -> Loaded | None:
    """Autoguidance's guide for sampling `loaded` with `config.sample` (default: the config
    saved with `loaded`); None unless `guidance` is "autoguidance" with a nonzero `cfg_scale`.

    `config.sample.guide_checkpoint` says where: "N" is step N of `loaded`'s own run (its
    checkpoints folder); "W" the newest good step of workdir W (or of its checkpoints folder,
    or the step of a step folder), as `load` reads it; "W:N" step N of W. The guide is
    restored like `loaded`: onto the same mesh, EMA or raw weights alike.

    Raises:
      ConfigError, one line naming the field and its value: no such checkpoint (the reason
          `load` gives), or a guide whose config differs from the main model's where
          autoguidance needs them equal (`sampling.generate.check_guide`: both values named).
    """
    config = loaded.config if config is None else config
    if guidance_from_config(config) != "autoguidance" or float(config.sample.cfg_scale) == 0:
        return None
    value = guide_checkpoint_of(config)
    path, step = _guide_location(loaded, value)
    try:
        guide = load(path, step, ema=loaded.ema, mesh=loaded.mesh)
    except CheckpointError as e:
        raise ConfigError(f"config.sample.guide_checkpoint={value!r}: {e}") from e
    check_guide(config, guide.config)
    return guide


def _guide_location(loaded: Loaded, value: str) -> tuple[str, int | None]:
    """(path, step or None) of a `guide_checkpoint` value ("N", "W" or "W:N"; a URL's own
    colon is not a step separator)."""
    if value.isdigit():
        if loaded.ema_std:  # a post-hoc EMA's "N" is step N of the run it was made from
            run = checkpoints.posthoc_ema_run(loaded.path)
            return os.fspath(checkpoints.checkpoint_dir(run)), int(value)
        return os.path.dirname(loaded.path), int(value)
    path, colon, step = value.rpartition(":")
    if colon and step.isdigit():
        return path, int(step)
    return value, None


# ---- sampling ------------------------------------------------------------------------------


def sample(
    loaded: Loaded,
    *,
    labels: Sequence[int] | np.ndarray | jax.Array | None = None,
    contexts: np.ndarray | jax.Array | None = None,
    null_context: np.ndarray | jax.Array | None = None,
    prompts: Sequence[str] | None = None,
    num: int | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    sampler: str | None = None,
    cfg_interval: tuple[float, float] | tuple[()] | None = None,
    cfg_schedule: str | None = None,
    guidance: str | None = None,
    guide_checkpoint: int | str | None = None,
    guide: Loaded | None = None,
    seed: int = 0,
    batch: int = 0,
    decode: bool = True,
) -> jax.Array:
    """Draws samples with the checkpoint config's sampler and guidance.

    Args:
      loaded: from `load`.
      labels: [B] class labels in [0, num_classes) for class-conditional models (a list or
          `range` works); random classes if None.
      contexts: [B, L, clip_dim] float32 text encodings (text-to-image models).
      null_context: [L, clip_dim] encoding of the empty prompt (guided text-to-image only).
      prompts: text-to-image models: captions to draw, one image each, instead of contexts;
          encoded with the CLIP text encoder of `config.text_encoder.path` (loaded once).
      num: batch size B when neither labels nor contexts give it (default
          config.sample.num_samples).
      steps, cfg_scale, sampler: override config.sample.{steps, cfg_scale, sampler} for this
          call; `loaded.config` is left unchanged. cfg_scale=0 samples without guidance: the
          config's guidance interval and schedule are then dropped unless given here too.
      cfg_interval: overrides config.sample.cfg_interval: (lo, hi) guides only at noise levels
          lo < sigma_t / alpha_t <= hi; () guides at every step.
      cfg_schedule: overrides config.sample.cfg_schedule: "constant" or "linear" (the scale
          grows as cfg_scale * (1 - t) from pure noise, t = 1, to the end).
      guidance: overrides config.sample.guidance: "cfg" (the unconditional branch; the
          config's guide_checkpoint is then dropped unless given here too) or "autoguidance"
          (a weaker model: out_main + cfg_scale (out_main - out_guide)).
      guide_checkpoint: overrides config.sample.guide_checkpoint (`load_guide`): a step of
          this run (2000), a workdir ("W") or "W:2000"; loaded at each call.
      guide: an already loaded guide (`load` or `load_guide`), reused across calls instead of
          guide_checkpoint; it implies guidance="autoguidance". Its config is checked like a
          guide_checkpoint's. Neither is read or called when cfg_scale is 0.
      seed, batch: x_T, random labels and SDE noise come from
          `fold_in(jax.random.key(seed), batch)`, so a seed gives the same samples on any number
          of devices, and batch i equals batch i of `main.py --mode sample` with that seed.
      decode: True: images through the config's autoencoder; False: the model's raw output
          (scaled latents for latent models).
    Returns:
      decode=True: [B, H, W, C] float32 images clipped to [-1, 1]; decode=False: [B, h, w, c]
      float32 samples in the model's space.
    """
    config = loaded.config.copy_and_resolve_references()
    overrides = dict(steps=steps, cfg_scale=cfg_scale, sampler=sampler)
    for (field, value), cast in zip(overrides.items(), (int, float, str), strict=True):
        if value is not None:
            config.sample[field] = cast(value)
    if cfg_scale is not None and float(cfg_scale) == 0:
        # Unguided: the saved interval and schedule (e.g. the default's "linear") have no
        # scale to act on; naming them with scale 0 in a config stays an error.
        config.sample.update(cfg_interval=(), cfg_schedule="constant")
    if cfg_interval is not None:
        config.sample.cfg_interval = tuple(float(v) for v in cfg_interval)
    if cfg_schedule is not None:
        config.sample.cfg_schedule = str(cfg_schedule)
    if guidance is not None:
        config.sample.guidance = str(guidance)
        if guidance == "cfg" and guide_checkpoint is None:
            config.sample.guide_checkpoint = ""  # the saved guide is autoguidance's alone
    if guide_checkpoint is not None:
        config.sample.guide_checkpoint = str(guide_checkpoint)
    if guide is not None:
        if guidance not in (None, "autoguidance"):
            raise ValueError(f"a guide model is autoguidance's, but guidance={guidance!r}")
        config.sample.guidance = "autoguidance"
        if guide_checkpoint is None:
            config.sample.guide_checkpoint = guide.path  # its step folder
        check_guide(config, guide.config)
    else:
        guide = load_guide(loaded, config)
    if labels is not None:
        labels = jnp.asarray(np.asarray(labels, np.int32).reshape(-1))
    if prompts is not None:
        if contexts is not None:
            raise ValueError("pass prompts or contexts, not both")
        text = prompt_conditions(config, list(prompts), len(prompts))
        contexts, null_context = text.contexts, text.null_context
    sharding = None if loaded.mesh is None else batch_sharding(loaded.mesh)
    x = sample_images(
        loaded.graphdef,
        loaded.params,
        config,
        jax.random.fold_in(jax.random.key(seed), batch),
        labels=labels,
        contexts=None if contexts is None else jnp.asarray(contexts, jnp.float32),
        null_context=None if null_context is None else jnp.asarray(null_context, jnp.float32),
        num=num,
        sharding=sharding,
        decode=_decoder_of(loaded) if decode else _identity,
        guide=None if guide is None else (guide.graphdef, guide.params),
    )
    return jnp.clip(x, -1.0, 1.0) if decode else x


def _identity(z: jax.Array) -> jax.Array:
    return z


def _decoder_of(loaded: Loaded) -> functools.partial:
    return functools.partial(decode, loaded)


def decode(
    loaded_or_config: Loaded | ml_collections.ConfigDict, z: np.ndarray | jax.Array
) -> jax.Array:
    """Scaled latents -> images with the config's autoencoder.

    Args:
      loaded_or_config: a `Loaded`, or a run config (its `autoencoder` and `model.in_chans`).
      z: [B, h, w, c] float32 scaled latents (what `sample(..., decode=False)` returns).
    Returns:
      [B, H, W, C] float32 images, nominally in [-1, 1] (not clipped). Pixel-space models
      (autoencoder.kind "identity") return z divided by the scale factor (1: unchanged).
    Raises:
      FileNotFoundError: config.autoencoder.pretrained_path does not exist on this machine
          (set `loaded.config.autoencoder.pretrained_path` to where the weights are here).
    """
    if isinstance(loaded_or_config, Loaded):
        config, mesh = loaded_or_config.config, loaded_or_config.mesh
    else:
        config, mesh = loaded_or_config, None
    return autoencoder_from_config(config, mesh).decode(jnp.asarray(z, jnp.float32))


# ---- display -------------------------------------------------------------------------------


def grid(images: np.ndarray | jax.Array, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """Images -> one uint8 picture for `plt.imshow` or PIL.

    Args:
      images: [N, H, W, C] float images in [-1, 1] (clipped), or uint8; C = 1 or 3.
      ncol: images per row (default: a square-ish grid). Rows fill left to right.
      pad: white pixels between and around images.
    Returns:
      [rows*(H+pad)+pad, ncol*(W+pad)+pad, 3] uint8; grey images are repeated on the three
      channels so every image viewer takes the array as it is.
    """
    x = np.asarray(jax.device_get(images))
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"grid expects images [N, H, W, C] with C = 1 or 3, got shape {x.shape}")
    x = x if x.dtype == np.uint8 else image_utils.to_uint8(x)
    return image_utils.to_rgb(image_utils.make_grid(x, ncol=ncol, pad=pad))
