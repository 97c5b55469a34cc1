"""The digits convergence study (docs/benchmarks.md): three backbones of about equal size, each trained
without routing, with scan-consistent TREAD and with naive-order TREAD, on the bundled 16x16 digits.

    python tools/benchmark.py study configs/study_digits.py --out docs/results/study --workers 2

Fields: ssm_tread.study.StudyConfig. Sized for a shared 2-core CPU, where the torch selective scan makes a
Mamba model cost several times a DiT of the same size: patch 2 (an 8x8 token grid, so that scan order has
room to matter), 250 steps of batch 32 at a high learning rate (5e-3: at 2e-3 a DiT here still made no
digits after 300 steps), and Mamba mixers with d_state 8 (the papers: 16), which cuts their step time by
about a quarter.
"""

# label -> (create_model name, keyword arguments); about 0.45M parameters each
backbones = {
    "DiT": ("DiT", dict(hidden_size=52, depth=9, num_heads=4, patch_size=2)),
    "DiM": ("DiM", dict(hidden_size=72, depth=9, patch_size=2, d_state=8)),
    "ZigMa": ("ZigMa", dict(hidden_size=68, depth=9, patch_size=2, d_state=8)),
}
# the paper's shape: block 2 to block depth-4 (inclusive), half of the image tokens bypass
routes = {name: [(2, 5, 0.5)] for name in backbones}

study = dict(
    backbones=backbones,
    routes=routes,
    modes=("none", "scan", "naive"),
    seeds=(0, 1, 2),
    steps=250,
    batch_size=32,
    lr=5e-3,
    warmup_steps=20,
    grad_clip=1.0,
    ema_decay=0.99,
    objective="flow",
    eval_at=(100, 175, 250),
    eval_samples=200,
    sampler="euler",
    sample_steps=10,
    eval_seed=1234,
    loss_every=25,
    threads=1,
)
