"""DiM-S/2 on ImageNet-256 latents: our preset, not an official DiM (DiT-S/2's width 384, 25 blocks, 29.5M
parameters; see ssm_tread.models.dim.DIM_CONFIGS), trained and sampled with DiM-L/2's protocol (dim_l.py)."""
from dim_l import *

model["name"] = "DiM-S/2"
