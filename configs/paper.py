"""The paper's configurations (Bao et al. 2023, Table/Appendix; SPEC section 2) as one table.

Each `configs/<name>.py` is `get_config(arg)` = `paper_config("<name>", arg)`. Arguments (joined
with commas, e.g. `--config configs/mscoco_uvit_small.py:deep,runlocal`):
  runlocal  a tiny model, batch and schedule for CPU smoke runs (big_vision's convention);
  deep      MS-COCO only: U-ViT-S-Deep (depth 16), the paper's 5.48 FID model.
"""

from __future__ import annotations

import ml_collections

from uvit_jax.config_defaults import MODEL_SIZES, default_config

# Reference statistics as the official release names them (users download them themselves).
_REF = {
    "cifar10": "fid_stats_cifar10_train_pytorch.npz",
    "celeba64": "fid_stats_celeba64_train_50000_ddim.npz",
    "imagenet64": "fid_stats_imagenet64_guided_diffusion.npz",
    "imagenet256": "fid_stats_imagenet256_guided_diffusion.npz",
    "imagenet512": "fid_stats_imagenet512_guided_diffusion.npz",
    "mscoco": "fid_stats_mscoco256_val.npz",
}

_PIXEL = dict(kind="identity", scale_factor=1.0)
_KL_F8 = dict(kind="kl_f8", pretrained_path="assets/stable-diffusion/autoencoder_kl_ema.pth")

# name: (model, data, autoencoder, diffusion, optim, train, sample, paper FID)
PAPER: dict[str, dict] = {
    "cifar10_uvit_small": dict(
        model=dict(size="small", img_size=32, patch_size=2, in_chans=3, conv=True),
        data=dict(source="tfds", name="cifar10", resolution=32, preprocess="center_crop"),
        autoencoder=_PIXEL,
        diffusion=dict(formulation="vp_continuous", p_uncond=0.0),
        optim=dict(lr=2e-4, b1=0.99, b2=0.999, warmup_steps=2500),
        train=dict(batch_size=128, num_steps=500_000),
        sample=dict(sampler="euler_maruyama", steps=1000, cfg_scale=0.0),
        ref="cifar10",
        fid=3.11,
    ),
    "celeba64_uvit_small": dict(
        model=dict(size="small", img_size=64, patch_size=4, in_chans=3, conv=True),
        data=dict(source="tfds", name="celeb_a", resolution=64, preprocess="celeba"),
        autoencoder=_PIXEL,
        diffusion=dict(formulation="vp_continuous", p_uncond=0.0),
        optim=dict(lr=2e-4, b1=0.99, b2=0.99, warmup_steps=5000),
        train=dict(batch_size=128, num_steps=500_000),
        sample=dict(sampler="euler_maruyama", steps=1000, cfg_scale=0.0),
        ref="celeba64",
        fid=2.87,
    ),
    "imagenet64_uvit_mid": dict(
        model=dict(size="mid", img_size=64, patch_size=4, in_chans=3, num_classes=1000, conv=True),
        data=dict(source="tfds", name="imagenet2012", resolution=64, preprocess="adm_center_crop"),
        autoencoder=_PIXEL,
        diffusion=dict(formulation="vp_continuous", p_uncond=0.0),
        optim=dict(lr=3e-4, b1=0.99, b2=0.99, warmup_steps=5000),
        train=dict(batch_size=1024, num_steps=300_000),
        sample=dict(sampler="dpm_solver_fast", steps=50, cfg_scale=0.0),
        ref="imagenet64",
        fid=5.85,
    ),
    "imagenet64_uvit_large": dict(
        model=dict(
            size="large", img_size=64, patch_size=4, in_chans=3, num_classes=1000, conv=True
        ),
        data=dict(source="tfds", name="imagenet2012", resolution=64, preprocess="adm_center_crop"),
        autoencoder=_PIXEL,
        diffusion=dict(formulation="vp_continuous", p_uncond=0.0),
        optim=dict(lr=3e-4, b1=0.99, b2=0.99, warmup_steps=5000),
        train=dict(batch_size=1024, num_steps=300_000),
        sample=dict(sampler="dpm_solver_fast", steps=50, cfg_scale=0.0),
        ref="imagenet64",
        fid=4.26,
    ),
    "imagenet256_uvit_large": dict(
        model=dict(
            size="large", img_size=32, patch_size=2, in_chans=4, num_classes=1001, conv=True
        ),
        data=dict(source="tfds", name="imagenet2012", resolution=256, preprocess="adm_center_crop"),
        autoencoder=dict(_KL_F8, scale_factor=0.18215),
        diffusion=dict(formulation="vp_continuous", p_uncond=0.15),
        optim=dict(lr=2e-4, b1=0.99, b2=0.99, warmup_steps=5000),
        train=dict(batch_size=1024, num_steps=300_000),
        sample=dict(sampler="dpm_solver_fast", steps=50, cfg_scale=0.4),
        ref="imagenet256",
        fid=3.40,
    ),
    "imagenet256_uvit_huge": dict(
        model=dict(
            size="huge", img_size=32, patch_size=2, in_chans=4, num_classes=1001, conv=False
        ),
        data=dict(source="tfds", name="imagenet2012", resolution=256, preprocess="adm_center_crop"),
        autoencoder=dict(_KL_F8, scale_factor=0.18215),
        diffusion=dict(formulation="sd_discrete", p_uncond=0.1),
        optim=dict(lr=2e-4, b1=0.99, b2=0.99, warmup_steps=5000),
        train=dict(batch_size=1024, num_steps=500_000),
        sample=dict(sampler="dpm_solver++_3s", steps=50, cfg_scale=0.4),
        ref="imagenet256",
        fid=2.29,
    ),
    "imagenet512_uvit_large": dict(
        model=dict(
            size="large", img_size=64, patch_size=4, in_chans=4, num_classes=1001, conv=True
        ),
        data=dict(source="tfds", name="imagenet2012", resolution=512, preprocess="adm_center_crop"),
        autoencoder=dict(_KL_F8, scale_factor=0.18215),
        diffusion=dict(formulation="vp_continuous", p_uncond=0.15),
        optim=dict(lr=2e-4, b1=0.99, b2=0.99, warmup_steps=5000),
        train=dict(batch_size=1024, num_steps=500_000),
        sample=dict(sampler="dpm_solver_fast", steps=50, cfg_scale=0.7),
        ref="imagenet512",
        fid=4.67,
    ),
    "imagenet512_uvit_huge": dict(
        model=dict(
            size="huge", img_size=64, patch_size=4, in_chans=4, num_classes=1001, conv=False
        ),
        data=dict(source="tfds", name="imagenet2012", resolution=512, preprocess="adm_center_crop"),
        autoencoder=dict(_KL_F8, scale_factor=0.18215),
        diffusion=dict(formulation="sd_discrete", p_uncond=0.1),
        optim=dict(lr=2e-4, b1=0.99, b2=0.99, warmup_steps=5000),
        train=dict(batch_size=1024, num_steps=500_000),
        sample=dict(sampler="dpm_solver++_3s", steps=50, cfg_scale=0.7),
        ref="imagenet512",
        fid=4.05,
    ),
    "mscoco_uvit_small": dict(
        model=dict(
            size="small",
            kind="uvit_t2i",
            img_size=32,
            patch_size=2,
            in_chans=4,
            clip_dim=768,
            num_clip_token=77,
            conv=True,
        ),
        data=dict(source="tfds", name="coco_captions", resolution=256, preprocess="coco"),
        autoencoder=dict(_KL_F8, scale_factor=0.23010),
        diffusion=dict(formulation="sd_discrete", p_uncond=0.1),
        optim=dict(lr=2e-4, b1=0.9, b2=0.9, warmup_steps=5000),
        train=dict(batch_size=256, num_steps=1_000_000),
        sample=dict(sampler="dpm_solver++_3s", steps=50, cfg_scale=1.0),
        ref="mscoco",
        fid=5.95,
        eval_samples=30_000,
    ),
}


def paper_config(name: str, arg: str = "") -> ml_collections.ConfigDict:
    """The config of paper model `name`, modified by the comma-separated `arg` flags."""
    if name not in PAPER:
        raise KeyError(f"unknown paper config {name!r}; known: {sorted(PAPER)}")
    flags = {a for a in arg.split(",") if a}
    known = {"runlocal", "deep"}
    if flags - known:
        raise ValueError(
            f"config argument(s) {sorted(flags - known)} unknown; known: {sorted(known)}"
        )
    spec = PAPER[name]
    c = default_config()
    c.name = name
    model = dict(spec["model"])
    size = model.pop("size")
    if "deep" in flags:
        if name != "mscoco_uvit_small":
            raise ValueError("config argument 'deep' exists only for mscoco_uvit_small")
        size = "small_deep"
    c.model.update(MODEL_SIZES[size], **model)
    c.data.update(spec["data"])
    c.autoencoder.update(spec["autoencoder"])
    c.diffusion.update(spec["diffusion"])
    c.optim.update(spec["optim"], weight_decay=0.03, decay_mask="all", schedule="constant")
    c.train.update(spec["train"], ema_rate=0.9999)
    c.sample.update(spec["sample"])
    c.eval.update(
        num_samples=spec.get("eval_samples", 50_000), ref_stats=f"assets/{_REF[spec['ref']]}"
    )
    c.paper_fid = spec["fid"] if "deep" not in flags else 5.48
    if "runlocal" in flags:
        c.model.update(embed_dim=32, depth=2, num_heads=2, dtype="float32")
        c.train.update(batch_size=8, num_steps=10, log_every=2, ckpt_every=5, sample_every=10)
        c.optim.update(warmup_steps=2)
        c.sample.update(steps=min(c.sample.steps, 6), num_samples=8, batch_size=8)
        c.eval.update(num_samples=64, batch_size=32, train_num_samples=0)
        c.mesh.update(data=-1, fsdp=1)
    return c
