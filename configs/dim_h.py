"""DiM-H/2 on ImageNet-256 latents, DiM's protocol (see dim_l.py)."""
from dim_l import *

model["name"] = "DiM-H/2"
