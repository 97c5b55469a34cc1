"""DiT-XL/2 + TREAD on ImageNet-512 latents: half of the 1,024 tokens bypass blocks 2..24 (of 28)."""
from dit_xl2_512 import *

routing["routes"] = [(2, 24, 0.5)]
