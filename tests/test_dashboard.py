"""Dashboards: the noise-level ranges of the loss, interval means, flat hparams, the log line.
(The event file of a real run: tests/test_train.py.)"""

import jax.numpy as jnp
import numpy as np
import pytest

from configs.fashion_mnist_uvit import get_config
from uvit_jax.diffusion.formulation import Formulation
from uvit_jax.train import dashboard


def test_noise_levels_are_quarters_of_the_schedule():
    n = jnp.asarray([1, 250, 251, 500, 501, 750, 751, 1000], jnp.float32)
    sd, vp = Formulation("sd_discrete"), Formulation("vp_continuous")
    np.testing.assert_array_equal(sd.bucket(n, 4), [0, 0, 1, 1, 2, 2, 3, 3])
    assert sd.bucket_names(4) == ("n1-250", "n251-500", "n501-750", "n751-1000")
    t = jnp.asarray([0.0, 0.249, 0.251, 0.5, 0.74, 0.76, 1 - 1e-7], jnp.float32)
    np.testing.assert_array_equal(vp.bucket(999 * t, 4), [0, 0, 1, 2, 2, 3, 3])
    assert vp.bucket_names(4)[0] == "t0.00-0.25"


def step_metrics(loss, grad_norm, sums, counts):
    return dict(
        loss=jnp.float32(loss),
        grad_norm=jnp.float32(grad_norm),
        lr=jnp.float32(1e-3),
        loss_by_t_sum=jnp.asarray(sums, jnp.float32),
        loss_by_t_count=jnp.asarray(counts, jnp.float32),
    )


def test_interval_means_leave_out_nonfinite_steps_and_empty_levels():
    totals = dashboard.zero_totals(2)
    for m in (
        step_metrics(1.0, 4.0, [3.0, 1.0], [3, 1]),
        step_metrics(np.nan, 1.0, [np.nan, np.nan], [2, 2]),  # skipped: adds nothing
        step_metrics(2.0, 2.0, [8.0, 0.0], [4, 0]),
    ):
        totals = dashboard.add_step(totals, m)
    on_host = lambda t: {k: np.asarray(v) for k, v in t.items()}
    got = dashboard.interval_scalars(on_host(totals), ("a", "b"))
    assert got == pytest.approx({"loss": 1.5, "grad_norm": 3.0, "loss_by_t/a": 11 / 7,
                                 "loss_by_t/b": 1.0})  # fmt: skip
    assert dashboard.interval_scalars(on_host(dashboard.zero_totals(2)), ("a", "b")) == {}


def test_hparams_are_flat_config_fields():
    hparams = dashboard.flat_hparams(get_config("runlocal").to_dict())
    assert hparams["model.embed_dim"] == 32 and hparams["optim.lr"] == 4e-3
    assert hparams["model.conv"] is True and hparams["diffusion.formulation"] == "flow"
    assert hparams["sweep.steps"] == "()"  # tuples as their str: one hparam per field
    assert all(isinstance(v, int | float | bool | str) for v in hparams.values())


def test_progress_line():
    line = dashboard.progress_line(500, 6000, 0.0712345, 2.5)
    assert line == "step 500/6000  loss 0.0712345  2.50 steps/s  ETA 0:36:40"


def test_expected_time_line_extrapolates_the_first_interval_over_the_run():
    line = dashboard.expected_time_line(0, 100, 13_000, 21.38)
    assert line == (
        "expected training time 0:10:08 for steps 0-13000 (21.38 steps/s over steps 0-100 on "
        "this host); the steps left end in 0:10:03"
    )
    resumed = dashboard.expected_time_line(5000, 5100, 13_000, 20.0)  # a resumed run's own part
    assert resumed.startswith("expected training time 0:06:40 for steps 5000-13000 (")
    assert resumed.endswith("the steps left end in 0:06:35")
