"""DiT-B/2 on ImageNet-256 latents: DDPM hybrid loss, AdamW 1e-4, batch 256, EMA 0.9999;
sampled as the official DiT evaluation: 250 DDPM steps, guidance on the first 3 of the 4 latent channels."""
from base import *

model["name"] = "DiT-B/2"
sample["guided_channels"] = 3  # DiT's forward_with_cfg guides channels :3 (facebookresearch/DiT models.py)
