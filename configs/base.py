"""Every config key with its default: the ImageNet-256 protocol of DiT (Peebles & Xie; github.com/facebookresearch/DiT):
AdamW at lr 1e-4 without weight decay or warm-up, batch 256, EMA 0.9999, 1000-step DDPM with linear betas and
a learned variance, on sd-vae-ft-ema latents (4x32x32).

Experiment files start with `from base import *` and change a few keys; the command line changes
more with dotted overrides: `python tools/train.py configs/dit_b2.py train.steps=1000 optim.lr=2e-4`.
"""

model = dict(
    name="DiT-XL/2",          # create_model name: a preset of ssm_tread.models.MODEL_NAMES (DiT-XL/2, DiM-H/2, ZigMa-B/2,
                              # ...) or a family name ("DiT", "DiM", "ZigMa") built from kwargs
    kwargs={},                # more create_model keywords: hidden_size, depth, patch_size, ...
    learn_sigma=True,         # output 2*C channels: noise + variance interpolation (DDPM hybrid loss)
    class_dropout_prob=0.1,   # label dropout that trains the null class for classifier-free guidance
    scan_backend=None,        # force the selective scan: one of ssm_tread.ops.BACKENDS ("mamba_ssm", "triton", "torch",
                              # "reference"); None: automatic
)

routing = dict(
    routes=[],                # TREAD routes [(start, end, ratio), ...]; blocks numbered from 0, end inclusive
    scan_consistent=True,     # scan layers read survivors in their own scan order (False: selection order)
    loss="full",              # "full": loss over every token; "routed": TREAD v1 loss over routed tokens
)

diffusion = dict(
    objective="ddpm",         # "ddpm" (1000 linear-beta steps) or "flow" (linear interpolant, velocity)
    kwargs={},                # more create_diffusion keywords
)

data = dict(
    name="latents",           # "latents" (pre-extracted VAE latents, 4x32x32), "digits" (1x16x16) or "mnist" (1x32x32)
    root="data/imagenet256_latents",  # the latent shards (latents only)
    kwargs={},                # more build_dataset keywords
    num_workers=None,         # data-loader worker processes per rank; None: the CPUs a rank has besides its own, at
                              # most 4 (ssm_tread.machine.loader_workers)
    verify="sample",          # latent shards, checked when a run opens them: "sample" (sizes + checksum of each
                              # file's header and sampled blocks), "full" (sha256 of every byte) or "none" (sizes)
)

optim = dict(
    lr=1e-4,
    weight_decay=0.0,
    betas=(0.9, 0.999),
    eps=1e-8,
    warmup_steps=0,           # linear warm-up from 0
    schedule="constant",      # "constant" or "cosine" (from lr to min_lr over train.steps)
    min_lr=0.0,
    grad_clip=0.0,            # max gradient norm; 0 turns clipping off
)

train = dict(
    steps=400_000,            # optimizer steps
    batch_size=256,           # global batch: per-rank micro-batch x ranks x grad_accum
    grad_accum=1,
    ema_decay=0.9999,
    seed=0,
    precision="bf16",         # autocast on CUDA: "bf16" or "fp32" (CPU always runs fp32)
    tf32=True,                # TF32 matmuls and convolutions on CUDA
    compile=False,            # torch.compile the model
    cpu_threads=0,            # torch threads per rank on a CPU, capped at the cores per rank; 0: torch's default
    fsdp=False,               # FSDP instead of DDP: shard parameters, gradients and optimizer state over the ranks
    run_dir="",               # empty: runs/<config file name>
    resume="none",            # "none", "auto" (newest checkpoint of run_dir, if any) or a checkpoint path
    init_from="",             # a fresh run starts from this checkpoint's EMA weights (fine-tuning, e.g. a
                              # converted official one: tools/convert_checkpoint.py); empty: random init
    ckpt_every=10_000,
    keep_last=2,              # newest checkpoints kept besides milestones; >= 1 (the newest is never pruned)
    keep_every=50_000,        # milestone checkpoints kept for good; 0: none
)

log = dict(
    every=100,                # steps between metric lines (TensorBoard, metrics.jsonl)
    tensorboard=True,
    progress=True,            # tqdm bar on rank 0
    grid_every=10_000,        # steps between sample grids of the EMA model; 0: none
)

sample = dict(
    sampler=None,             # None: the diffusion's default sampler
    steps=None,               # None: the sampler's default number of steps
    cfg_scale=1.0,            # classifier-free guidance scale; 1 turns it off
    interval=None,            # guidance interval (lo, hi) in normalised time [0, 1] (ssm_tread.diffusion.guidance: ddpm
                              # 0 = data, flow 1 = data); None: everywhere
    guided_channels=None,     # guide only the first channels; None: all (the prediction channels of a learned-sigma
                              # model). Each preset sets its family's official value: DiT 3, DiM and ZigMa None
    routing_guidance=None,    # TREAD routing guidance, see ssm_tread.diffusion.guidance.Guidance
    use_ema=True,             # tools/sample.py samples with the EMA weights (False: the raw ones; --raw forces them);
                              # the trainer's grids and evaluation always use the EMA
    batch_size=32,            # per rank
    vae="checkpoints/sd-vae-ft-ema",  # local copy of stabilityai/sd-vae-ft-ema (latent models)
    grid_classes=None,        # rows of the sample grids; None: 8 classes of the data set (on ImageNet's 1000
                              # the DiT README's 207, 360, 387, 974, 88, 979, 417, 279; else spread evenly)
    grid_per_class=8,         # samples of each class in the sample grids
    grid_cols=0,              # grid columns; 0: grid_per_class (one row per class)
    seed=0,
)

eval = dict(
    num_samples=0,            # samples per evaluation of the EMA model (FID; digits also class accuracy); > 0
                              # evaluates after training (eval.json); 0: no evaluation
    every=0,                  # steps between evaluations during training; 0: only after training
    reference=None,           # latent models: ADM reference batch .npz (its stored mu/sigma, else its images),
                              # e.g. checkpoints/VIRTUAL_imagenet256_labeled.npz
    inception="checkpoints/pt_inception-2015-12-05-6726825d.pth",  # TF-FID Inception weights (latent models)
    weights=None,             # DigitsEvaluator weights (None: its default)
)
