"""The digits convergence study at a schedule where TREAD's effect can show (docs/benchmarks.md): the models,
data and grid of configs/study_digits.py, trained 1,500 steps instead of 250.

    nice python tools/benchmark.py study configs/study_digits_1500.py --workers 2     # about 4.5 CPU-hours

The 250-step study (lr 5e-3) stopped in TREAD's early phase. A probe at seed 0 (trainer runs of
configs/study_digits.py with the keys below changed) showed another picture at 1,500 steps: TREAD ahead of
no routing for DiT, behind for DiM and ZigMa. This file runs that schedule over the whole grid: lr 2e-3
after 50 warm-up steps, cosine to 5e-4, EMA 0.995 (a half-life of 138 steps), evaluations every 250
steps. DiT's naive-order runs are left out (DiT never asks for a scan order, so they would repeat its
scan-consistent ones): 24 runs.

Each run keeps a checkpoint every 250 steps (the newest only), so a study cut short (a session's time
runs out, the machine restarts) continues each unfinished run from its newest checkpoint when the same
command is given again; its clock (``train_cpu_s``) continues with it.
"""
from study_digits import *

optim.update(lr=2e-3, warmup_steps=50, min_lr=5e-4)
train.update(steps=1500, ema_decay=0.995, ckpt_every=250, keep_last=1)
eval.update(every=250)                         # at steps 250, 500, ..., 1500

study = dict(study, skip=[("DiT", "naive")])
