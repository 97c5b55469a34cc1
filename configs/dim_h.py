"""DiM-H/2 on ImageNet-256 latents, DiM's protocol (see dim_l.py; label dropout 0.1 for H)."""
from dim_l import *

model.update(name="DiM-H/2", class_dropout_prob=0.1)
# 862M parameters: weights, gradients, AdamW state and EMA take 17 GB on every rank under DDP; FSDP shards
# them over the ranks (on one process it has nothing to shard and trains unsharded)
train["fsdp"] = True
