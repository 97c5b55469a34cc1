"""ZigMa-S/2 on ImageNet-256 latents: the official ZigMa S preset (368 wide, 24 blocks, 31.8M parameters,
about DiT-S/2's 33.0M), with ZigMa-B/2's protocol (zigma_b2.py)."""
from zigma_b2 import *

model["name"] = "ZigMa-S/2"
