"""Samplers, all jittable, with U-ViT's classifier-free guidance.

- `dpm_solver`: DPM-Solver / DPM-Solver++ (orders 1-3, singlestep incl. the fast schedule,
  multistep) as one `lax.scan` over a precomputed coefficient table.
- `unipc`: UniPC (Zhao et al. 2023): the multistep predictor UniP with the corrector UniC.
- `heun`: EDM's deterministic second-order Heun sampler.
- `euler_maruyama`: reverse-SDE Euler-Maruyama and the probability-flow ODE.
- `samplers`: every sampler by its `config.sample.sampler` name.
- `guidance`: U-ViT apply function -> `noise_fn(x, t_continuous)` with the time map and
  classifier-free guidance in one batched forward pass.
- `generate`: `generate(model_fn, config, key, ...)` runs a config's sampler end to end, and
  `sample_images(graphdef, params, config, key, ...)` adds decoding for previews.
- `prompts`: text conditions of text-to-image models (prompts, or a dataset's captions).
"""
