"""Runs one command as N cooperating JAX processes on this machine (a multi-host rehearsal).

  python launch/local_multiprocess.py --num_processes 2 --devices_per_process 4 -- \
      python main.py --config configs/fashion_mnist_uvit.py:runlocal --workdir /tmp/w

Every process gets the same command and `UVIT_COORDINATOR` / `UVIT_NUM_PROCESSES` /
`UVIT_PROCESS_ID` (read by `uvit_jax.parallel.distributed.initialize_distributed`); on CPU each
simulates `--devices_per_process` devices (`--xla_force_host_platform_device_count`), and the
processes talk over gloo. Output lines are prefixed with the process index. If one process fails
(an error, or killed) or `--timeout` passes, the others are stopped, so a hung collective cannot
hang the caller; the exit status is that of the process that failed first.

On GPU machines use one process per GPU with `--gpus_per_process` (sets
`CUDA_VISIBLE_DEVICES`): it exercises the same code paths as `launch/slurm_gpu.sbatch`.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time


def free_port() -> int:
    import portpicker

    return portpicker.pick_unused_port()


def process_env(
    base: dict[str, str],
    *,
    index: int,
    count: int,
    coordinator: str,
    devices_per_process: int,
    gpus_per_process: int,
) -> dict[str, str]:
    """The environment of process `index` of `count`."""
    env = dict(base)
    env.update(
        UVIT_COORDINATOR=coordinator,
        UVIT_NUM_PROCESSES=str(count),
        UVIT_PROCESS_ID=str(index),
    )
    if gpus_per_process:
        first = index * gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + g) for g in range(gpus_per_process))
    else:
        env.setdefault("JAX_PLATFORMS", "cpu")
        flags = [
            f
            for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")
        ]
        flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
        env["XLA_FLAGS"] = " ".join(flags)
    return env


def exit_status(returncode: int) -> int:
    """A child's return code as this process's exit status: a death by signal N is 128 + N,
    as a shell reports it (Popen gives -N)."""
    return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
    """`status 3`, or `SIGKILL (status 137)` for a death by signal."""
    if returncode >= 0:
        return f"status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"{name} (status {exit_status(returncode)})"


def _pump(stream, prefix: str, sink) -> None:
    for line in iter(stream.readline, ""):
        sink.write(prefix + line)
        sink.flush()


def run_processes(
    command: list[str],
    *,
    num_processes: int,
    devices_per_process: int = 4,
    gpus_per_process: int = 0,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    log_files: list[str] | None = None,
) -> int:
    """Starts `num_processes` copies of `command`; returns the exit status of the first to fail
    (128 + N for a death by signal N), after stopping the others; 0 when all succeed.

    Args:
      log_files: one path per process to write its stdout+stderr to; default: this process's
        stdout, each line prefixed with `[i]`.
    Raises:
      TimeoutError: `timeout` seconds passed before all exited (all are killed first).
    """
    coordinator = f"localhost:{free_port()}"
    base = dict(os.environ if env is None else env)
    procs, pumps, files = [], [], []
    for i in range(num_processes):
        penv = process_env(
            base,
            index=i,
            count=num_processes,
            coordinator=coordinator,
            devices_per_process=devices_per_process,
            gpus_per_process=gpus_per_process,
        )
        if log_files:
            f = open(log_files[i], "w")  # noqa: SIM115 (closed below)
            files.append(f)
            procs.append(subprocess.Popen(command, env=penv, stdout=f, stderr=subprocess.STDOUT))
        else:
            p = subprocess.Popen(
                command, env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[{i}] ", sys.stdout), daemon=True)
            t.start()
            pumps.append(t)
    deadline = None if timeout is None else time.monotonic() + timeout
    status = 0
    try:
        while True:
            codes = [p.poll() for p in procs]  # every child, every time: any may die first
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                status = exit_status(code)
                if any(c is None for c in codes):
                    print(f"local_multiprocess: process {i} exited with {describe(code)}; "
                          "stopping the others", file=sys.stderr, flush=True)  # fmt: skip
                break  # the others would wait for it in a collective
            if all(c == 0 for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{command[:3]}... still running after {timeout} s")
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for t in pumps:
            t.join(timeout=5)
        for f in files:
            f.close()
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4, help="CPU devices each")
    parser.add_argument("--gpus_per_process", type=int, default=0, help="0: CPU run")
    parser.add_argument("--timeout", type=float, default=None, help="seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    sys.exit(
        run_processes(
            command,
            num_processes=args.num_processes,
            devices_per_process=args.devices_per_process,
            gpus_per_process=args.gpus_per_process,
            timeout=args.timeout,
        )
    )


if __name__ == "__main__":
    main()
