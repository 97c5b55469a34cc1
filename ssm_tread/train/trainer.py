"""The training loop: one process or many (torchrun, DDP through accelerate, or FSDP), CUDA or CPU (gloo).

Reproducibility: the data order, the noise and the diffusion times of every step are drawn for the
whole global batch from generators seeded the same on every rank, and each rank takes its slice, so
they do not depend on the number of ranks. Routing selections and label dropout use per-rank
generators. A checkpoint holds the model, the EMA, the optimizer, the scheduler, the step and the RNG
states of every rank; the data position is the step itself. Under FSDP (``train.fsdp``, see
ssm_tread.train.fsdp) its states are gathered in full: the same checkpoint as without it.
"""
from __future__ import annotations

import json
import math
import os
import resource
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.data import DataLoader

from ssm_tread.errors import UserError
from ssm_tread.ops import set_backend
from ssm_tread.train.rng import isolated_rng
from ssm_tread.train.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_newest_good,
    load_weights,
    prune_checkpoints,
    save_checkpoint,
)
from ssm_tread.train.config import ConfigError, save_config
from ssm_tread.train.ema import EMA
from ssm_tread.train.fsdp import (
    full_optimizer_state,
    full_state_dict,
    load_optimizer_state,
    no_gradient_sync,
    shard,
)
from ssm_tread.train.runlock import RunLock
from ssm_tread.train.validate import check_config


class TrainingError(UserError, RuntimeError):
    """A run that cannot go on; the message names the problem and the fix."""


def build_dataset_from(cfg: dict):
    from ssm_tread.data import build_dataset

    data = cfg["data"]
    if data["name"] == "latents":
        return build_dataset("latents", root=data["root"], verify=data["verify"], **data["kwargs"])
    return build_dataset(data["name"], **data["kwargs"])


def model_spec(cfg: dict, dataset) -> tuple[str, dict]:
    """(create_model name, keyword arguments) of the run's model on ``dataset``."""
    m, r = cfg["model"], cfg["routing"]
    kwargs = dict(input_size=dataset.image_size, in_channels=dataset.channels, num_classes=dataset.num_classes,
                  learn_sigma=m["learn_sigma"], class_dropout_prob=m["class_dropout_prob"],
                  routes=[list(route) for route in r["routes"]], scan_consistent=r["scan_consistent"], **m["kwargs"])
    return m["name"], kwargs


def select_scan_backend(name: str | None) -> None:
    """Force the selective-scan backend for this process (None: automatic; see ssm_tread.ops)."""
    try:
        set_backend(name)
    except ValueError as e:
        raise ConfigError(f"model.scan_backend: {e}") from None


def lr_factor(step: int, optim: dict, total: int) -> float:
    """Linear warm-up to 1, then constant or cosine down to min_lr / lr."""
    warmup = optim["warmup_steps"]
    if step < warmup:
        return (step + 1) / warmup
    if optim["schedule"] == "constant":
        return 1.0
    if optim["schedule"] == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        floor = optim["min_lr"] / optim["lr"]
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ConfigError(f"optim.schedule={optim['schedule']!r}; choose 'constant' or 'cosine'")


class GlobalBatches:
    """Batch sampler: the indices of each rank's micro-batches, step after step, from ``start_step`` on.

    Step k takes global samples [k*B, (k+1)*B) of an endless stream of seeded epoch permutations;
    micro-batch j of rank r is slice (j*world + r) of that step's global batch.
    """

    def __init__(self, size: int, batch: int, micro: int, rank: int, world: int, seed: int, start_step: int):
        self.size, self.batch, self.micro, self.rank, self.world = size, batch, micro, rank, world
        self.seed, self.start_step = seed, start_step
        self._epoch, self._perm = None, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
        return self._perm

    def global_indices(self, step: int) -> torch.Tensor:
        parts, position, end = [], step * self.batch, (step + 1) * self.batch
        while position < end:
            epoch, offset = divmod(position, self.size)
            take = min(end - position, self.size - offset)
            parts.append(self._permutation(epoch)[offset:offset + take])
            position += take
        return torch.cat(parts)

    def __iter__(self):
        step = self.start_step
        while True:
            indices = self.global_indices(step)
            for j in range(self.batch // (self.micro * self.world)):
                lo = (j * self.world + self.rank) * self.micro
                yield indices[lo:lo + self.micro].tolist()
            step += 1


def draw_times(diffusion, n: int, generator: torch.Generator, device) -> torch.Tensor:
    """Training times for ``n`` samples as ``diffusion.training_losses`` draws them."""
    if hasattr(diffusion, "sample_time"):
        return diffusion.sample_time(torch.empty(n, device=device), generator)
    return torch.randint(0, diffusion.num_timesteps, (n,), generator=generator, device=device)


def _ignore_sigint(worker_id: int) -> None:
    """Data-loader workers leave Ctrl-C to the training process, which saves a checkpoint first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked between steps; a second signal acts as usual."""

    def __init__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Metrics:
    """metrics.jsonl and TensorBoard on rank 0; lines after ``start_step`` of an earlier run are dropped."""

    def __init__(self, run_dir: Path, tensorboard: bool, start_step: int):
        self.path = run_dir / "metrics.jsonl"
        kept = []
        if start_step and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
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

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
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


def rng_state(generators: dict) -> dict:
    state = {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, generators: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    for key, generator in generators.items():
        generator.set_state(state[key])


def gather_objects(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def find_resume(cfg: dict, ckpt_dir: Path, say=print) -> dict | None:
    """The loaded checkpoint to continue from, or None for a fresh run (which must not clobber an earlier one).

    ``train.resume=auto`` takes the newest good checkpoint, saying which corrupt ones it passed over, or
    says that it starts fresh when there is none."""
    resume, newest = cfg["train"]["resume"], latest_checkpoint(ckpt_dir)
    if resume == "auto":
        state = load_newest_good(ckpt_dir, say)
        if state is None:
            say(f"--resume: no checkpoint in {ckpt_dir}; starting fresh from step 0")
        return state
    if resume != "none":
        return load_checkpoint(resume)
    if newest is not None and not cfg["train"]["overwrite"]:
        raise TrainingError(f"{ckpt_dir} already holds checkpoints (newest {newest.name}): continue that run with "
                            f"--resume (train.resume=auto), start over with train.overwrite=true, "
                            f"or choose another train.run_dir")
    return None


def set_hyperparameters(optimizer: torch.optim.Optimizer, optim: dict) -> None:
    """The config's AdamW settings on the groups of :func:`parameter_groups`, over those a loaded state brought:
    a resumed run follows the config given now. ``initial_lr`` is the base of the schedule."""
    decay, no_decay = optimizer.param_groups
    for group, weight_decay in ((decay, optim["weight_decay"]), (no_decay, 0.0)):
        group.update(lr=optim["lr"], initial_lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"],
                     weight_decay=weight_decay)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices and kernels; none on biases, norm gains and
    parameters marked ``_no_weight_decay`` (Mamba's A_log and D)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(cfg: dict) -> dict:
    """Train as ``cfg`` says; returns a summary (run_dir, step, last checkpoint, final eval metrics).

    The whole config is checked first (ConfigError, one line per problem; nothing is created). Rank 0
    holds the run dir's lock while the run lasts."""
    check_config(cfg)
    run_dir = Path(cfg["train"]["run_dir"] or f"runs/{cfg['_name']}")
    if int(os.environ.get("RANK", 0)):
        return _train(cfg, run_dir)
    with RunLock(run_dir):
        return _train(cfg, run_dir)


def _train(cfg: dict, run_dir: Path) -> dict:
    from accelerate import Accelerator

    from ssm_tread.diffusion import create_diffusion
    from ssm_tread.models import count_macs, create_model
    from ssm_tread.sampling import generate, grid_labels, save_grid
    from ssm_tread.train.evaluation import Evaluation

    tc, oc, lc, sc, ec = cfg["train"], cfg["optim"], cfg["log"], cfg["sample"], cfg["eval"]
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda and tc["precision"] == "bf16" else "no")
    rank, world, main, device = (accelerator.process_index, accelerator.num_processes,
                                 accelerator.is_main_process, accelerator.device)
    if not cuda and tc["cpu_threads"]:
        torch.set_num_threads(tc["cpu_threads"])
    if cuda and tc["tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    micro = tc["batch_size"] // (world * tc["grad_accum"])
    fsdp = tc["fsdp"] and world > 1

    select_scan_backend(cfg["model"]["scan_backend"])
    ckpt_dir = run_dir / "checkpoints"
    state = find_resume(cfg, ckpt_dir, print if main else lambda line: None)
    accelerator.wait_for_everyone()

    dataset = build_dataset_from(cfg)
    torch.manual_seed(tc["seed"])
    model_name, model_kwargs = model_spec(cfg, dataset)
    model = create_model(model_name, **model_kwargs).to(device)
    ema = EMA(model, tc["ema_decay"])
    diffusion = create_diffusion(cfg["diffusion"]["objective"], **cfg["diffusion"]["kwargs"])
    macs = count_macs(model, routed=True)

    generators = {"noise": torch.Generator(device).manual_seed(tc["seed"]),
                  "routing": torch.Generator(device).manual_seed(tc["seed"] * 1009 + rank + 1)}
    model.router.generator = generators["routing"]
    step = 0
    if state is not None:
        load_weights(model, state["model"], f"checkpoint {state['path']}")
        ema.load_state_dict(state["ema"])
        step = state["step"]
    if fsdp:  # the full weights are in; the optimizer takes the sharded parameters
        mesh = init_device_mesh(device.type, (world,))
        shard(model, mesh, bf16=accelerator.mixed_precision == "bf16")
        ema.shard(mesh)
    optimizer = torch.optim.AdamW(parameter_groups(model, oc["weight_decay"]), lr=oc["lr"],
                                  betas=tuple(oc["betas"]), eps=oc["eps"])
    if state is not None:
        load_optimizer_state(model, optimizer, state["optimizer"])
    set_hyperparameters(optimizer, oc)  # the learning rate is a function of the config and the step alone
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, oc, tc["steps"]), step - 1)
    torch.manual_seed(tc["seed"] * 1009 + rank + step)
    if state is not None and len(state["rng"]) == world:
        set_rng_state(state["rng"][rank], generators)
    elif state is not None and main:
        print(f"resuming on {world} ranks from a checkpoint of {len(state['rng'])}: per-rank RNG streams restart")

    raw_model = model
    if tc["compile"]:
        model = torch.compile(model)
    if fsdp:  # what accelerator.prepare does besides DDP: autocast the forward (the root returns fp32)
        model.forward = accelerator.autocast()(model.forward)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)

    loader = DataLoader(dataset, num_workers=cfg["data"]["num_workers"], pin_memory=cuda,
                        batch_sampler=GlobalBatches(len(dataset), tc["batch_size"], micro, rank, world, tc["seed"], step),
                        generator=torch.Generator().manual_seed(tc["seed"] + rank), worker_init_fn=_ignore_sigint,
                        persistent_workers=cfg["data"]["num_workers"] > 0)
    batches = iter(loader)

    shape = (raw_model.in_channels, dataset.image_size, dataset.image_size)
    grid_y = grid_labels(sc["grid_classes"], sc["grid_per_class"], device)
    grid_noise = torch.randn((len(grid_y), *shape), generator=torch.Generator().manual_seed(sc["seed"])).to(device)
    latent = cfg["data"]["name"] == "latents"
    decode = None
    if latent and (lc["grid_every"] or ec["num_samples"]):
        from ssm_tread.sampling import load_vae
        try:
            decode = load_vae(sc["vae"], device)
        except FileNotFoundError as e:
            raise ConfigError(f"{e}; or turn off sample grids (log.grid_every=0) and evaluation "
                              f"(eval.num_samples=0 eval.every=0)") from None

    def write_grid(sampler, path: Path):
        with isolated_rng(device):
            images = generate(sampler, diffusion, grid_y, grid_noise, sc, decode,
                              torch.Generator(device).manual_seed(sc["seed"]))
        save_grid(images, path, sc["grid_cols"] or sc["grid_per_class"])

    def save(step: int) -> Path:
        states = gather_objects(rng_state(generators), world)
        path = checkpoint_path(ckpt_dir, step)
        weights, ema_weights = full_state_dict(raw_model), ema.state_dict()  # under FSDP: gathered to rank 0
        optimizer_state = full_optimizer_state(raw_model, optimizer)
        if main:
            save_checkpoint({"model": weights, "ema": ema_weights,
                             "optimizer": optimizer_state, "step": step, "rng": states, "config": cfg,
                             "model_name": model_name, "model_kwargs": model_kwargs}, path)
            prune_checkpoints(ckpt_dir, tc["keep_last"], tc["keep_every"])
        accelerator.wait_for_everyone()
        return path

    if main:  # the run has started: its config replaces the one of the run dir
        save_config(cfg, run_dir / "config.json")
    if main and state is None:
        for _, old in list_checkpoints(ckpt_dir):  # an earlier run's, with train.overwrite=true
            old.unlink()
    metrics = Metrics(run_dir, lc["tensorboard"], step) if main else None
    evaluation = (Evaluation(cfg, dataset.num_classes, shape, diffusion, device, decode, metrics, rank, world)
                  if ec["num_samples"] else None)
    if main:
        params = sum(p.numel() for p in raw_model.parameters())
        print(f"{model_name}: {params / 1e6:.2f}M parameters, {macs / 1e9:.3f} GMACs/image routed; {world} rank(s) "
              f"on {device.type}{' (FSDP)' if fsdp else ''}, micro-batch {micro} x {tc['grad_accum']} accumulation; "
              f"run dir {run_dir}" + (f"; resuming from step {step}" if step else ""))
        if tc["fsdp"] and not fsdp:
            print("train.fsdp: a single process has nothing to shard; it trains unsharded")
    from tqdm.auto import tqdm
    bar = tqdm(total=tc["steps"], initial=step, disable=not (main and lc["progress"]), dynamic_ncols=True)
    last_ckpt = latest_checkpoint(ckpt_dir)
    stop = StopSignal()
    loss_type, accum, clip = cfg["routing"]["loss"], tc["grad_accum"], oc["grad_clip"]
    no_sync = no_gradient_sync if fsdp else accelerator.no_sync
    window_loss, window_steps, window_start = 0.0, 0, time.time()
    model.train()
    try:
        while step < tc["steps"]:
            noise = torch.randn((tc["batch_size"], *shape), generator=generators["noise"], device=device)
            times = draw_times(diffusion, tc["batch_size"], generators["noise"], device)
            loss_sum = torch.zeros((), device=device)
            for j in range(accum):
                x, y = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                lo = (j * world + rank) * micro
                with no_sync(model) if j < accum - 1 else nullcontext():
                    losses = diffusion.training_losses(model, x, {"y": y}, loss_type=loss_type,
                                                       noise=noise[lo:lo + micro], t=times[lo:lo + micro])
                    loss = losses["loss"].mean()
                    accelerator.backward(loss / accum)
                loss_sum += loss.detach()
            flags = torch.stack([loss_sum / accum, torch.tensor(float(stop.received is not None), device=device)])
            loss_value, stopping = (accelerator.reduce(flags, "sum") / torch.tensor([world, 1], device=device)).tolist()
            if not math.isfinite(loss_value):
                raise TrainingError(f"non-finite loss ({loss_value}) at step {step + 1}; last good checkpoint: "
                                    f"{last_ckpt or 'none'}. Lower optim.lr, set optim.grad_clip, or check the data, "
                                    f"then continue with --resume")
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(raw_model)
            step += 1
            window_loss, window_steps = window_loss + loss_value, window_steps + 1
            bar.update(1)
            if main and (step % lc["every"] == 0 or step == tc["steps"]):
                elapsed = time.time() - window_start
                images_per_s = window_steps * tc["batch_size"] / elapsed
                memory = (torch.cuda.max_memory_allocated() if cuda
                          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
                values = {"loss": window_loss / window_steps, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": float(grad_norm), "images_per_s": images_per_s,
                          "tflops_per_device": 6 * macs * images_per_s / world / 1e12, "memory_gb": memory}
                metrics.log(step, values)
                bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{images_per_s:.0f}")
                window_loss, window_steps, window_start = 0.0, 0, time.time()
            if lc["grid_every"] and step % lc["grid_every"] == 0:
                sampler = ema.sampling_model()  # under FSDP a gather every rank joins
                if main:
                    write_grid(sampler, run_dir / "grids" / f"step-{step:07d}.png")
                accelerator.wait_for_everyone()
            if tc["ckpt_every"] and step % tc["ckpt_every"] == 0 or stopping:
                last_ckpt = save(step)
            if ec["every"] and step % ec["every"] == 0 and not stopping:
                evaluation(ema.sampling_model(), step)
            if stopping:
                if main:
                    bar.write(f"stopped by a signal at step {step}; checkpoint {last_ckpt}; continue with --resume")
                    metrics.close()
                return {"run_dir": run_dir, "step": step, "checkpoint": last_ckpt, "stopped": True}
    finally:
        stop.restore()
        bar.close()

    if last_ckpt is None or last_ckpt != checkpoint_path(ckpt_dir, step):
        last_ckpt = save(step)
    summary, grid = {"run_dir": run_dir, "step": step, "checkpoint": last_ckpt, "stopped": False}, None
    can_sample = decode is not None or not latent  # latents become images only through the VAE
    sampler = ema.sampling_model() if can_sample else None  # under FSDP a gather every rank joins
    if evaluation is not None:
        summary["eval"], grid = evaluation.final(sampler, step, run_dir)
    if main:
        plot_loss(metrics.path, run_dir / "loss.png")
        if grid is not None:
            save_grid(grid, run_dir / "samples.png", sc["grid_cols"] or sc["grid_per_class"])
        elif can_sample:
            write_grid(sampler, run_dir / "samples.png")
        metrics.close()
    accelerator.wait_for_everyone()
    return summary

