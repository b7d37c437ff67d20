"""Multi-host training on one machine: 2 processes x 4 CPU devices vs 1 process x 8 devices.

Both runs use the same worker (`WORKER` below, run through `launch/local_multiprocess.py`): it
joins the job with `initialize_distributed`, trains the tiny config with the real loop, gathers
its final state, records which examples its process read, and (2-process run) restores the
1-process run's checkpoint onto its own cross-process mesh.
"""

import json
import os
import pathlib
import re
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

from uvit_jax.parallel.distributed import (
    DistributedConfigError,
    distributed_arguments,
    initialize_distributed,
)
from uvit_jax.parallel.peers import PeerWatch, peer_timeout_s

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))
from local_multiprocess import run_processes  # noqa: E402

FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
STEPS = 6
RUN_TIMEOUT_S = 240  # a hung collective fails the test instead of hanging CI

WORKER = textwrap.dedent(
    """
    import json, logging, os, sys
    import numpy as np
    logging.getLogger().setLevel(logging.INFO)  # the loop's progress lines, as main.py shows them
    from uvit_jax.parallel.distributed import initialize_distributed
    initialize_distributed()
    import jax
    from jax.experimental import multihost_utils
    from configs.fashion_mnist_uvit import get_config
    from input_pipeline.train_input import make_train_iterator
    from uvit_jax import checkpoints
    from uvit_jax.parallel.mesh import make_mesh
    from uvit_jax.jobs.train import train_job
    from uvit_jax.train.optimizer import make_optimizer
    from uvit_jax.train.state import abstract_train_state

    data_dir, workdir, steps, other = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    c = get_config("runlocal")
    c.data.update(latent_dir=data_dir, num_workers=0)
    c.train.update(num_steps=steps, log_every=1, ckpt_every=steps)
    c.train.evals.sample_grid.every = 0
    rank, n = jax.process_index(), jax.process_count()

    def gathered(state_items):
        flat = jax.tree_util.tree_flatten_with_path(state_items)[0]
        arrays = multihost_utils.process_allgather([x for _, x in flat], tiled=True)
        return {jax.tree_util.keystr(p): np.asarray(a) for (p, _), a in zip(flat, arrays)}

    first = next(make_train_iterator(c, seed=c.seed, data_dir=data_dir, include_index=True))
    with open(os.path.join(workdir, f"shard_{rank}.json"), "w") as f:
        json.dump(dict(index=first["index"].tolist(), process=rank, processes=n,
                       local_devices=jax.local_device_count(), devices=jax.device_count()), f)
    state = train_job(c, workdir)
    final = gathered(state.checkpoint_items())
    if other != "-":
        mesh = make_mesh(c.mesh)
        tx = make_optimizer(c.optim, steps)
        abstract, _ = abstract_train_state(c.model, tx, mesh)
        item_t, ema_t = abstract.checkpoint_items()
        manager = checkpoints.open_manager(other, read_only=True)
        got = checkpoints.restore(manager, steps, ema_target=ema_t, state_target=item_t)
        restored = gathered((got["state"], got["ema"]))
    if rank == 0:
        np.savez(os.path.join(workdir, "final.npz"), **final)
        if other != "-":
            np.savez(os.path.join(workdir, "restored_other.npz"), **restored)
    """
)


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the launcher sets the device count per process
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["JAX_COMPILATION_CACHE_DIR"] = str(jax.config.jax_compilation_cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["UVIT_INIT_TIMEOUT"] = "120"
    for name in ("UVIT_COORDINATOR", "UVIT_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS"):
        env.pop(name, None)
    return env


def launch(tmp: pathlib.Path, name: str, data_dir: str, processes: int, other: str = "-"):
    workdir = tmp / name
    workdir.mkdir()
    script = tmp / "worker.py"
    script.write_text(WORKER)
    logs = [str(tmp / f"{name}_{i}.log") for i in range(processes)]
    status = run_processes(
        [sys.executable, str(script), data_dir, str(workdir), str(STEPS), other],
        num_processes=processes,
        devices_per_process=8 // processes,
        timeout=RUN_TIMEOUT_S,
        env=worker_env(),
        log_files=logs,
    )
    text = [pathlib.Path(p).read_text() for p in logs]
    assert status == 0, f"{name} failed (status {status}):\n" + "\n".join(t[-3000:] for t in text)
    return workdir, text


def logged_losses(log: str) -> np.ndarray:
    """Per-step losses from the loop's progress lines `step N/M  loss L  ...`."""
    found = dict(re.findall(r"step (\d+)/\d+  loss ([-+0-9.e]+)", log))
    assert sorted(map(int, found)) == list(range(1, STEPS + 1)), f"losses not logged: {found}"
    return np.array([float(found[str(s)]) for s in range(1, STEPS + 1)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(1-process run, 2-process run): each (workdir, [log text per process])."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Debian's dataset-fashion-mnist is not installed ({FMNIST})")
    from configs.fashion_mnist_uvit import get_config
    from input_pipeline.extract import run_extraction
    from input_pipeline.sources import FashionMnistFilesSource, Subset

    tmp = tmp_path_factory.mktemp("multihost")
    c = get_config("runlocal")
    c.data.latent_dir = str(tmp / "data")
    data_dir = run_extraction(c, None, source=Subset(FashionMnistFilesSource(FMNIST, "train"), 128))
    one = launch(tmp, "one", data_dir, processes=1)
    two = launch(tmp, "two", data_dir, processes=2, other=str(one[0]))
    return one, two


def load_npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return dict(f)


def restore_in_this_process(workdir) -> dict[str, np.ndarray]:
    """The checkpoint at STEPS restored in this (single) process on 8 devices, as numpy."""
    from configs.fashion_mnist_uvit import get_config
    from uvit_jax import checkpoints
    from uvit_jax.parallel.mesh import make_mesh
    from uvit_jax.train.optimizer import make_optimizer
    from uvit_jax.train.state import abstract_train_state

    c = get_config("runlocal")
    abstract, _ = abstract_train_state(
        c.model, make_optimizer(c.optim, STEPS), make_mesh(c.mesh, jax.devices())
    )
    item_t, ema_t = abstract.checkpoint_items()
    manager = checkpoints.open_manager(workdir, read_only=True)
    got = checkpoints.restore(manager, STEPS, ema_target=ema_t, state_target=item_t)
    flat = jax.tree_util.tree_flatten_with_path((got["state"], got["ema"]))[0]
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x)) for p, x in flat}


def assert_same_arrays(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def shard_record(workdir, rank: int) -> dict:
    return json.loads((workdir / f"shard_{rank}.json").read_text())


@pytest.mark.integration
def test_both_processes_train_in_lockstep(runs):
    _, (two_dir, logs) = runs
    for rank in range(2):
        got = shard_record(two_dir, rank)
        assert (got["process"], got["processes"], got["local_devices"], got["devices"]) == (
            rank,
            2,
            4,
            8,
        )
    np.testing.assert_array_equal(logged_losses(logs[0]), logged_losses(logs[1]))


@pytest.mark.integration
def test_two_processes_follow_the_one_process_loss_trajectory(runs):
    (_, one_logs), (_, two_logs) = runs
    one, two = logged_losses(one_logs[0]), logged_losses(two_logs[0])
    # Reduction order differs between the layouts: equal to float tolerance, not bitwise.
    np.testing.assert_allclose(two, one, rtol=2e-5)


@pytest.mark.integration
def test_each_process_reads_a_disjoint_shard(runs):
    (one_dir, _), (two_dir, _) = runs
    shards = [set(shard_record(two_dir, i)["index"]) for i in range(2)]
    whole = shard_record(one_dir, 0)["index"]
    assert len(whole) == 16 and all(len(s) == 8 for s in shards)
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(whole)


@pytest.mark.integration
def test_checkpoint_written_by_two_processes_restores_in_one(runs):
    _, (two_dir, _) = runs
    # (state item, EMA) as both processes held them at the end, gathered before the save.
    written = load_npz(two_dir / "final.npz")
    assert_same_arrays(restore_in_this_process(two_dir), written)


@pytest.mark.integration
def test_checkpoint_written_by_one_process_restores_in_two(runs):
    (one_dir, _), (two_dir, _) = runs
    in_two = load_npz(two_dir / "restored_other.npz")  # FSDP shards over both processes
    assert_same_arrays(in_two, load_npz(one_dir / "final.npz"))


@pytest.mark.slow
@pytest.mark.integration
def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(runs, tmp_path):
    """JAX's preemption sync manager picks a step both reach; each saves it and exits 0."""
    import signal
    import subprocess

    (one_dir, _), _ = runs
    data_dir = str(one_dir.parent / "data")
    workdir = tmp_path / "w"
    cmd = [sys.executable, str(REPO / "main.py"),
           "--config", str(REPO / "configs/fashion_mnist_uvit.py") + ":runlocal",
           "--workdir", str(workdir), f"--config.data.latent_dir={data_dir}",
           "--config.data.num_workers=0", "--config.train.evals.sample_grid.every=0",
           "--config.train.num_steps=100000", "--config.train.ckpt_every=100000",
           "--config.train.log_every=10"]  # fmt: skip
    from local_multiprocess import free_port, process_env

    coordinator = f"localhost:{free_port()}"
    logs = [tmp_path / f"{i}.log" for i in range(2)]
    procs = []
    for i in range(2):
        env = process_env(worker_env(), index=i, count=2, coordinator=coordinator,
                          devices_per_process=4, gpus_per_process=0)  # fmt: skip
        with open(logs[i], "w") as f:
            procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while "] step 20/" not in logs[0].read_text():  # the progress line of step 20
            assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not reach step 20"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0]
    saved = [re.findall(r"SIGTERM: saved step (\d+)", log.read_text()) for log in logs]
    assert saved[0] and saved[0] == saved[1]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        saved[0][0]
    ]


@pytest.mark.slow
@pytest.mark.integration
def test_a_killed_process_stops_the_other_in_bounded_time_with_one_line(runs, tmp_path):
    """Without the watch the survivor waits in a collective until JAX's heartbeat timeout, then
    aborts with a stack dump; with it, it names the dead process within UVIT_PEER_TIMEOUT."""
    import signal
    import subprocess

    from local_multiprocess import free_port, process_env

    (one_dir, _), _ = runs
    cmd = [sys.executable, str(REPO / "main.py"),
           "--config", str(REPO / "configs/fashion_mnist_uvit.py") + ":runlocal",
           "--workdir", str(tmp_path / "w"), f"--config.data.latent_dir={one_dir.parent / 'data'}",
           "--config.data.num_workers=0", "--config.train.evals.sample_grid.every=0",
           "--config.train.num_steps=100000", "--config.train.log_every=10"]  # fmt: skip
    coordinator, timeout_s = f"localhost:{free_port()}", 5
    logs = [tmp_path / f"{i}.log" for i in range(2)]
    procs = []
    for i in range(2):
        env = process_env(worker_env(), index=i, count=2, coordinator=coordinator,
                          devices_per_process=4, gpus_per_process=0)  # fmt: skip
        env["UVIT_PEER_TIMEOUT"] = str(timeout_s)
        with open(logs[i], "w") as f:
            procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while "] step 20/" not in logs[0].read_text():
            assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not reach step 20"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = procs[0].wait(timeout=120)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = logs[0].read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 2 and waited < 3 * timeout_s, (code, waited, text[-3000:])
    assert errors == [
        f"error: process 1 of 2 stopped answering for {timeout_s} s (killed, or its host is "
        "down); stopping process 0 too"
    ], text[-3000:]
    assert "Traceback" not in text and "Check failure" not in text


def test_the_launcher_stops_everything_when_any_child_dies_and_reports_it(tmp_path, capfd):
    """Process 1 is killed while process 0 runs on: the launcher reports 1's death (128 + 9),
    whatever the order it polls them in, and does not wait for 0."""
    script = tmp_path / "child.py"
    script.write_text(
        "import os, signal, time\n"
        "if os.environ['UVIT_PROCESS_ID'] == '1':\n"
        "    time.sleep(0.5)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    status = run_processes([sys.executable, str(script)], num_processes=2, timeout=50)
    assert status == 137 and time.monotonic() - started < 30
    err = capfd.readouterr().err
    assert "process 1 exited with SIGKILL (status 137); stopping the others" in err


class FakeStore:
    """The coordination service's key-value calls the watch makes, in memory."""

    def __init__(self):
        self.data, self.lock = {}, threading.Lock()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.lock:
            if key in self.data and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: key {key} already exists.")
            self.data[key] = value

    def key_value_try_get(self, key):
        with self.lock:
            if key not in self.data:
                raise RuntimeError(f"NOT_FOUND: Config key {key} not found.")
            return self.data[key]


def watches(store, count, timeout_s=0.3):
    exits = {}
    made = [PeerWatch(store, i, count, timeout_s, exit=lambda c, i=i: exits.setdefault(i, c))
            for i in range(count)]  # fmt: skip
    return [w.start() for w in made], exits


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_silent_process_is_named_by_its_watcher_and_every_other_stops(capfd):
    store = FakeStore()
    live, exits = watches(store, 4)
    live[2].close()  # killed: its beat stops, and it writes nothing more
    wait_for(lambda: len(exits) == 3)
    for w in live:
        w.close()
    assert exits == {0: 2, 1: 2, 3: 2}
    assert store.data["uvit_peers/stopped"] == (
        "process 2 of 4 stopped answering for 0.3 s (killed, or its host is down)"
    )
    lines = [x for x in capfd.readouterr().err.splitlines() if x.startswith("error:")]
    assert sorted(lines) == [
        f"error: process 2 of 4 stopped answering for 0.3 s (killed, or its host is down); "
        f"stopping process {i} too" for i in (0, 1, 3)
    ]  # fmt: skip


def test_a_failed_process_stops_the_others_with_its_first_line_and_finished_ones_are_skipped():
    store = FakeStore()
    live, exits = watches(store, 3)
    live[1].finished()
    live[1].close()  # finished and gone: not a death
    time.sleep(1.0)  # over three timeouts
    assert exits == {}
    live[0].failed("ConfigError: config.x=1: expected 2\nsecond line", 2)
    wait_for(lambda: 2 in exits)
    time.sleep(0.2)
    for w in live:
        w.close()
    assert exits == {2: 2}  # the failing process ends by its own error, not by the watch
    why = "process 0 of 3 failed: ConfigError: config.x=1: expected 2"
    assert store.data["uvit_peers/stopped"] == why


def test_an_error_caused_by_a_death_is_reported_as_that_death(capfd):
    """Process 1 is killed; process 0's collective fails at once (its own error names no one):
    it waits for its watcher to name process 1, and leaves with that line."""
    store = FakeStore()
    live, exits = watches(store, 3)
    live[1].close()
    live[0].failed("JaxRuntimeError: Gloo AllGather failed: Connection reset by peer", 2)
    wait_for(lambda: len(exits) == 2)
    for w in live:
        w.close()
    assert exits == {0: 2, 2: 2}
    why = "process 1 of 3 stopped answering for 0.3 s (killed, or its host is down)"
    assert store.data["uvit_peers/stopped"] == why
    assert f"error: {why}; stopping process 0 too" in capfd.readouterr().err


def test_peer_timeout_is_read_from_the_environment():
    assert peer_timeout_s({}) == 30.0 and peer_timeout_s({"UVIT_PEER_TIMEOUT": "0"}) == 0.0
    with pytest.raises(ValueError, match=r"UVIT_PEER_TIMEOUT='soon': expected a number"):
        peer_timeout_s({"UVIT_PEER_TIMEOUT": "soon"})


# ---- configuration from the environment --------------------------------------------------------


def test_single_process_environments_do_nothing():
    assert distributed_arguments({}) is None
    assert distributed_arguments({"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}) is None
    assert distributed_arguments({"UVIT_DISTRIBUTED": "off", "SLURM_NTASKS": "8"}) is None
    single = {"UVIT_COORDINATOR": "h:1", "UVIT_NUM_PROCESSES": "1", "UVIT_PROCESS_ID": "0"}
    assert distributed_arguments(single) is None
    assert initialize_distributed({}) is False and not jax.distributed.is_initialized()


def test_explicit_and_automatic_environments():
    env = {"UVIT_COORDINATOR": "host0:1234", "UVIT_NUM_PROCESSES": "4", "UVIT_PROCESS_ID": "3"}
    assert distributed_arguments(env) == dict(
        coordinator_address="host0:1234", num_processes=4, process_id=3, initialization_timeout=300
    )
    jax_env = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed_arguments(jax_env)["process_id"] == 1
    slurm = {"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16", "UVIT_INIT_TIMEOUT": "60"}
    assert distributed_arguments(slurm) == dict(initialization_timeout=60)
    assert distributed_arguments({"UVIT_DISTRIBUTED": "auto"}) == dict(initialization_timeout=300)


@pytest.mark.parametrize(
    "env,message",
    [
        ({"UVIT_COORDINATOR": "h:1", "UVIT_PROCESS_ID": "0"}, r"UVIT_NUM_PROCESSES .*is not"),
        ({"UVIT_COORDINATOR": "h:1"}, r"UVIT_NUM_PROCESSES and UVIT_PROCESS_ID"),
        ({"UVIT_COORDINATOR": "h:1", "UVIT_NUM_PROCESSES": "2", "UVIT_PROCESS_ID": "2"},
         r"UVIT_PROCESS_ID=2 is outside \[0, UVIT_NUM_PROCESSES=2\)"),
        ({"UVIT_COORDINATOR": "h:1", "UVIT_NUM_PROCESSES": "two", "UVIT_PROCESS_ID": "0"},
         r"UVIT_NUM_PROCESSES='two' is not an integer"),
        ({"UVIT_DISTRIBUTED": "yes"}, r"UVIT_DISTRIBUTED='yes'; expected 'auto', 'off'"),
    ],
)  # fmt: skip
def test_incomplete_environments_are_named(env, message):
    with pytest.raises(DistributedConfigError, match=message):
        distributed_arguments(env)


# ---- the benchmark ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "config", ["fashion_mnist_uvit.py:runlocal", "mscoco_uvit_small.py:runlocal"]
)
@pytest.mark.integration
def test_benchmark_prints_both_programs_and_the_overhead(config):
    """launch/bench_train.py on 8 devices: class-conditional (labels) and text (contexts)."""
    import subprocess

    env = worker_env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, str(REPO / "launch/bench_train.py"),
           f"--config={REPO / 'configs' / config}", "--what=both", "--steps=1", "--warmup=1",
           "--sample_batch=8", "--peak_tflops=1"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for row in ("train step (bare jit)", "train step (ours)", "sample forward (guided, 2B)"):
        line = next(x for x in out.stdout.splitlines() if x.startswith(row))
        compile_s, step_ms, best_ms, images_s, tflops, mfu = line[len(row) :].split()[:6]
        assert float(step_ms) > 0 and float(images_s) > 0 and mfu.endswith("%")
    assert "8 x cpu" in out.stdout and re.search(r"our step / bare step: median \d", out.stdout)
    assert re.search(r"peak memory \(process max RSS\): \d+\.\d+ GiB", out.stdout)
