"""DiM-L/2 on ImageNet-256 latents, DiM's protocol: noise prediction, AdamW lr 2e-4, weight decay 0.03,
betas (0.99, 0.99), 5K warm-up steps, batch 768; sampled with 50 DDIM steps."""
from base import *

model.update(name="DiM-L/2", learn_sigma=False)
optim.update(lr=2e-4, weight_decay=0.03, betas=(0.99, 0.99), warmup_steps=5_000)
train["batch_size"] = 768
sample.update(sampler="ddim", steps=50)
