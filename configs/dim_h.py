"""DiM-H/2 on ImageNet-256 latents, DiM's protocol (see dim_l.py)."""
from dim_l import *

model["name"] = "DiM-H/2"
# 861M parameters: weights, gradients, AdamW state and EMA take 17 GB on every rank under DDP; FSDP shards
# them over the ranks (on one process it has nothing to shard and trains unsharded)
train["fsdp"] = True
