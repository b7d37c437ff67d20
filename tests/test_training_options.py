"""Training options beyond the paper: the noise-level weightings and the EMA warm-up against
their formulas (the paper configs keep both off), and the embedded default's variants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist_uvit, paper
from uvit_jax.diffusion.formulation import Formulation
from uvit_jax.diffusion.objective import example_losses, loss_weights, noised_input
from uvit_jax.diffusion.schedules import DiscreteSchedule, LinearVPSchedule
from uvit_jax.train.optimizer import ema_decay


@pytest.mark.parametrize("formulation", ["sd_discrete", "vp_continuous"])
def test_noised_input_reports_the_snr_of_each_example(formulation):
    x0 = jax.random.normal(jax.random.key(0), (64, 4, 4, 1))
    x_t, eps, level = noised_input(jax.random.key(1), x0, Formulation(formulation))
    t_net, snr = level.t_net, (level.alpha / level.sigma) ** 2
    if formulation == "sd_discrete":
        abar = DiscreteSchedule().alphas_cumprod[np.asarray(t_net).astype(int) - 1]
        expected = abar / (1 - abar)
    else:
        t = np.asarray(t_net, np.float64) / 999
        s = LinearVPSchedule()
        expected = (s.marginal_alpha(t) / s.marginal_std(t)) ** 2
    np.testing.assert_allclose(snr, expected, rtol=2e-4)
    # x_t = alpha x0 + sigma eps with alpha^2 + sigma^2 = 1: alpha^2 = snr / (1 + snr).
    alpha = np.sqrt(snr / (1 + snr))[:, None, None, None]
    np.testing.assert_allclose(x_t, alpha * x0 + np.sqrt(1 - alpha**2) * eps, atol=1e-5)


def test_min_snr_weights_follow_hang_et_al():
    snr = jnp.asarray([0.01, 1.0, 5.0, 20.0, 1e4])
    np.testing.assert_allclose(loss_weights(snr), np.ones(5))
    # Noise prediction: min(SNR, gamma) / SNR; 1 for noisy examples, gamma / SNR for clean ones.
    np.testing.assert_allclose(loss_weights(snr, "min_snr", 5.0), [1, 1, 1, 0.25, 5e-4], rtol=1e-6)
    # v-prediction's loss: 1 + 1 / SNR (x0 weight SNR + 1).
    np.testing.assert_allclose(loss_weights(snr, "snr_plus_one"), 1 + 1 / np.asarray(snr))
    with pytest.raises(ValueError, match=r"loss_weighting='p2'.*none.*min_snr"):
        loss_weights(snr, "p2")


def test_weighted_loss_is_the_mean_of_weighted_errors():
    x0 = jax.random.normal(jax.random.key(2), (32, 4, 4, 1))
    key = jax.random.key(3)
    zero = lambda x_t, t: jnp.zeros_like(x_t)  # error = eps^2
    sd = Formulation("sd_discrete")
    _, eps, level = noised_input(key, x0, sd)
    snr = (level.alpha / level.sigma) ** 2
    per_example = np.mean(np.asarray(eps) ** 2, axis=(1, 2, 3))
    plain, _ = example_losses(zero, key, x0, sd)
    weighted, _ = example_losses(zero, key, x0, sd, weighting="min_snr", gamma=2.0)
    assert float(jnp.mean(plain)) == pytest.approx(per_example.mean(), rel=1e-6)
    w = np.minimum(np.asarray(snr), 2.0) / np.asarray(snr)
    assert float(jnp.mean(weighted)) == pytest.approx((w * per_example).mean(), rel=1e-6)


def test_ema_warmup_decay():
    assert ema_decay(jnp.asarray(5), 0.999, warmup=False) == 0.999
    steps = jnp.asarray([0, 10, 90, 10_000])
    np.testing.assert_allclose(
        ema_decay(steps, 0.999, warmup=True), [0.1, 11 / 20, 91 / 100, 0.999], rtol=1e-6
    )


def test_paper_configs_keep_the_paper_objective():
    for name in paper.PAPER:
        c = paper.paper_config(name)
        assert c.diffusion.loss_weighting == "none", name
        assert c.train.ema_warmup is False, name


def test_default_variants():
    new, old = fashion_mnist_uvit.get_config(), fashion_mnist_uvit.get_config("paper_recipe")
    assert (new.model.img_size, new.diffusion.formulation, new.diffusion.target) == (
        28, "flow", "velocity"
    )  # fmt: skip
    # The previous default, the yardstick of the objectives: noise target, min-SNR 5.
    noise = fashion_mnist_uvit.get_config("sd_noise")
    assert (noise.diffusion.formulation, noise.diffusion.target) == ("sd_discrete", "eps")
    assert (noise.diffusion.loss_weighting, noise.model.pos_embed) == ("min_snr", "learned_1d")
    assert (noise.train.batch_size, noise.train.num_steps, noise.optim.lr) == (16, 13_000, 2e-3)
    assert (new.train.batch_size, new.train.num_steps, new.optim.lr) == (32, 7_600, 4e-3)
    assert (new.optim.name, new.data.random_flip) == ("muon", False)
    assert (noise.optim.name, noise.data.random_flip) == ("adamw", True)  # as measured
    # The default before it, to rerun the comparison: padded 32 x 32, the paper's loss.
    assert (old.model.img_size, old.data.resolution, old.diffusion.loss_weighting) == (
        32,
        32,
        "none",
    )
    assert old.sample.cfg_scale == 1.0 and old.train.num_steps == 3000
    # The default decays its learning rate; the paper recipe holds it (the paper's schedule).
    assert (new.optim.schedule, old.optim.schedule) == ("cosine", "constant")
    tiny = fashion_mnist_uvit.get_config("paper_recipe,runlocal")
    assert tiny.model.img_size == 32 and tiny.train.num_steps == 20
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['runlocall'\].*paper_recipe"):
        fashion_mnist_uvit.get_config("runlocall")
