"""DiM-L/2 on ImageNet-256 latents, DiM's protocol: noise prediction on DDPM's scaled-linear schedule with
the model fed n = step + 1 (as the official code trains it), label dropout 0.15, AdamW lr 2e-4, weight
decay 0.03, betas (0.99, 0.99), eps 1e-15, 5K warm-up steps, gradient clipping at norm 1.0
(max_grad_norm of tyshiwo1/DiM-DiffusionMamba configs/imagenet256_{L,H}_DiM.py), batch 768; sampled with 50 DPM-Solver++ steps as the
official evaluation (which uses guidance scale 1.4 for its guided FID: sample.cfg_scale=1.4) on all 4 channels."""
from base import *

model.update(name="DiM-L/2", learn_sigma=False, class_dropout_prob=0.15)
diffusion["kwargs"] = dict(schedule="scaled_linear", timestep_offset=1)
optim.update(lr=2e-4, weight_decay=0.03, betas=(0.99, 0.99), eps=1e-15, warmup_steps=5_000, grad_clip=1.0)
train["batch_size"] = 768
sample.update(sampler="dpm_solver", steps=50, guided_channels=None)  # DiM guides every channel (eval_ldm_discrete.py)
