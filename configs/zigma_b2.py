"""ZigMa-B/2 on ImageNet-256 latents: flow matching (linear interpolant, velocity), AdamW lr 1e-4,
gradient clipping 2.0, batch 256; sampled with the Heun ODE solver. The official ZigMa image models are
unconditional and its code has no classifier-free guidance: the default is none (sample.cfg_scale=1), and
guidance asked for acts on every channel."""
from base import *

model.update(name="ZigMa-B/2", learn_sigma=False)
diffusion["objective"] = "flow"
optim["grad_clip"] = 2.0
sample.update(cfg_scale=1.0, guided_channels=None)  # ZigMa: no guidance in the official code
