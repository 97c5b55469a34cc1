"""ZigMa-B/2 on ImageNet-256 latents: flow matching (linear interpolant, velocity), AdamW lr 1e-4,
gradient clipping 2.0, batch 256; sampled with the Heun ODE solver."""
from base import *

model.update(name="ZigMa-B/2", learn_sigma=False)
diffusion["objective"] = "flow"
optim["grad_clip"] = 2.0
