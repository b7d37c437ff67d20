"""The paper's configurations (Bao et al. 2023, the experiments' tables and appendix) as one table.

Each `configs/<name>.py` is `get_config(arg)` = `paper_config("<name>", arg)`. Arguments (joined
with commas, e.g. `--config configs/mscoco_uvit_small.py:deep,runlocal`):
  runlocal  a tiny model, batch and schedule for CPU smoke runs (big_vision's convention);
  deep      MS-COCO only: U-ViT-S-Deep (depth 16), the paper's 5.48 FID model.
"""

from __future__ import annotations

import dataclasses

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


def _imagenet(res: int) -> dict:
    return dict(source="tfds", name="imagenet2012", resolution=res, preprocess="adm_center_crop")


@dataclasses.dataclass(frozen=True)
class PaperModel:
    """One model of the paper's table: what its config sets beyond `default_config()`.

    size: a `MODEL_SIZES` key (width, depth, heads). img_size, patch_size, in_chans: the network
    input (latent side and channels for latent models). data, autoencoder: `config.data` and
    `config.autoencoder` fields. betas: AdamW's (b1, b2). sample_steps: the sampler's NFE.
    ref: the reference statistics (`_REF` key). fid: the paper's FID of this model.
    """

    size: str
    img_size: int
    patch_size: int
    in_chans: int
    data: dict
    autoencoder: dict
    formulation: str
    lr: float
    betas: tuple[float, float]
    warmup_steps: int
    batch_size: int
    num_steps: int
    p_uncond: float
    sampler: str
    sample_steps: int
    cfg_scale: float
    ref: str
    fid: float
    num_classes: int = -1  # -1: unconditional; ImageNet latent models 1001 (1000 = null)
    conv: bool = True
    kind: str = "uvit"
    text_encoder: str = ""  # text-to-image models: the CLIP folder
    eval_samples: int = 50_000


_VP, _SD = "vp_continuous", "sd_discrete"
_EM, _FAST, _PP3S = "euler_maruyama", "dpm_solver_fast", "dpm_solver++_3s"
_B99 = (0.99, 0.99)
_COCO = dict(source="tfds", name="coco_captions", resolution=256, preprocess="coco")
_IMAGENET_AE = dict(_KL_F8, scale_factor=0.18215)

# fmt: off
PAPER: dict[str, PaperModel] = {
    "cifar10_uvit_small": PaperModel(
        size="small", img_size=32, patch_size=2, in_chans=3,
        data=dict(source="tfds", name="cifar10", resolution=32, preprocess="center_crop"),
        autoencoder=_PIXEL, formulation=_VP, lr=2e-4, betas=(0.99, 0.999), warmup_steps=2500,
        batch_size=128, num_steps=500_000, p_uncond=0.0,
        sampler=_EM, sample_steps=1000, cfg_scale=0.0, ref="cifar10", fid=3.11),
    "celeba64_uvit_small": PaperModel(
        size="small", img_size=64, patch_size=4, in_chans=3,
        data=dict(source="tfds", name="celeb_a", resolution=64, preprocess="celeba"),
        autoencoder=_PIXEL, formulation=_VP, lr=2e-4, betas=_B99, warmup_steps=5000,
        batch_size=128, num_steps=500_000, p_uncond=0.0,
        sampler=_EM, sample_steps=1000, cfg_scale=0.0, ref="celeba64", fid=2.87),
    "imagenet64_uvit_mid": PaperModel(
        size="mid", img_size=64, patch_size=4, in_chans=3, num_classes=1000,
        data=_imagenet(64),
        autoencoder=_PIXEL, formulation=_VP, lr=3e-4, betas=_B99, warmup_steps=5000,
        batch_size=1024, num_steps=300_000, p_uncond=0.0,
        sampler=_FAST, sample_steps=50, cfg_scale=0.0, ref="imagenet64", fid=5.85),
    "imagenet64_uvit_large": PaperModel(
        size="large", img_size=64, patch_size=4, in_chans=3, num_classes=1000,
        data=_imagenet(64),
        autoencoder=_PIXEL, formulation=_VP, lr=3e-4, betas=_B99, warmup_steps=5000,
        batch_size=1024, num_steps=300_000, p_uncond=0.0,
        sampler=_FAST, sample_steps=50, cfg_scale=0.0, ref="imagenet64", fid=4.26),
    "imagenet256_uvit_large": PaperModel(
        size="large", img_size=32, patch_size=2, in_chans=4, num_classes=1001,
        data=_imagenet(256),
        autoencoder=_IMAGENET_AE, formulation=_VP, lr=2e-4, betas=_B99, warmup_steps=5000,
        batch_size=1024, num_steps=300_000, p_uncond=0.15,
        sampler=_FAST, sample_steps=50, cfg_scale=0.4, ref="imagenet256", fid=3.40),
    "imagenet256_uvit_huge": PaperModel(
        size="huge", img_size=32, patch_size=2, in_chans=4, num_classes=1001, conv=False,
        data=_imagenet(256),
        autoencoder=_IMAGENET_AE, formulation=_SD, lr=2e-4, betas=_B99, warmup_steps=5000,
        batch_size=1024, num_steps=500_000, p_uncond=0.1,
        sampler=_PP3S, sample_steps=50, cfg_scale=0.4, ref="imagenet256", fid=2.29),
    "imagenet512_uvit_large": PaperModel(
        size="large", img_size=64, patch_size=4, in_chans=4, num_classes=1001,
        data=_imagenet(512),
        autoencoder=_IMAGENET_AE, formulation=_VP, lr=2e-4, betas=_B99, warmup_steps=5000,
        batch_size=1024, num_steps=500_000, p_uncond=0.15,
        sampler=_FAST, sample_steps=50, cfg_scale=0.7, ref="imagenet512", fid=4.67),
    "imagenet512_uvit_huge": PaperModel(
        size="huge", img_size=64, patch_size=4, in_chans=4, num_classes=1001, conv=False,
        data=_imagenet(512),
        autoencoder=_IMAGENET_AE, formulation=_SD, lr=2e-4, betas=_B99, warmup_steps=5000,
        batch_size=1024, num_steps=500_000, p_uncond=0.1,
        sampler=_PP3S, sample_steps=50, cfg_scale=0.7, ref="imagenet512", fid=4.05),
    "mscoco_uvit_small": PaperModel(
        size="small", img_size=32, patch_size=2, in_chans=4, kind="uvit_t2i",
        data=_COCO,
        autoencoder=dict(_KL_F8, scale_factor=0.23010), formulation=_SD, lr=2e-4,
        betas=(0.9, 0.9), warmup_steps=5000, batch_size=256, num_steps=1_000_000, p_uncond=0.1,
        sampler=_PP3S, sample_steps=50, cfg_scale=1.0, ref="mscoco", fid=5.95,
        text_encoder="assets/clip-vit-large-patch14", eval_samples=30_000),
}
# fmt: on


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
    row = PAPER[name]
    size = "small_deep" if "deep" in flags else row.size
    if "deep" in flags and name != "mscoco_uvit_small":
        raise ValueError("config argument 'deep' exists only for mscoco_uvit_small")
    c = default_config()
    c.name = name
    c.model.update(
        MODEL_SIZES[size],
        kind=row.kind,
        img_size=row.img_size,
        patch_size=row.patch_size,
        in_chans=row.in_chans,
        conv=row.conv,
    )
    if row.kind == "uvit":
        c.model.num_classes = row.num_classes
    c.data.update(row.data)
    c.autoencoder.update(row.autoencoder)
    c.diffusion.update(formulation=row.formulation, p_uncond=row.p_uncond)
    c.optim.update(
        lr=row.lr,
        b1=row.betas[0],
        b2=row.betas[1],
        warmup_steps=row.warmup_steps,
        weight_decay=0.03,
        decay_mask="all",
        schedule="constant",
    )
    c.train.update(batch_size=row.batch_size, num_steps=row.num_steps, ema_rate=0.9999)
    c.sample.update(sampler=row.sampler, steps=row.sample_steps, cfg_scale=row.cfg_scale)
    c.eval.update(num_samples=row.eval_samples, ref_stats=f"assets/{_REF[row.ref]}")
    c.text_encoder.path = row.text_encoder
    c.paper_fid = row.fid if "deep" not in flags else 5.48
    if "runlocal" in flags:
        c.model.update(embed_dim=32, depth=2, num_heads=2, dtype="float32")
        c.train.update(batch_size=8, num_steps=10, log_every=2, ckpt_every=5)
        c.train.evals.sample_grid.every = 10
        c.optim.update(warmup_steps=2)
        c.sample.update(steps=min(c.sample.steps, 6), num_samples=8, batch_size=8)
        c.eval.update(num_samples=64, batch_size=32, train_num_samples=0)
        c.mesh.update(data=-1, fsdp=1)
    return c
