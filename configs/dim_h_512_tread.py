"""DiM-H/2 + TREAD on ImageNet-512 latents: half of the 1,024 grid tokens bypass blocks 2..45 (of 49), read in
each block's scan order over the padded 35x35 grid."""
from dim_h_512 import *

routing["routes"] = [(2, 45, 0.5)]
