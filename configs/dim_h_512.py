"""DiM-H/2 on ImageNet-512 latents (4x64x64; a 32x32 patch grid padded to 35x35), the official fine-tune
(tyshiwo1/DiM-DiffusionMamba configs/imagenet512_H_DiM_ft.py): its "rho_pad" padding layout, label dropout
0.15, AdamW lr 1e-4 without weight decay, betas (0.99, 0.99), eps 1e-15, 2.5K warm-up steps, gradient
clipping 1.0, batch 240, 64K steps (its config also sets 2-step gradient accumulation, which applies when its
loop runs under DeepSpeed: then train.batch_size=480 train.grad_accum=2 train.steps=32000); sampled with 50
DPM-Solver steps (the official evaluation guides with scale 1.7: sample.cfg_scale=1.7). The official run
starts from its 256 model with the position embedding interpolated to the 32x32 grid; here start from the
converted official 512 checkpoint (tools/convert_checkpoint.py) with train.init_from, or from scratch."""
from dim_h import *

model.update(class_dropout_prob=0.15, kwargs=dict(pad_layout="rho_pad"))
optim.update(lr=1e-4, weight_decay=0.0, betas=(0.99, 0.99), eps=1e-15, warmup_steps=2_500, grad_clip=1.0)
train.update(batch_size=240, steps=64_000)
data["root"] = "data/imagenet512_latents"
eval["reference"] = "checkpoints/VIRTUAL_imagenet512.npz"
