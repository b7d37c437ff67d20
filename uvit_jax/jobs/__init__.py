"""The jobs `main.py --mode` runs, one file each; every job is a function of (config, workdir).

train.py     train            extract the dataset if needed, train, resume, sample grids, FID
extract.py   extract          images -> autoencoder moments (or pixels) -> dataset
sample.py    sample           images from a checkpoint's EMA weights
evaluate.py  eval, fid_stats  FID & co. of a checkpoint; reference statistics of a dataset
sweep.py     sweep            eval metrics of a checkpoint over samplers x steps x guidance
posthoc_ema.py  posthoc_ema   EMAs of other lengths from the power-function EMAs' snapshots
ablate.py    ablate           variants trained with one recipe, eval metrics along training
convert.py   convert, convert_autoencoder, convert_inception   official weights -> ours
compile.py   compile          compile for a TPU slice that is not there: memory, FLOPs, roofline
"""

from __future__ import annotations

import importlib
import logging
import os

import jax

from uvit_jax import latent_scale
from uvit_jax.config_checks import check_config
from uvit_jax.diffusion.formulation import PATHS, TIME_SAMPLINGS, Formulation
from uvit_jax.diffusion.objective import LOSS_WEIGHTINGS
from uvit_jax.diffusion.targets import TARGETS
from uvit_jax.errors import EXPECTED, ConfigError
from uvit_jax.evaluation.preprocess import PROTOCOLS
from uvit_jax.parallel.distributed import initialize_distributed
from uvit_jax.parallel.host import describe_host
from uvit_jax.parallel.peers import watch_peers
from uvit_jax.sampling.dpm_solver import SKIP_TYPES
from uvit_jax.sampling.guidance import CFG_SCHEDULES, GUIDANCES
from uvit_jax.sampling.samplers import SAMPLERS
from uvit_jax.train.optimizer import LR_DECAYS, OPTIMIZERS

# mode -> "module:function"; imported only when run, so `main.py --mode convert` never loads
# TensorFlow (clu) and `--mode train` never loads torch.
MODES: dict[str, str] = {
    "train": "uvit_jax.jobs.train:train_job",
    "extract": "uvit_jax.jobs.extract:extract_job",
    "convert": "uvit_jax.jobs.convert:convert_job",
    "convert_autoencoder": "uvit_jax.jobs.convert:convert_autoencoder_job",
    "convert_inception": "uvit_jax.jobs.convert:convert_inception_job",
    "fid_stats": "uvit_jax.jobs.evaluate:fid_stats_job",
    "eval": "uvit_jax.jobs.evaluate:eval_job",
    "sample": "uvit_jax.jobs.sample:sample_job",
    "sweep": "uvit_jax.jobs.sweep:sweep_job",
    "posthoc_ema": "uvit_jax.jobs.posthoc_ema:posthoc_ema_job",
    "ablate": "uvit_jax.jobs.ablate:ablate_job",
    "compile": "uvit_jax.jobs.compile:compile_job",
}

# Jobs that only compile, for devices that are not attached: JAX runs them on the CPU platform,
# so an installed TPU runtime never looks for a TPU here.
COMPILE_ONLY_MODES = ("compile",)

# Modes that train, and so run `config.train.evals`.
TRAINING_MODES = ("train", "ablate")


def registry_choices() -> dict[str, tuple[str, ...]]:
    """The names each registry-backed field of `config_checks.FIELD_CHECKS` may take."""
    return {
        "diffusion.formulation": tuple(PATHS),
        "diffusion.target": tuple(TARGETS),
        "diffusion.time_sampling": tuple(TIME_SAMPLINGS),
        "diffusion.loss_weighting": tuple(LOSS_WEIGHTINGS),
        "sample.sampler": tuple(SAMPLERS),
        "sample.grid": ("", *SKIP_TYPES),  # "": the sampler's own
        "sample.cfg_schedule": tuple(CFG_SCHEDULES),
        "sample.guidance": GUIDANCES,
        "eval.protocol": tuple(PROTOCOLS),
        "optim.schedule": tuple(LR_DECAYS),
        "optim.name": tuple(OPTIMIZERS),
    }


def check(mode: str, config) -> None:
    """Every field's range and names (`config_checks`), the evaluators of training modes."""
    check_config(config, registry_choices())
    Formulation.from_config(config)  # the combinations a field alone cannot refuse
    latent_scale.check(config)
    if mode in TRAINING_MODES:
        from uvit_jax.evals import check_guidance, check_sections  # loads TF (clu): training only

        check_sections(config.train.get("evals", {}))
        check_guidance(config)


def run(mode: str, config, workdir: str) -> None:
    """Runs job `mode` after checking `config` (`check`); a mode this version does not have
    fails with the list of those it has."""
    if mode not in MODES:
        raise ConfigError(f"--mode={mode!r} is not available; modes: {', '.join(sorted(MODES))}")
    check(mode, config)  # before any device use, compilation or read
    if mode in COMPILE_ONLY_MODES:
        jax.config.update("jax_platforms", "cpu")  # before any device use
    initialize_distributed()  # before any device use; a no-op for one process
    where = (
        f"for {config.compile.topology or '(no config.compile.topology)'}, on this host's CPU"
        if mode in COMPILE_ONLY_MODES
        else f"on {jax.device_count()} devices ({jax.devices()[0].device_kind})"
    )
    logging.info("%s %s, workdir %s", mode, where, os.path.abspath(workdir))
    logging.info("host: %s", describe_host())  # beside every throughput the job logs
    module, function = MODES[mode].split(":")
    watch = watch_peers()  # multi-process: one process's death stops the others, named
    try:
        getattr(importlib.import_module(module), function)(config, workdir)
    except BaseException as e:
        if watch is not None:
            expected = isinstance(e, EXPECTED)
            why = str(e) if expected else f"{type(e).__name__}: {e}"
            watch.failed(why, 2 if expected else 1, wait=not isinstance(e, KeyboardInterrupt))
        raise
    if watch is not None:
        watch.finished()
