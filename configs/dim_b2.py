"""DiM-B/2 on ImageNet-256 latents: our preset, not an official DiM (DiT-B/2's width 768, 25 blocks, 114.0M
parameters, about the 111M Mamba model of the TREAD paper's study; see ssm_tread.models.dim.DIM_CONFIGS),
trained and sampled with DiM-L/2's protocol (dim_l.py)."""
from dim_l import *

model["name"] = "DiM-B/2"
