"""Every sampler on every formulation against the exact answer: Gaussian data, whose
probability-flow ODE has a closed-form solution (`uvit_jax.sampling.gaussian_reference`).

    python launch/sampler_accuracy.py [--nfe 10,20,50]

For each formulation (path and target, as `config.diffusion` names them) and each deterministic
sampler of `config.sample.sampler`, with its own settings (grid, orders, end point), runs the
sampler in float64 from 16 draws of x_T at t = T to where it ends (t_end, or t = 0 for U-ViT's
probability-flow Euler) and prints the largest absolute error against the exact ODE solution
there, as a markdown table (docs/samplers.md#accuracy), and the order measured between the last
two NFE counts (errors ~ NFE^-order).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # noqa: E402

from uvit_jax.diffusion.formulation import Formulation  # noqa: E402
from uvit_jax.sampling import euler_maruyama  # noqa: E402
from uvit_jax.sampling.gaussian_reference import (  # noqa: E402
    exact_ode,
    gaussian_prediction,
    observed_order,
)
from uvit_jax.sampling.samplers import SAMPLERS  # noqa: E402

FORMULATIONS = (
    Formulation("vp_continuous", "eps"),
    Formulation("sd_discrete", "eps"),
    Formulation("sd_zero_snr", "v"),
    Formulation("flow", "velocity"),
)
X_T = np.random.RandomState(3).randn(16, 4)


def end_time(sampler, formulation: Formulation) -> float:
    """Where the sampler stops: U-ViT's SDE/ODE Euler at 0, the others at `schedule.t_end`."""
    return 0.0 if isinstance(sampler, euler_maruyama.Variant) else formulation.schedule.t_end


def max_error(name: str, formulation: Formulation, nfe: int) -> float:
    """The largest |x - exact| over X_T after `nfe` network evaluations, float64."""
    sampler = SAMPLERS[name]
    ns = formulation.schedule
    predict = gaussian_prediction(formulation)
    fn = jax.jit(lambda x: sampler(predict, x, formulation, steps=nfe, key=jax.random.key(0)))
    x = np.asarray(fn(jnp.asarray(X_T, jnp.float64)))
    exact = exact_ode(ns, X_T, end_time(sampler, formulation), t_start=ns.T)
    return float(np.abs(x - exact).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", default="10,20,50", help="comma-separated NFE counts")
    args = parser.parse_args()
    nfes = np.array([int(v) for v in args.nfe.split(",")])
    names = [n for n, s in SAMPLERS.items() if n != "euler_maruyama"]  # the SDE: no exact path
    head = ["sampler", "formulation", *[f"{n} NFE" for n in nfes], "order"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in names:
        for formulation in FORMULATIONS:
            supports = getattr(SAMPLERS[name], "supports", lambda f: True)
            if not supports(formulation):
                continue
            errors = np.array([max_error(name, formulation, int(n)) for n in nfes])
            cells = [name, f"{formulation.path}, {formulation.target}"]
            cells += [f"{e:.1e}" for e in errors]
            cells.append(f"{observed_order(errors, nfes):.2f}")
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
