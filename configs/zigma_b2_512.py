"""ZigMa-B/2 on ImageNet-512 latents (4x64x64, 1,024 tokens at patch 2): zigma_b2.py's protocol; each block
reads the 32x32 grid along its zigzag path. ZigMa published no ImageNet-512 model."""
from zigma_b2 import *

data["root"] = "data/imagenet512_latents"
eval["reference"] = "checkpoints/VIRTUAL_imagenet512.npz"
