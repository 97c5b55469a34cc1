"""The MNIST convergence study at ImageNet-256's token count (docs/benchmarks.md): three backbones of about
4M parameters, each trained without routing, with scan-consistent TREAD and with naive-order TREAD, on the
bundled 5,000-image MNIST subset padded to 1x32x32, so that patch 2 gives the 16x16 token grid of the
ImageNet-256 latents. Written for one GPU:

    python tools/benchmark.py study configs/study_mnist.py --workers 9        # on a GPU (about 8 minutes)
    python tools/benchmark.py study configs/study_mnist.py --dry-run          # toy sizes on a CPU (about a minute)

As configs/study_digits.py: the groups below are one ordinary trainer config (``python tools/train.py
configs/study_mnist.py`` trains DiM, scan-consistent TREAD, seed 0) and ``study`` is the grid; the study
tool sets model.name/model.kwargs, routing.routes/routing.scan_consistent and train.seed for each run, and
skips runs already finished (a study cut short resumes where it stopped). DiT's naive-order runs are left
out: DiT never asks for a scan order, so they would repeat its scan-consistent ones. 24 runs.

The models: depth 9 (the paper's route, block 2 to depth - 4 = 5, half of the tokens bypassing, as in
the digits study), d_state 16 (the papers' value) and widths that give 4.3M (DiT), 4.2M (DiM) and 4.3M
(ZigMa) parameters. The schedule follows a 1500-step probe on the digits (lr 2e-3, cosine to 5e-4, EMA
0.995) at twice its length and a lower peak for the larger models: 3,000 steps of batch 64 (192,000
images, 48 epochs of the 4,000 training images), lr 1e-3 after 100 warm-up steps, cosine to 1e-4, EMA
0.995 (a half-life of 138 steps, so that the first evaluation shows the model at that step).
Evaluations every 750 steps: 1,000 samples (100 of each class), 20 Euler steps, MNIST FID against the
4,000 training images and class accuracy of the bundled MNIST classifier.

How it was sized (an estimate; it has not run on a GPU yet): a training image costs about 3x the forward
MACs (0.90G DiT, 1.37G DiM, 0.74G ZigMa without routing; TREAD 15-25% less), so the 24 runs train about
24 x 192,000 x 3 x 1.0G x 2 = 28 PFLOP, and their evaluations about 4 x 1,000 x 20 x 1.0G x 2 = 0.16
PFLOP a run, 4 PFLOP in all. Models this small leave an H200 mostly idle in one process (a step is a few
hundred kernel launches, near 10-25 ms of launch latency for 5-10 ms of GPU work at 10% MFU), so 9 runs
share it (``--workers 9``, one CPU core each of the 16) and keep it busy: at an assumed 100 TFLOP/s in all
(10% of its bf16 peak) the grid takes about 320 s, plus about 30 s a run to start (CUDA, Triton and the
evaluator's reference features) in 3 waves. Start with one seed (``--seeds 0``, a third of it) and read
its wall time before asking for the rest.
"""
from base import *

# (names starting with "_" are not config groups)
# label -> (create_model name, keyword arguments); about 4.2M parameters each
_backbones = {
    "DiT": ("DiT", dict(hidden_size=160, depth=9, num_heads=4, patch_size=2)),
    "DiM": ("DiM", dict(hidden_size=232, depth=9, patch_size=2, d_state=16)),
    "ZigMa": ("ZigMa", dict(hidden_size=216, depth=9, patch_size=2, d_state=16)),
}
# the paper's shape: block 2 to block depth-4 (inclusive), half of the image tokens bypass
_route = [(2, 5, 0.5)]

model.update(name=_backbones["DiM"][0], kwargs=_backbones["DiM"][1], learn_sigma=False)
routing["routes"] = _route
diffusion["objective"] = "flow"
data.update(name="mnist", num_workers=0)
optim.update(lr=1e-3, warmup_steps=100, schedule="cosine", min_lr=1e-4, grad_clip=1.0)
train.update(steps=3000, batch_size=64, ema_decay=0.995, cpu_threads=1, ckpt_every=0, keep_every=0)
log.update(every=50, grid_every=0, tensorboard=False)
sample.update(sampler="euler", steps=20, batch_size=250, grid_classes=list(range(10)), grid_per_class=10,
              grid_cols=10)
eval.update(num_samples=1000, every=750)       # at steps 750, 1500, 2250 and 3000

study = dict(
    backbones=_backbones,
    routes={name: _route for name in _backbones},
    modes=("none", "scan", "naive"),
    seeds=(0, 1, 2),
    skip=[("DiT", "naive")],
)
