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

jax.config.update("jax_platforms", "cpu")

from uvit_jax.diffusion.formulation import Formulation  # noqa: E402
from uvit_jax.sampling.gaussian_reference import observed_order, sampler_error  # noqa: E402
from uvit_jax.sampling.samplers import SAMPLERS, runs_on  # noqa: E402

FORMULATIONS = (
    Formulation("vp_continuous", "eps"),
    Formulation("sd_discrete", "eps"),
    Formulation("sd_zero_snr", "v"),
    Formulation("flow", "velocity"),
)
X_T = np.random.RandomState(3).randn(16, 4)


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
            if not runs_on(SAMPLERS[name], formulation):
                continue
            errors = np.array([sampler_error(name, formulation, int(n), X_T) for n in nfes])
            cells = [name, f"{formulation.path}, {formulation.target}"]
            cells += [f"{e:.1e}" for e in errors]
            cells.append(f"{observed_order(errors, nfes):.2f}")
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
