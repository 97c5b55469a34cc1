"""DiT-XL/2 on ImageNet-512 latents (4x64x64, 1,024 tokens at patch 2): dit_xl2.py's protocol, as the DiT paper
trained its 512 model; the official DiT-XL-2-512x512.pt loads into this model as it is. Evaluated against ADM's
512 reference batch VIRTUAL_imagenet512.npz (README, "ImageNet-512")."""
from dit_xl2 import *

data["root"] = "data/imagenet512_latents"
eval["reference"] = "checkpoints/VIRTUAL_imagenet512.npz"
