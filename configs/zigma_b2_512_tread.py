"""ZigMa-B/2 + TREAD on ImageNet-512 latents: half of the 1,024 tokens bypass blocks 2..20 (of 24), read in each
block's zigzag order."""
from zigma_b2_512 import *

routing["routes"] = [(2, 20, 0.5)]
