"""What a run writes about itself: metrics.jsonl and TensorBoard, the loss plot, and the training clock."""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from ssm_tread.errors import UserError


def read_metrics(path: Path, say=None) -> list[dict]:
    """The rows of a metrics.jsonl. A torn last line (the disk filled, or the run was killed, while it was
    written) is dropped, and ``say`` is told; a damaged line before it is an error naming it."""
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise UserError(f"{path}: line {number} is not JSON (damaged); delete that line and continue "
                                f"with --resume") from None
            if say is not None:
                say(f"{path}: dropping its torn last line {number} (cut off by a full disk or a kill)")
    return rows


class Metrics:
    """metrics.jsonl and TensorBoard on rank 0; lines after ``start_step`` of an earlier run are dropped
    (and a torn last line, saying so)."""

    def __init__(self, run_dir: Path, tensorboard: bool, start_step: int, say=print):
        self.path = run_dir / "metrics.jsonl"
        kept = []
        if start_step and self.path.exists():
            kept = [row for row in read_metrics(self.path, say) if row["step"] <= start_step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, values: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def plot_loss(metrics_path: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


class Window:
    """The metrics of the steps since the last log line, and the run's training time so far (``clock``)."""

    def __init__(self, clock: list):
        self.clock = clock
        self.loss, self.steps, self.wall = 0.0, 0, time.time()
        self._step_start = (0.0, 0.0)

    def start_step(self) -> None:
        self._step_start = (time.perf_counter(), time.process_time())

    def end_step(self, loss: float) -> None:
        self.clock[0] += time.perf_counter() - self._step_start[0]
        self.clock[1] += time.process_time() - self._step_start[1]
        self.loss, self.steps = self.loss + loss, self.steps + 1

    def flush(self, batch_size: int, macs: int, world: int, lr: float, grad_norm) -> dict:
        images_per_s = self.steps * batch_size / (time.time() - self.wall)
        memory = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        values = {"loss": self.loss / self.steps, "lr": lr, "grad_norm": float(grad_norm),
                  "images_per_s": images_per_s, "tflops_per_device": 6 * macs * images_per_s / world / 1e12,
                  "memory_gb": memory, "train_wall_s": self.clock[0], "train_cpu_s": self.clock[1]}
        self.loss, self.steps, self.wall = 0.0, 0, time.time()
        return values
