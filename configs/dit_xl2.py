"""DiT-XL/2 on ImageNet-256 latents: DDPM hybrid loss, AdamW 1e-4, batch 256, EMA 0.9999."""
from base import *

model["name"] = "DiT-XL/2"
