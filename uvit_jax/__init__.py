"""uvit_jax: U-ViT diffusion models in JAX/Flax, from a laptop CPU to TPU pods and GPU clusters.

The notebook API (`uvit_jax.api`), imported on first use so that `import uvit_jax.<module>`
stays cheap:

    m = uvit_jax.load(workdir)                        # EMA weights + config, no trainer
    x = uvit_jax.sample(m, labels=range(10))          # [B, H, W, C] float32 in [-1, 1]
    plt.imshow(uvit_jax.grid(x))                      # uint8 [H', W', 3]
"""

_API = ("CheckpointError", "Loaded", "decode", "grid", "load", "load_guide", "sample")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from uvit_jax import api

        return getattr(api, name)
    raise AttributeError(f"module 'uvit_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
