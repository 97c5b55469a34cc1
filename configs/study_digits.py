"""The digits convergence study (docs/benchmarks.md): three backbones of about equal size, each trained
without routing, with scan-consistent TREAD and with naive-order TREAD, on the bundled 16x16 digits.

    python tools/benchmark.py study configs/study_digits.py --workers 2

The groups below are one ordinary trainer config; ``study`` is the grid: every backbone x mode x seed is
this config with model.name/model.kwargs, routing.routes/routing.scan_consistent and train.seed changed
(``python tools/train.py configs/study_digits.py`` trains the config as it stands: DiM, scan-consistent
TREAD, seed 0). Sized for a shared 2-core CPU, where the torch selective scan makes a Mamba model cost
several times a DiT of the same size: patch 2 (an 8x8 token grid, so that scan order has room to matter),
250 steps of batch 32 at a high learning rate (5e-3: at 2e-3 a DiT here still made no digits after 300
steps), and Mamba mixers with d_state 8 (the papers: 16), which cuts their step time by about a quarter.
The EMA decays fast (0.97: a half-life of 23 steps), so that the first evaluations show the model
rather than its initial weights.
"""
from base import *

# (names starting with "_" are not config groups)
# label -> (create_model name, keyword arguments); about 0.45M parameters each
_backbones = {
    "DiT": ("DiT", dict(hidden_size=52, depth=9, num_heads=4, patch_size=2)),
    "DiM": ("DiM", dict(hidden_size=72, depth=9, patch_size=2, d_state=8)),
    "ZigMa": ("ZigMa", dict(hidden_size=68, depth=9, patch_size=2, d_state=8)),
}
# the paper's shape: block 2 to block depth-4 (inclusive), half of the image tokens bypass
_route = [(2, 5, 0.5)]

model.update(name=_backbones["DiM"][0], kwargs=_backbones["DiM"][1], learn_sigma=False)
routing["routes"] = _route
diffusion["objective"] = "flow"
data.update(name="digits", num_workers=0)
optim.update(lr=5e-3, warmup_steps=20, schedule="cosine", min_lr=5e-4, grad_clip=1.0)
train.update(steps=250, batch_size=32, ema_decay=0.97, cpu_threads=1, ckpt_every=0, keep_every=0)
log.update(every=25, grid_every=0, tensorboard=False)
sample.update(sampler="euler", steps=10, batch_size=100, grid_classes=list(range(10)), grid_per_class=10,
              grid_cols=10)
eval.update(num_samples=200, every=75)         # at steps 75, 150, 225 and the last, 250

study = dict(
    backbones=_backbones,
    routes={name: _route for name in _backbones},
    modes=("none", "scan", "naive"),
    seeds=(0, 1, 2),
)
