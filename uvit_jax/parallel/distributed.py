"""Joining the processes of a multi-host job: `jax.distributed.initialize` at start-up.

One program runs on every host; each process must call `initialize_distributed()` before it
touches a device. What it does depends on the environment the launcher gives it:

  explicit   `UVIT_COORDINATOR=host:port` (or JAX's own `JAX_COORDINATOR_ADDRESS`) with
             `UVIT_NUM_PROCESSES` and `UVIT_PROCESS_ID` (or `JAX_NUM_PROCESSES` /
             `JAX_PROCESS_ID`): any machines, e.g. `launch/local_multiprocess.py`.
             `JAX_LOCAL_DEVICE_IDS` (read by JAX) picks this process's GPUs.
  automatic  a SLURM step with more than one task (`srun`), an Open MPI job with more than one
             rank (`mpirun`), or `UVIT_DISTRIBUTED=auto` (Cloud TPU pods, see
             `launch/tpu_pod.sh`): `jax.distributed.initialize()` with no arguments, which reads
             the cluster's own description (SLURM variables, MPI's URI, the TPU metadata).
  nothing    a single process (a laptop, one GPU machine, one TPU VM), or
             `UVIT_DISTRIBUTED=off`.

`UVIT_INIT_TIMEOUT` (seconds, default 300) bounds how long a process waits for the others.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax

from uvit_jax.errors import UserError

_TIMEOUT_DEFAULT_S = 300


class DistributedConfigError(UserError, ValueError):
    """The environment asks for a multi-process job but does not describe it completely."""


def _int_env(env: Mapping[str, str], *names: str) -> int | None:
    """The first of `names` set in `env`, as an int (None if none is set)."""
    for name in names:
        if env.get(name, "") != "":
            try:
                return int(env[name])
            except ValueError:
                raise DistributedConfigError(
                    f"environment variable {name}={env[name]!r} is not an integer"
                ) from None
    return None


def _more_than_one(env: Mapping[str, str], name: str) -> bool:
    return (_int_env(env, name) or 1) > 1


def distributed_arguments(env: Mapping[str, str] | None = None) -> dict | None:
    """What `initialize_distributed` would pass to `jax.distributed.initialize`.

    Returns:
      None for a single process; {} for cluster auto-detection; else the explicit
      {coordinator_address, num_processes, process_id}. Each dict also holds
      `initialization_timeout` (seconds).
    Raises:
      DistributedConfigError: a coordinator without a process count or id (names the variables),
        an id outside [0, count), or an unknown `UVIT_DISTRIBUTED` value.
    """
    env = os.environ if env is None else env
    mode = env.get("UVIT_DISTRIBUTED", "").strip().lower()
    if mode not in ("", "auto", "off"):
        raise DistributedConfigError(
            f"UVIT_DISTRIBUTED={env['UVIT_DISTRIBUTED']!r}; expected 'auto', 'off' or unset"
        )
    if mode == "off":
        return None
    timeout = _int_env(env, "UVIT_INIT_TIMEOUT") or _TIMEOUT_DEFAULT_S
    coordinator = env.get("UVIT_COORDINATOR") or env.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        count = _int_env(env, "UVIT_NUM_PROCESSES", "JAX_NUM_PROCESSES")
        index = _int_env(env, "UVIT_PROCESS_ID", "JAX_PROCESS_ID")
        missing = [
            name
            for name, value in (("UVIT_NUM_PROCESSES", count), ("UVIT_PROCESS_ID", index))
            if value is None
        ]
        if missing:
            raise DistributedConfigError(
                f"coordinator {coordinator!r} is set but {' and '.join(missing)} "
                "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID) is not"
            )
        if not 0 <= index < count:
            raise DistributedConfigError(
                f"UVIT_PROCESS_ID={index} is outside [0, UVIT_NUM_PROCESSES={count})"
            )
        if count == 1:
            return None
        return dict(
            coordinator_address=coordinator,
            num_processes=count,
            process_id=index,
            initialization_timeout=timeout,
        )
    slurm = "SLURM_STEP_NODELIST" in env and _more_than_one(env, "SLURM_NTASKS")
    mpi = "OMPI_MCA_orte_hnp_uri" in env and _more_than_one(env, "OMPI_COMM_WORLD_SIZE")
    if mode == "auto" or slurm or mpi:
        return dict(initialization_timeout=timeout)
    return None


def initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Joins this process to its job (see the module docstring); call before any device use.

    Idempotent: a second call, or a call after `jax.distributed.initialize`, does nothing.

    Returns:
      True when the job has more than one process after the call.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    args = distributed_arguments(env)
    if args is None:
        return False
    jax.distributed.initialize(**args)
    logging.info(
        "distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return jax.process_count() > 1
