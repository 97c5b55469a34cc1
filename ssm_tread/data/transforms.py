"""The ADM centre crop used by the ImageNet-256 protocol (guided-diffusion, DiT, SiT, REPA)."""
import numpy as np
from PIL import Image


def adm_center_crop(image, size):
    """PIL image -> size x size PIL image.

    While the short side is >= 2*size, halve the image with BOX filtering; then resize with BICUBIC so the
    short side is `size` (the long side is rounded); then take the centre size x size crop (offsets floored).
    """
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top:top + size, left:left + size])
