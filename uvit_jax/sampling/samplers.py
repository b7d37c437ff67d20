"""Every sampler by its `config.sample.sampler` name.

A sampler is a frozen dataclass instance, callable as

    sampler(noise_fn, x_T, formulation, *, steps, key) -> x_0

that runs from noise x_T [B, H, W, C] at t = T (1 for the paper's paths) to the sample in the
model's space, jittable, with `noise_fn(x, t_continuous) -> the network's target` (guidance
already applied; noise for the paper's models) and the run's `diffusion.formulation.Formulation`,
whose target every sampler converts to what it needs; `key` feeds stochastic samplers only. A
sampler written for some paths only has a `supports(formulation)` method. Its `predict_x0` says
whether it predicts data, the only kind that can threshold it: such a sampler has a
`thresholding` field, and `config.sample.thresholding` runs a copy with it set.

The DPM-Solver variants end at `schedule.t_end` (1e-4 VP, 1/1000 discrete, 1e-3 flow)
without a final denoising step, as U-ViT samples; `config.sample.denoise_to_zero` runs a copy
whose `denoise_to_zero` field adds one (a sampler without that field cannot).

A new sampler is one file in this folder with such a callable, and one line below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from uvit_jax.diffusion.formulation import Formulation
from uvit_jax.sampling import dpm_solver, euler_maruyama, heun, unipc, velocity_ode

SAMPLERS: dict[str, Callable[..., jax.Array]] = {
    # DPM-Solver, noise prediction, the order-3 fast schedule on the logSNR grid (VP models).
    "dpm_solver_fast": dpm_solver.Variant(
        "singlestep_fast", order=3, predict_x0=False, skip_type="logSNR"
    ),
    # DPM-Solver++, singlestep order 3 / multistep orders 2 and 3 (discrete models).
    "dpm_solver++_3s": dpm_solver.Variant("singlestep", order=3, predict_x0=True),
    "dpm_solver++_2m": dpm_solver.Variant("multistep", order=2, predict_x0=True),
    "dpm_solver++_3m": dpm_solver.Variant("multistep", order=3, predict_x0=True),
    # UniPC (data prediction, UniC corrector): bh2 order 2, diffusers' default and the paper's
    # choice for guided sampling; bh1 order 3, the paper's for unconditional sampling.
    "unipc_bh2": unipc.Variant("bh2", order=2),
    "unipc_bh1": unipc.Variant("bh1", order=3),
    # EDM's deterministic Heun on the Karras sigma grid.
    "heun": heun.Variant(),
    # Euler and Heun on the velocity ODE in t: how flow-matching models sample (SiT).
    "velocity_euler": velocity_ode.Variant(order=1),
    "velocity_heun": velocity_ode.Variant(order=2),
    # U-ViT's `sde.py`: the reverse SDE and the probability-flow ODE (variance-preserving paths).
    "euler_maruyama": euler_maruyama.Variant(probability_flow=False),
    "probability_flow": euler_maruyama.Variant(probability_flow=True),
}


def runs_on(sampler: Any, formulation: Formulation) -> bool:
    """Whether a sampler runs on the formulation's path (all do but those with a `supports`
    method that says otherwise)."""
    return getattr(sampler, "supports", lambda f: True)(formulation)
