"""A PyTorch port of the TensorFlow FID Inception-v3 graph (inception-2015-12-05) used by the ADM evaluator.

It differs from torchvision's Inception-v3 where the TF graph does: average pools exclude padding, the last
block's pool branch uses max pooling, the input is resized with TF1's bilinear resize (align_corners=False,
no half-pixel centres) and scaled as (x - 128) / 128. The weights are pytorch-fid's conversion of the TF
graph (pt_inception-2015-12-05-6726825d.pth); parameter names follow torchvision's Inception3.

Outputs, for uint8-valued images:
    pool    [N, 2048]          pool_3 (FID, precision/recall)
    spatial [N, 17 * 17 * 7]   first 7 channels of mixed_6/conv (= Mixed_6d.branch1x1), flattened as NHWC (sFID)
    logits  [N, 1008]          pool_3 @ softmax weights, without the bias, as the ADM evaluator's Inception Score
"""
import os
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .features import FeatureExtractor

INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
DEFAULT_INCEPTION_PATH = "checkpoints/pt_inception-2015-12-05-6726825d.pth"


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; torchvision's BasicConv2d."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):  # 35x35: cin -> 224 + pool_channels
    def __init__(self, cin, pool_channels):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_channels, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x))], dim=1)


class BlockB(nn.Module):  # 35x35x288 -> 17x17x768
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], dim=1)


class BlockC(nn.Module):  # 17x17x768 -> 17x17x768, factorised 7x7 convolutions with c7 channels
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([self.branch1x1(x),
                          self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
                          self.branch_pool(avg_pool(x))], dim=1)


class BlockD(nn.Module):  # 17x17x768 -> 8x8x1280
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)),
                          self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))),
                          F.max_pool2d(x, 3, stride=2)], dim=1)


class BlockE(nn.Module):  # 8x8 -> 8x8x2048; the pool branch uses avg (mixed_9) or max (mixed_10) pooling
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
                          self.branch_pool(pooled)], dim=1)


def tf1_resize_matrix(size_in, size_out):
    """[size_out, size_in] weights of TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False):
    output i samples input position i * size_in / size_out, interpolating between floor and floor + 1."""
    src = torch.arange(size_out, dtype=torch.float32) * (size_in / size_out)
    lo = src.floor().long()
    frac = src - lo
    rows = torch.arange(size_out)
    m = torch.zeros(size_out, size_in)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, (lo + 1).clamp(max=size_in - 1)), frac, accumulate=True)
    return m


class FIDInceptionV3(nn.Module):
    """x float [B, 3, H, W] with values in 0..255 -> {"pool": [B, 2048], "spatial": [B, 2023], "logits": [B, 1008]}."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        h, w = x.shape[-2:]
        x = torch.einsum("oh,bchw,pw->bcop", tf1_resize_matrix(h, 299).to(x), x, tf1_resize_matrix(w, 299).to(x))
        x = (x - 128) * 0.0078125                                            # [B, 3, 299, 299]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [B, 64, 147, 147]
        x = F.max_pool2d(x, 3, stride=2)                                     # [B, 64, 73, 73]
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                       # [B, 192, 71, 71]
        x = F.max_pool2d(x, 3, stride=2)                                     # [B, 192, 35, 35]
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                  # [B, 288, 35, 35]
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))                  # [B, 768, 17, 17]
        spatial = self.Mixed_6d.branch1x1(x)[:, :7]                          # [B, 7, 17, 17]
        x = self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))                  # [B, 1280, 8, 8]
        pool = self.Mixed_7c(self.Mixed_7b(x)).mean(dim=(2, 3))             # [B, 2048]
        return {"pool": pool,
                "spatial": spatial.permute(0, 2, 3, 1).flatten(1),
                "logits": pool @ self.fc.weight.T}


def load_inception(path=DEFAULT_INCEPTION_PATH):
    """FIDInceptionV3 with pytorch-fid's weights from a local file (never downloads)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"FID Inception weights not found at {path!r}. Download them once:\n"
            f"  mkdir -p {os.path.dirname(path) or '.'} && wget -O {path} {INCEPTION_URL}\n"
            f"(pytorch-fid's port of the TF inception-2015-12-05 graph, 95.6 MB) and pass --inception {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = FIDInceptionV3()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path} is not pytorch-fid's FID Inception state dict (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}); download {INCEPTION_URL}")
    return model.eval()


@contextmanager
def full_precision():
    """Disable TF32 on CUDA (the TF graph ran in full float32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class InceptionFeatures(FeatureExtractor):
    """uint8 images [B, H, W, 3] (numpy or torch) -> {"pool", "spatial", "logits"} float32 tensors on the CPU."""

    def __init__(self, path=DEFAULT_INCEPTION_PATH, device=None, model=None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = (model if model is not None else load_inception(path)).to(self.device).eval()

    @torch.no_grad()
    def features(self, images):
        images = torch.as_tensor(np.asarray(images))
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Inception features need uint8 images [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.device).permute(0, 3, 1, 2).float()  # [B, 3, H, W] in 0..255
        with full_precision():
            out = self.model(x)
        return {k: v.float().cpu() for k, v in out.items()}
