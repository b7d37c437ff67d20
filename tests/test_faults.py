"""Fault injection: damaged checkpoints (fallback to the last good step, explicit steps refused),
non-finite states never saved, labels outside the model's classes, disk bounded by keep_ckpts,
the workdir lock, clean exits of main.py, and weight files that are not checkpoints. Each test
checks the outcome and the message."""

import json
import logging
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from runs import FAULT_KEEP as KEEP
from runs import FAULT_STEPS as STEPS
from runs import REPO, fault_config, poison_step, small_config, subprocess_env, train_cmd

import uvit_jax
from uvit_jax import checkpoints, workdir_lock
from uvit_jax.jobs import train as train_job
from uvit_jax.parallel.mesh import make_mesh
from uvit_jax.train.step import TrainProgram


def step_folders(workdir) -> list[str]:
    """Every folder under `checkpoints/` that holds or held a step, trash and temporary included."""
    root = pathlib.Path(workdir) / "checkpoints"
    return [p.name for p in root.iterdir() if p.is_dir()] + [
        f"trash/{p.name}" for p in (root / "trash").glob("*")
    ]


@pytest.fixture(scope="module")
def trained(fmnist_dir, tmp_path_factory):
    """A finished run (steps 5 and 6 kept) and the step folders seen before each save."""
    workdir = tmp_path_factory.mktemp("trained")
    seen = []
    real_save = checkpoints.save
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_job, "make_mesh", lambda cfg: make_mesh(cfg, jax.devices()[:1]))
        mp.setattr(checkpoints, "save", lambda m, *a, **k: (seen.append(step_folders(workdir)),
                                                             real_save(m, *a, **k)))  # fmt: skip
        train_job.train_job(fault_config(fmnist_dir), workdir)
    return workdir, seen


def copy_of(trained, tmp_path) -> pathlib.Path:
    shutil.copytree(trained[0], tmp_path / "w")
    return tmp_path / "w"


def largest_file(folder: pathlib.Path) -> pathlib.Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_bytes(path: pathlib.Path, count: int = 64) -> None:
    """Inverts `count` bytes in the middle of `path`, keeping its size (silent bit rot)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + count] = bytes(b ^ 0xFF for b in data[mid : mid + count])
    path.write_bytes(bytes(data))


# ---- damaged checkpoints -------------------------------------------------------------------------


def damage(step_dir: pathlib.Path, how: str) -> str:
    """Damages `step_dir` as `how` says; returns the pattern the rejection must contain."""
    ema_file = largest_file(step_dir / "ema")
    if how == "flipped":
        flip_bytes(ema_file)
        return rf"{ema_file} is corrupt: its SHA-256 differs"
    if how == "truncated":
        size = ema_file.stat().st_size
        os.truncate(ema_file, size // 2)
        return rf"{ema_file} is truncated or changed: {size // 2} bytes, saved {size}"
    if how == "missing":
        ema_file.unlink()
        return rf"{ema_file} is missing"
    if how == "empty":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
        return rf"{step_dir} is empty"
    if how == "garbage_config":
        (step_dir / "config" / "metadata").write_bytes(b"{not json\x00\xff")
        return rf"{step_dir / 'config'} is unreadable"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["flipped", "truncated", "missing", "empty", "garbage_config"])
@pytest.mark.integration
def test_load_falls_back_past_a_damaged_step(trained, tmp_path, caplog, how):
    workdir = copy_of(trained, tmp_path)
    reason = damage(workdir / "checkpoints" / str(STEPS), how)
    with caplog.at_level(logging.INFO):
        loaded = uvit_jax.load(workdir)
    assert loaded.step == STEPS - 1
    log = caplog.text
    assert f"skipping checkpoint step {STEPS}: " in log
    assert re.search(reason, log), log
    assert f"falling back to checkpoint step {STEPS - 1}" in log
    assert (
        f"loaded checkpoint step {STEPS - 1} from {workdir / 'checkpoints' / str(STEPS - 1)}" in log
    )


@pytest.mark.integration
def test_explicit_damaged_step_is_refused_with_path_and_reason(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    reason = damage(workdir / "checkpoints" / str(STEPS), "flipped")
    with pytest.raises(checkpoints.CheckpointError, match=reason):
        uvit_jax.load(workdir, step=STEPS)
    with pytest.raises(checkpoints.CheckpointError, match=reason):
        uvit_jax.load(workdir / "checkpoints" / str(STEPS))


@pytest.mark.integration
def test_every_step_damaged_is_an_error_listing_each(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    for step in (STEPS - 1, STEPS):
        damage(workdir / "checkpoints" / str(step), "flipped")
    with pytest.raises(checkpoints.CheckpointError,
                       match=rf"no restorable checkpoint in .*\n  step {STEPS}: .*corrupt"
                             rf"(.|\n)*step {STEPS - 1}: .*corrupt"):  # fmt: skip
        uvit_jax.load(workdir)


@pytest.mark.integration
def test_training_resumes_from_the_last_good_step(trained, fmnist_dir, tmp_path, caplog,
                                                  one_device):  # fmt: skip
    """Flipped bytes in the newest EMA file: the run warns, resumes from the step before, sets
    the damaged one aside, and ends where the undamaged run ended, bitwise."""
    workdir = copy_of(trained, tmp_path)
    reason = damage(workdir / "checkpoints" / str(STEPS), "flipped")
    with caplog.at_level(logging.INFO):
        train_job.train_job(fault_config(fmnist_dir), workdir)
    assert re.search(rf"skipping checkpoint step {STEPS}: {reason}", caplog.text)
    assert f"resumed from step {STEPS - 1}" in caplog.text
    rejected = list((workdir / "checkpoints" / "rejected").iterdir())
    assert [p.name.split("-")[0] for p in rejected] == [str(STEPS)]
    assert f"moved the failed checkpoint step {STEPS} to {rejected[0]}" in caplog.text
    want, got = uvit_jax.load(trained[0]), uvit_jax.load(workdir)
    assert got.step == STEPS
    for a, b in zip(jax.tree.leaves(want.params), jax.tree.leaves(got.params), strict=True):
        np.testing.assert_array_equal(a, b)


# ---- non-finite states and bad labels ------------------------------------------------------------


@pytest.mark.parametrize("ckpt_every,log_every,last_good", [(1, 5, 3), (5, 1, None)])
@pytest.mark.integration
def test_nonfinite_state_is_never_saved(fmnist_dir, tmp_path, monkeypatch, one_device,
                                        ckpt_every, log_every, last_good):  # fmt: skip
    """Whatever the order of the intervals, the step after the bad one saves nothing and the
    message names the bad step and the newest checkpoint, which is from before it."""
    poison_step(monkeypatch, at=3)
    c = fault_config(fmnist_dir, ckpt_every=ckpt_every, log_every=log_every, keep_ckpts=10)
    good = "no checkpoint yet" if last_good is None else f"last good checkpoint is step {last_good}"
    with pytest.raises(train_job.NonFiniteLossError, match=rf"at step 3 \(not applied\); .*{good}"):
        train_job.train_job(c, tmp_path)
    steps = checkpoints.open_manager(tmp_path, read_only=True).all_steps()
    assert list(steps) == ([] if last_good is None else list(range(1, last_good + 1)))


def test_nonfinite_weights_are_refused_before_saving():
    """Weights that are not finite (which a skipped step cannot cause) are never saved."""
    from uvit_jax.train.optimizer import make_optimizer
    from uvit_jax.train.state import create_train_state

    config = small_config()
    mesh = make_mesh(dict(data=1, fsdp=1), jax.devices()[:1])
    state = create_train_state(config.model, make_optimizer(config.optim, 10), mesh, 0)
    train_job.check_finite(state, "stop", None)
    bad = state.replace(ema=jax.tree.map(lambda x: x * np.nan, state.ema))
    with pytest.raises(train_job.NonFiniteLossError,
                       match=r"non-finite weights \(params or EMA\) after step 0: not saved; "
                             r"the last good checkpoint is step 7"):  # fmt: skip
        train_job.check_finite(bad, "skip", 7)


def test_labels_outside_the_models_classes_are_refused(fmnist_dir, tmp_path, monkeypatch,
                                                       one_device):  # fmt: skip
    c = fault_config(fmnist_dir)
    c.model.num_classes = 6  # 5 classes + the null class; Fashion-MNIST has 10
    monkeypatch.setattr(TrainProgram, "compile", lambda *a: pytest.fail("compiled"))
    with pytest.raises(train_job.ConfigError,
                       match=rf"dataset 'fashion_mnist' \({fmnist_dir}\) has label [5-9], but "
                             r"config.model.num_classes=6 gives 5 classes plus the null class: "
                             r"expected labels in \[0, 5\)"):  # fmt: skip
        train_job.train_job(c, tmp_path)


# ---- disk ----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_keep_ckpts_bounds_the_disk_during_the_run(trained):
    """Before every save: at most keep_ckpts steps, the one being written, one in the trash."""
    workdir, seen = trained
    assert len(seen) == STEPS
    assert max(len(folders) for folders in seen) <= KEEP + 2, seen
    assert sorted(step_folders(workdir)) == [str(STEPS - 1), str(STEPS)]


# ---- the workdir lock ----------------------------------------------------------------------------


def write_lock(workdir: pathlib.Path, **holder) -> None:
    record = dict(host=socket.gethostname(), started="2026-01-02T03:04:05", heartbeat=time.time())
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / workdir_lock.LOCK).write_text(json.dumps(dict(record, **holder)))


def run_main(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], capture_output=True,
                          text=True, env=env or subprocess_env(), timeout=300)  # fmt: skip


@pytest.mark.integration
def test_second_trainer_on_a_locked_workdir_exits_naming_the_holder(fmnist_dir, tmp_path):
    holder = subprocess.Popen(["sleep", "300"])  # a live process on this host holds the lock
    try:
        write_lock(tmp_path / "w", pid=holder.pid)
        run = subprocess.run(train_cmd(tmp_path / "w", fmnist_dir), capture_output=True,
                             text=True, env=subprocess_env(), timeout=300)  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'w'} is in use by another training run: host "
        f"{socket.gethostname()}, pid {holder.pid}, started 2026-01-02T03:04:05 "
        f"({tmp_path / 'w' / workdir_lock.LOCK}); stop it or use another --workdir"
    )
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "w" / "checkpoints").exists(), "nothing may run before the lock"


def test_stale_locks_are_taken_over_and_released(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_lock(tmp_path, pid=dead.pid)
    with caplog.at_level(logging.WARNING), workdir_lock.hold(str(tmp_path)):
        assert json.loads((tmp_path / workdir_lock.LOCK).read_text())["pid"] == os.getpid()
    assert f"pid {dead.pid} on this host is not running" in caplog.text
    assert not (tmp_path / workdir_lock.LOCK).exists()

    write_lock(
        tmp_path, host="another-host", pid=1, heartbeat=time.time() - 2 * workdir_lock.STALE_S
    )
    with caplog.at_level(logging.WARNING), workdir_lock.hold(str(tmp_path)):
        pass
    taken = r"taking over the lock .* of host another-host, pid 1, started 2026-01-02T03:04:05: "
    assert re.search(taken + r"its last heartbeat was 1\d\d\d s ago", caplog.text)

    write_lock(tmp_path, host="another-host", pid=1)  # alive as far as anyone here can tell
    with pytest.raises(workdir_lock.WorkdirLockedError, match="host another-host, pid 1"):
        workdir_lock.acquire(str(tmp_path))


@pytest.mark.integration
def test_a_finished_run_leaves_no_lock(trained):
    assert not (trained[0] / workdir_lock.LOCK).exists()


# ---- clean exits ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_config_error_is_one_line_and_exit_status_2(tmp_path):
    args = ["--config", f"{REPO / 'configs/fashion_mnist_uvit.py'}:runlocal",
            "--workdir", str(tmp_path), "--config.train.ckpt_every=0"]  # fmt: skip
    run = run_main(*args)
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1] == (
        "error: config.train.ckpt_every=0: expected an integer >= 1"
    )
    assert "Traceback" not in run.stderr
    debug = run_main(*args, env=dict(subprocess_env(), UVIT_DEBUG="1"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.mark.parametrize("suffix", [".pth", ".npz", ".safetensors"])
def test_garbage_weight_files_are_named_without_unsafe_advice(tmp_path, suffix):
    from uvit_jax.convert.state_dict import ConversionError, load_state_dict

    path = tmp_path / f"nnet_ema{suffix}"
    path.write_bytes(b"<html>not found</html>" * 10)
    with pytest.raises(ConversionError, match=rf"{path}: not a .* checkpoint \(expected ") as e:
        load_state_dict(path)
    assert "weights_only" not in str(e.value) and "allow_pickle" not in str(e.value)


@pytest.mark.integration
def test_convert_of_a_garbage_file_exits_2_naming_it(tmp_path):
    path = tmp_path / "nnet_ema.pth"
    path.write_bytes(b"\x80\x02garbage")
    run = run_main("--config", str(REPO / "configs/fashion_mnist_uvit.py"), "--mode", "convert",
                   "--workdir", str(tmp_path / "w"), f"--config.convert.source={path}")  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {path}: not a PyTorch checkpoint (expected a state dict")
    assert "weights_only" not in run.stderr


# ---- saves that fail -----------------------------------------------------------------------------


@pytest.mark.integration
def test_a_failed_save_stops_the_run_naming_step_and_error(fmnist_dir, tmp_path, monkeypatch,
                                                          one_device):  # fmt: skip
    """A full disk while step 3 is written (here: its checksums) stops the run with the path
    and the error; steps 1 and 2 stay intact."""
    real = checkpoints.write_checksums

    def disk_full(step_dir):
        if step_dir.name.startswith("3."):
            raise OSError(28, "No space left on device", str(step_dir))
        real(step_dir)

    monkeypatch.setattr(checkpoints, "write_checksums", disk_full)
    with pytest.raises(checkpoints.CheckpointError,
                       match=rf"saving checkpoint step 3 into {tmp_path / 'checkpoints'} failed "
                             r"\(OSError: \[Errno 28\] No space left on device: .*3\.orbax-check"
                             r"point-tmp'\); the steps saved before it are intact"):  # fmt: skip
        train_job.train_job(fault_config(fmnist_dir, keep_ckpts=10), tmp_path)
    assert [uvit_jax.load(tmp_path, step=s).step for s in (1, 2)] == [1, 2]
    assert not (tmp_path / workdir_lock.LOCK).exists()


READ_ONLY_RUN = """
import subprocess, sys
import conftest  # noqa: F401  (the tests' devices and compilation cache)
import jax
from runs import fault_config, small_config
from uvit_jax import checkpoints
from uvit_jax.jobs import train as train_job
from uvit_jax.parallel.mesh import make_mesh

train_job.make_mesh = lambda cfg: make_mesh(cfg, jax.devices()[:1])
real = checkpoints.save

def read_only_from_step_3(manager, step, **kw):
    if step == 3:  # the folder turns read-only once step 2 is written (remounting a folder
        manager.wait_until_finished()  # with files open for writing fails: "busy")
        d = str(manager.directory)
        subprocess.run(["mount", "--bind", d, d], check=True)
        subprocess.run(["mount", "-o", "remount,ro,bind", d], check=True)
    return real(manager, step, **kw)

checkpoints.save = read_only_from_step_3
train_job.train_job(fault_config(sys.argv[1], keep_ckpts=10), sys.argv[2])
"""


@pytest.mark.integration
def test_a_folder_turning_read_only_stops_the_run_without_hanging(fmnist_dir, tmp_path):
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs a mount namespace (unshare -m) to make a folder read-only")
    (tmp_path / "run.py").write_text(READ_ONLY_RUN)
    env = dict(subprocess_env(), PYTHONPATH=f"{REPO / 'tests'}{os.pathsep}{REPO}")
    run = subprocess.run(["unshare", "-m", sys.executable, str(tmp_path / "run.py"), fmnist_dir,
                          str(tmp_path / "w")], capture_output=True, text=True, env=env,
                         timeout=120)  # fmt: skip
    assert run.returncode != 0
    failed = rf"CheckpointError: saving checkpoint step 3 into {tmp_path / 'w' / 'checkpoints'} "
    assert re.search(failed + r"failed \(.*Read-only file system", run.stderr), run.stderr[-3000:]
    assert sorted(step_folders(tmp_path / "w")) == ["1", "2"]
