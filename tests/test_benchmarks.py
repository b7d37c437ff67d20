"""The benchmarks' own machinery: the host line every row carries, programs timed in fresh
processes taking turns, the flags forwarded to them, and the official anchor's objective (it
must learn what our step learns, or the ratio compares two different jobs)."""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from uvit_jax.parallel import host

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))
import alternate  # noqa: E402

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse4_2 fma avx avx2 avx512f avx512_bf16 amx_bf16
cache size\t: 107520 KB

processor\t: 1
model name\t: another CPU the first one's fields must win over
flags\t\t: avx2
"""


def test_host_line_names_the_first_cpu_its_vector_extensions_cores_and_load():
    line = host.describe_host(CPUINFO)
    assert line.startswith(
        "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz "
        "(avx2 fma avx512f avx512_bf16 amx_bf16, cache 107520 KB), "
    )
    assert f", {host.usable_cores()} usable cores, " in line
    assert re.search(r"load average \d+\.\d\d \d+\.\d\d \d+\.\d\d$", line)
    assert host.cpu_model("") == ("unknown CPU", (), "")
    assert host.describe_host("").startswith("unknown CPU, ")


def _program(log: pathlib.Path, name: str, value: object) -> list[str]:
    code = f"open({str(log)!r}, 'a').write({name!r}); import alternate; alternate.emit({value!r})"
    return ["-c", f"import sys; sys.path.insert(0, {str(REPO / 'launch')!r}); {code}"]


@pytest.mark.integration  # subprocesses
def test_alternate_runs_each_program_in_turn_reversing_the_order_every_round(tmp_path):
    log = tmp_path / "order"
    programs = {"a": _program(log, "a", {"x": 1}), "b": _program(log, "b", [2, 3])}
    runs = alternate.alternate(programs, rounds=3)
    assert log.read_text() == "abbaab"
    assert runs == {"a": [{"x": 1}] * 3, "b": [[2, 3]] * 3}


@pytest.mark.integration
def test_alternate_names_the_program_that_failed_and_its_error(tmp_path):
    programs = {
        "fine": _program(tmp_path / "log", "fine", 1),
        "broken": ["-c", "raise SystemExit('no official_dir/libs/uvit.py')"],
    }
    with pytest.raises(RuntimeError, match=r"^broken: no official_dir/libs/uvit\.py$"):
        alternate.alternate(programs, rounds=1)
    value, error, _ = alternate.run_json(["-c", "print('nothing emitted')"])
    assert value is None and error == "nothing emitted"


def test_forwarded_arguments_drop_the_named_flags_in_every_spelling():
    argv = [
        "--config=configs/fashion_mnist_uvit.py:sd_noise", "--vs_official", "--rounds", "5",
        "--batch", "32", "--what=both", "--nobare", "--config.model.depth=4", "--rounds=2",
        "--novs_official",
    ]  # fmt: skip
    kept = alternate.without_flags(argv, ("vs_official", "rounds", "what", "bare"))
    assert kept == [
        "--config=configs/fashion_mnist_uvit.py:sd_noise", "--batch", "32",
        "--config.model.depth=4",
    ]  # fmt: skip


@pytest.mark.integration
def test_official_anchor_trains_the_configs_objective():
    """The anchor's noise levels, target coefficients and loss weights, for the default (flow
    matching: x_t = (1 - t) x_0 + t eps, velocity eps - x_0, unweighted) and its `sd_noise`
    variant (SD discrete schedule, noise target, min-SNR 5)."""
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO / "launch")!r})
        import bench_train
        from configs.fashion_mnist_uvit import get_config
        out = {{}}
        for arg in ("", "sd_noise"):
            levels = bench_train.official_levels(get_config(arg), 64, count=2)
            out[arg] = [[v.tolist() for v in row] for row in levels]
        print("LEVELS " + json.dumps(out))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("LEVELS "))
    levels = json.loads(line[len("LEVELS ") :])
    for row in levels[""]:
        t_net, alpha, sigma, c_x0, c_eps, weight = map(np.asarray, row)
        np.testing.assert_allclose(alpha + sigma, 1.0, atol=1e-6)  # the linear interpolant
        np.testing.assert_array_equal(c_x0, -1.0)
        np.testing.assert_array_equal(c_eps, 1.0)
        np.testing.assert_array_equal(weight, 1.0)
        assert len(set(sigma.tolist())) > 32  # drawn per example
        np.testing.assert_allclose(t_net, 999.0 * sigma, rtol=1e-5)
    for row in levels["sd_noise"]:
        t_net, alpha, sigma, c_x0, c_eps, weight = map(np.asarray, row)
        np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-5)
        np.testing.assert_array_equal(t_net, np.round(t_net))
        assert t_net.min() >= 1 and t_net.max() <= 1000
        np.testing.assert_array_equal(c_x0, 0.0)
        np.testing.assert_array_equal(c_eps, 1.0)
        snr = (alpha / sigma) ** 2
        np.testing.assert_allclose(weight, np.minimum(snr, 5.0) / snr, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.integration
def test_versus_official_times_both_steps_in_fresh_processes():
    """launch/bench_train.py --vs_official on the flow-matching default's runlocal variant."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)  # main.py's device split, as a user runs it
    cmd = [sys.executable, str(REPO / "launch/bench_train.py"),
           f"--config={REPO / 'configs/fashion_mnist_uvit.py'}:runlocal", "--vs_official",
           "--rounds=2", "--steps=2", "--warmup=1"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rounds = re.findall(r"^round (\d): ours [\d.]+ ms \(\d devices.*official / ours ([\d.]+)$",
                        out.stdout, re.M)  # fmt: skip
    assert [r for r, _ in rounds] == ["1", "2"]
    median = re.search(r"official step / our step: median ([\d.]+) of 2 rounds", out.stdout)
    expected = np.median([float(x) for _, x in rounds])
    assert median and abs(float(median.group(1)) - expected) < 1e-3
    assert re.search(r"^host: .+ usable cores, load average ", out.stdout, re.M)
