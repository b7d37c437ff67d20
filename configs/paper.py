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


def _imagenet(res: int) -> dict:
    return dict(source="tfds", name="imagenet2012", resolution=res, preprocess="adm_center_crop")


def _row(size, img, p, chans, data, ae, formulation, lr, betas, warmup, batch, steps, p_uncond,
         sampler, nfe, cfg, ref, fid, *, classes=-1, conv=True, kind="uvit"):  # fmt: skip
    """One line of SPEC section 2's table."""
    model = dict(size=size, kind=kind, img_size=img, patch_size=p, in_chans=chans, conv=conv)
    if kind == "uvit":
        model["num_classes"] = classes
    return dict(
        model=model,
        data=data,
        autoencoder=ae,
        diffusion=dict(formulation=formulation, p_uncond=p_uncond),
        optim=dict(lr=lr, b1=betas[0], b2=betas[1], warmup_steps=warmup),
        train=dict(batch_size=batch, num_steps=steps),
        sample=dict(sampler=sampler, steps=nfe, cfg_scale=cfg),
        ref=ref,
        fid=fid,
    )


_VP, _SD = "vp_continuous", "sd_discrete"
_EM, _FAST, _PP3S = "euler_maruyama", "dpm_solver_fast", "dpm_solver++_3s"
_B99 = (0.99, 0.99)
_COCO = dict(source="tfds", name="coco_captions", resolution=256, preprocess="coco")

# fmt: off
PAPER: dict[str, dict] = {
    # name: size, img, patch, chans, data, autoencoder, formulation, lr, betas, warmup, batch,
    #       steps, p_uncond, sampler, NFE, CFG scale, reference statistics, paper FID
    "cifar10_uvit_small": _row(
        "small", 32, 2, 3, dict(source="tfds", name="cifar10", resolution=32,
        preprocess="center_crop"), _PIXEL, _VP, 2e-4, (0.99, 0.999), 2500, 128, 500_000, 0.0,
        _EM, 1000, 0.0, "cifar10", 3.11),
    "celeba64_uvit_small": _row(
        "small", 64, 4, 3, dict(source="tfds", name="celeb_a", resolution=64,
        preprocess="celeba"), _PIXEL, _VP, 2e-4, _B99, 5000, 128, 500_000, 0.0,
        _EM, 1000, 0.0, "celeba64", 2.87),
    "imagenet64_uvit_mid": _row(
        "mid", 64, 4, 3, _imagenet(64), _PIXEL, _VP, 3e-4, _B99, 5000, 1024, 300_000, 0.0,
        _FAST, 50, 0.0, "imagenet64", 5.85, classes=1000),
    "imagenet64_uvit_large": _row(
        "large", 64, 4, 3, _imagenet(64), _PIXEL, _VP, 3e-4, _B99, 5000, 1024, 300_000, 0.0,
        _FAST, 50, 0.0, "imagenet64", 4.26, classes=1000),
    "imagenet256_uvit_large": _row(
        "large", 32, 2, 4, _imagenet(256), dict(_KL_F8, scale_factor=0.18215), _VP, 2e-4, _B99,
        5000, 1024, 300_000, 0.15, _FAST, 50, 0.4, "imagenet256", 3.40, classes=1001),
    "imagenet256_uvit_huge": _row(
        "huge", 32, 2, 4, _imagenet(256), dict(_KL_F8, scale_factor=0.18215), _SD, 2e-4, _B99,
        5000, 1024, 500_000, 0.1, _PP3S, 50, 0.4, "imagenet256", 2.29, classes=1001,
        conv=False),
    "imagenet512_uvit_large": _row(
        "large", 64, 4, 4, _imagenet(512), dict(_KL_F8, scale_factor=0.18215), _VP, 2e-4, _B99,
        5000, 1024, 500_000, 0.15, _FAST, 50, 0.7, "imagenet512", 4.67, classes=1001),
    "imagenet512_uvit_huge": _row(
        "huge", 64, 4, 4, _imagenet(512), dict(_KL_F8, scale_factor=0.18215), _SD, 2e-4, _B99,
        5000, 1024, 500_000, 0.1, _PP3S, 50, 0.7, "imagenet512", 4.05, classes=1001,
        conv=False),
    "mscoco_uvit_small": dict(_row(
        "small", 32, 2, 4, _COCO, dict(_KL_F8, scale_factor=0.23010), _SD, 2e-4, (0.9, 0.9),
        5000, 256, 1_000_000, 0.1, _PP3S, 50, 1.0, "mscoco", 5.95, kind="uvit_t2i"),
        eval_samples=30_000),
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
    if c.model.kind == "uvit_t2i":
        c.text_encoder.path = "assets/clip-vit-large-patch14"
    if "runlocal" in flags:
        c.model.update(embed_dim=32, depth=2, num_heads=2, dtype="float32")
        c.train.update(batch_size=8, num_steps=10, log_every=2, ckpt_every=5, sample_every=10)
        c.optim.update(warmup_steps=2)
        c.sample.update(steps=min(c.sample.steps, 6), num_samples=8, batch_size=8)
        c.eval.update(num_samples=64, batch_size=32, train_num_samples=0)
        c.mesh.update(data=-1, fsdp=1)
    return c
