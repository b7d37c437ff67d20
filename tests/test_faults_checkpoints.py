"""Fault injection, round two: a step that lost its checksums manifest, a trainer whose workdir
lock was taken over, `lock.json` files that are not lock records, and a step deleted while
`uvit_jax.load` reads it. Each test checks the outcome and the message."""

import json
import logging
import os
import pathlib
import re
import shutil
import socket
import time

import jax
import numpy as np
import pytest
from runs import FAULT_STEPS as STEPS
from runs import fault_config, poison_step

import uvit_jax
from uvit_jax import checkpoints, workdir_lock
from uvit_jax.errors import UserError
from uvit_jax.jobs import train as train_job
from uvit_jax.parallel.mesh import make_mesh


@pytest.fixture(scope="module")
def trained(fmnist_dir, tmp_path_factory) -> pathlib.Path:
    """A finished run: steps 5 and 6 kept."""
    workdir = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_job, "make_mesh", lambda cfg: make_mesh(cfg, jax.devices()[:1]))
        train_job.train_job(fault_config(fmnist_dir), workdir)
    return workdir


def copy_of(workdir, tmp_path) -> pathlib.Path:
    shutil.copytree(workdir, tmp_path / "w")
    return tmp_path / "w"


def flip_ema_bytes(step_dir: pathlib.Path, count: int = 64) -> None:
    """Inverts `count` bytes in the middle of the largest EMA file (silent bit rot)."""
    path = max((p for p in (step_dir / "ema").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)  # fmt: skip
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + count] = bytes(b ^ 0xFF for b in data[mid : mid + count])
    path.write_bytes(bytes(data))


# ---- 1. a lost checksums manifest ----------------------------------------------------------------


def lose_manifest(step_dir: pathlib.Path, how: str) -> str:
    """Flips EMA bytes, then loses the manifest as `how` says; the rejection pattern."""
    flip_ema_bytes(step_dir)
    record = step_dir / checkpoints.CHECKSUMS
    if how == "deleted":
        record.unlink()
        return re.escape(f"{record} is missing, but the step was saved with checksums")
    saved = json.loads(record.read_text())
    del saved["items"]["ema"]
    record.write_text(json.dumps(saved))
    return re.escape(f"{record} has no entry for the `ema` item")


@pytest.mark.parametrize("how", ["deleted", "no_ema_entry"])
@pytest.mark.integration
def test_a_step_that_lost_its_checksums_is_damaged(trained, tmp_path, caplog, how):
    workdir = copy_of(trained, tmp_path)
    reason = lose_manifest(workdir / "checkpoints" / str(STEPS), how)
    with caplog.at_level(logging.INFO):
        assert uvit_jax.load(workdir).step == STEPS - 1
    assert re.search(rf"skipping checkpoint step {STEPS}: {reason}", caplog.text), caplog.text
    with pytest.raises(checkpoints.CheckpointError, match=reason):
        uvit_jax.load(workdir, step=STEPS)
    with checkpoints.open_manager(workdir, read_only=True) as m:
        assert checkpoints.good_step(m, None, ("ema",)) == STEPS - 1


@pytest.mark.integration
def test_old_steps_without_the_flag_still_load_unverified(trained, tmp_path, caplog):
    """A step written before checksums existed: no manifest, no flag in its config record."""
    workdir = copy_of(trained, tmp_path)
    step_dir = workdir / "checkpoints" / str(STEPS)
    (step_dir / checkpoints.CHECKSUMS).unlink()
    metadata = step_dir / "config" / "metadata"
    record = json.loads(metadata.read_text())
    assert record.pop("checksums") is True
    metadata.write_text(json.dumps(record))
    with caplog.at_level(logging.INFO):
        assert uvit_jax.load(workdir).step == STEPS
    assert f"checkpoint step {STEPS} has no checksums.json (older uvit_jax): not verified" in (
        caplog.text
    )


@pytest.mark.integration
def test_training_sets_aside_a_step_that_lost_its_checksums(trained, fmnist_dir, tmp_path, caplog,
                                                            monkeypatch, one_device):  # fmt: skip
    """Training resumes from the step before, moves the damaged one to rejected/, and "the last
    good checkpoint" of a later non-finite stop is the verified step, not the damaged one."""
    workdir = copy_of(trained, tmp_path)
    reason = lose_manifest(workdir / "checkpoints" / str(STEPS), "deleted")
    poison_step(monkeypatch, at=0)  # the first step after the resume
    with (
        caplog.at_level(logging.INFO),
        pytest.raises(
            train_job.NonFiniteLossError,
            match=rf"at step {STEPS - 1} \(not applied\); the last good checkpoint is "
            rf"step {STEPS - 1}\.",
        ),
    ):
        train_job.train_job(fault_config(fmnist_dir, num_steps=STEPS + 2), workdir)
    assert re.search(rf"skipping checkpoint step {STEPS}: {reason}", caplog.text)
    assert f"resumed from step {STEPS - 1}" in caplog.text
    rejected = list((workdir / "checkpoints" / "rejected").iterdir())
    assert [p.name.split("-")[0] for p in rejected] == [str(STEPS)]


# ---- 4. the lock as a fence ----------------------------------------------------------------------


def write_lock(workdir: pathlib.Path, **holder) -> None:
    record = dict(host=socket.gethostname(), started="2026-01-02T03:04:05", heartbeat=time.time())
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / workdir_lock.LOCK).write_text(json.dumps(dict(record, **holder)))


def test_check_stops_a_holder_whose_lock_was_taken_over(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
    lock = tmp_path / workdir_lock.LOCK
    workdir_lock.check(str(tmp_path))  # no lock held here: nothing to check
    with caplog.at_level(logging.ERROR), workdir_lock.hold(str(tmp_path)):
        workdir_lock.check(str(tmp_path))
        write_lock(tmp_path, host="another-host", pid=1)
        time.sleep(0.5)
        assert f"{lock} was taken over by another process" in caplog.text
        with pytest.raises(
            workdir_lock.LockLostError,
            match=rf"^{re.escape(str(lock))}: this run no longer holds the workdir lock \(host "
            r"another-host, pid 1, started 2026-01-02T03:04:05 holds it now; a run that stalls "
            r"for over 600 s without a heartbeat is taken over\): stopped before writing a "
            r"checkpoint beside another trainer$",
        ):
            workdir_lock.check(str(tmp_path))
    assert json.loads(lock.read_text())["host"] == "another-host", "not ours to release"
    assert issubclass(workdir_lock.LockLostError, UserError)  # main.py: one line, exit 2

    other = tmp_path / "b"
    other.mkdir()
    with workdir_lock.hold(str(other)):
        (other / workdir_lock.LOCK).unlink()  # taken over, and released by the taker since
        with pytest.raises(workdir_lock.LockLostError, match=r"\(the file is gone; "):
            workdir_lock.check(str(other))


@pytest.mark.integration
def test_a_trainer_whose_lock_was_taken_over_stops_before_saving(
    fmnist_dir, tmp_path, monkeypatch, one_device
):
    """Stalled past STALE_S after step 2 (its lock taken over meanwhile), the trainer writes
    nothing more and leaves the new holder's lock in place."""
    real = checkpoints.save

    def save_then_stall(manager, step, **kw):
        real(manager, step, **kw)
        if step == 2:
            write_lock(tmp_path, host="another-host", pid=1)

    monkeypatch.setattr(checkpoints, "save", save_then_stall)
    with pytest.raises(workdir_lock.LockLostError, match=r"lock.json: this run no longer holds"):
        train_job.train_job(fault_config(fmnist_dir, keep_ckpts=10), tmp_path)
    with checkpoints.open_manager(tmp_path, read_only=True) as m:
        assert list(m.all_steps()) == [1, 2]
    assert json.loads((tmp_path / workdir_lock.LOCK).read_text())["host"] == "another-host"


# ---- 11. SIGTERM before the first step ---------------------------------------------------------


@pytest.mark.integration
def test_sigterm_during_compile_stops_in_one_line_and_one_in_the_loop_saves(
    trained, fmnist_dir, tmp_path, monkeypatch, one_device
):
    """Before the first step there is nothing new to save: the run stops as soon as the compile
    returns, its checkpoints and lock untouched; from the first step on, SIGTERM saves and stops
    after the step it arrived in."""
    import signal

    from uvit_jax.errors import StoppedBeforeTraining

    workdir = copy_of(trained, tmp_path)
    config = fault_config(fmnist_dir, num_steps=STEPS + 3)
    before = signal.getsignal(signal.SIGTERM)

    def sigterm_then(real):
        return lambda *a: (os.kill(os.getpid(), signal.SIGTERM), real(*a))[1]

    with monkeypatch.context() as m:
        m.setattr(train_job, "compile_step", sigterm_then(train_job.compile_step))
        with pytest.raises(StoppedBeforeTraining, match=r"^SIGTERM before the first step \(se"):
            train_job.train_job(config, workdir)
    assert not (workdir / workdir_lock.LOCK).exists()
    with checkpoints.open_manager(workdir, read_only=True) as manager:
        assert list(manager.all_steps()) == [STEPS - 1, STEPS]
    assert signal.getsignal(signal.SIGTERM) is before

    monkeypatch.setattr(train_job, "train_loop", sigterm_then(train_job.train_loop))
    state = train_job.train_job(config, workdir)
    assert int(state.step) == STEPS + 1
    with checkpoints.open_manager(workdir, read_only=True) as manager:
        assert manager.latest_step() == STEPS + 1


# ---- 10. lock files that are not lock records ----------------------------------------------------


@pytest.mark.parametrize("content,fault", [
    ("[1, 2]", "is not a lock record: it holds a JSON list, expected an object with host, pid "
               "and heartbeat"),
    ('{"host": "h", "pid": 1, "heartbeat": "soon"}',
     "is not a lock record: it has heartbeat 'soon', not a number"),
    ('{"host": "h", "pid": 1}', "is not a lock record: it has no heartbeat"),
    (None, "is a directory, not a lock file"),
])  # fmt: skip
def test_a_lock_file_that_is_no_lock_record_is_one_line_naming_it(tmp_path, content, fault):
    lock = tmp_path / workdir_lock.LOCK
    if content is None:
        lock.mkdir()
    else:
        lock.write_text(content)
    with pytest.raises(workdir_lock.LockFileError) as e:
        with workdir_lock.hold(str(tmp_path)):
            pytest.fail("held")
    assert str(e.value) == f"{lock} {fault}; delete it if no trainer uses {tmp_path}"
    assert isinstance(e.value, UserError)


def test_a_lock_file_that_is_not_json_is_taken_over_once_stale(tmp_path, caplog):
    lock = tmp_path / workdir_lock.LOCK
    lock.write_bytes(b'{"host": "h", "pi')  # a holder killed while writing it
    old = time.time() - 2 * workdir_lock.STALE_S
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING), workdir_lock.hold(str(tmp_path)):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert re.search(r"taking over the lock .*: it is not JSON and was last written 1\d\d\d s ago "
                     r"\(stale after 600 s\)", caplog.text), caplog.text  # fmt: skip
    assert "heartbeat" not in caplog.text

    lock.write_bytes(b"")  # created an instant ago: its holder may be writing it
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=rf"^{re.escape(str(lock))} is not JSON and was written \d s ago: a "
                             r"trainer may be starting in .*; retry, or delete the file if none "
                             r"is$"):  # fmt: skip
        workdir_lock.acquire(str(tmp_path))


def test_release_leaves_a_replaced_lock_file_alone(tmp_path):
    with workdir_lock.hold(str(tmp_path)):
        (tmp_path / workdir_lock.LOCK).write_text("[]")
    assert (tmp_path / workdir_lock.LOCK).read_text() == "[]"


# ---- 14. a step deleted while load reads it ------------------------------------------------------


@pytest.mark.integration
def test_load_picks_again_when_the_chosen_step_vanishes(trained, tmp_path, caplog, monkeypatch):
    """A trainer's keep-N moves the step `load` chose into the trash before it is read."""
    workdir = copy_of(trained, tmp_path)
    root = workdir / "checkpoints"
    real = checkpoints.good_step
    picked = []

    def then_trashed(manager, step, items):
        chosen = real(manager, step, items)
        if not picked:
            (root / "trash").mkdir(exist_ok=True)
            (root / str(chosen)).rename(root / "trash" / str(chosen))
        picked.append(chosen)
        return chosen

    monkeypatch.setattr(checkpoints, "good_step", then_trashed)
    with caplog.at_level(logging.WARNING):
        loaded = uvit_jax.load(workdir)
    assert (loaded.step, picked) == (STEPS - 1, [STEPS, STEPS - 1])
    assert (f"checkpoint step {STEPS} vanished from {root} while it was read (a trainer deleted "
            "it): reading the newest good step again") in caplog.text  # fmt: skip

    # Asked for by number, the vanished step is an error naming it, not a FileNotFoundError.
    (root / "trash" / str(STEPS)).rename(root / str(STEPS))
    picked.clear()
    with pytest.raises(
        checkpoints.CheckpointError,
        match=rf"^{re.escape(str(root / str(STEPS)))} vanished while it was read",
    ):
        uvit_jax.load(workdir, step=STEPS)  # fmt: skip


# ---- 17. a resume on another device count ------------------------------------------------------


@pytest.mark.integration
def test_a_resume_on_another_device_count_continues_the_data_and_differs_by_rounding(
    fmnist_dir, tmp_path, monkeypatch
):
    """What the README promises: 4 steps on 2 devices then 4 on 1 give the uninterrupted
    2-device run's weights up to float rounding (the all-reduce sums in another order); the
    next batches are the same ones (another batch would move the weights by ~lr = 2e-3)."""

    def train_on(devices: int, workdir, num_steps: int):
        monkeypatch.setattr(
            train_job, "make_mesh", lambda cfg: make_mesh(cfg, jax.devices()[:devices])
        )
        config = fault_config(fmnist_dir, num_steps=num_steps, ckpt_every=4, keep_ckpts=4)
        config.mesh.update(data=-1, fsdp=1)
        return train_job.train_job(config, workdir)

    straight = train_on(2, tmp_path / "straight", 8)
    train_on(2, tmp_path / "resumed", 4)
    resumed = train_on(1, tmp_path / "resumed", 8)
    assert int(resumed.step) == int(straight.step) == 8
    worst = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(
            jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params), strict=True
        )
    )
    assert worst < 1e-5, worst
