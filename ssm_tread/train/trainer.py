"""The training loop: one process or many (torchrun, DDP through accelerate, or FSDP), CUDA or CPU (gloo).

``train(cfg)`` validates the whole config (ssm_tread.train.validate), takes the run dir's lock
(ssm_tread.train.runlock), then runs :func:`setup` (build or restore the model, EMA, optimizer, data stream
and outputs into a :class:`Run`), :func:`loop` (the steps, with logging, grids, checkpoints, evaluations
and signals) and :func:`finish` (last checkpoint, final evaluation, samples). One step is
:class:`ssm_tread.train.step.TrainStep`, the same the step benchmark and the convergence study run.

Reproducibility: the data order, the noise and the diffusion times of every step are drawn for the
whole global batch from generators seeded the same on every rank, and each rank takes its slice, so
they do not depend on the number of ranks or nodes. Routing selections, label dropout and the latents'
flips and posterior samples use per-rank generators. A run resumed on another number of ranks continues
the data order, the noise and the times exactly and restarts the per-rank streams; it must keep the global
batch (another one is refused: it would skip or repeat samples). On several nodes the ranks check before
step 1 that they run the same config (``data.root`` may differ: a node-local copy of the latents), resume
from the same checkpoint and read data sets of the same size. A checkpoint (ssm_tread.checkpoint lists its
keys) holds the model, the EMA, the optimizer, the step, the RNG states of every rank and the training clock;
the data position is the step itself, and the learning rate a function of the config and the step
(ssm_tread.train.step.schedule_at). Under FSDP (``train.fsdp``, see ssm_tread.train.fsdp) its states are
gathered in full: the same checkpoint as without it.
"""
from __future__ import annotations

import math
import os
import signal
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.data import DataLoader

from ssm_tread.checkpoint import (
    checkpoint_path,
    checkpoint_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_newest_good,
    load_weights,
    prune_checkpoints,
    remove_partial_checkpoints,
    save_checkpoint,
)
from ssm_tread.errors import UserError
from ssm_tread.machine import loader_workers, node_ranks
from ssm_tread.models import count_macs
from ssm_tread.ops import allow_tf32, set_backend
from ssm_tread.progress import progress_bar
from ssm_tread.sampling import generate, grid_labels, load_vae, noise_shape, save_grid
from ssm_tread.train.config import ConfigError, grid_classes, model_spec, run_dir_of, save_config
from ssm_tread.train.distributed import (GlobalBatches, check_ranks_agree, cpu_threads_per_rank, gather_objects,
                                        lost_ranks_stop_in_one_line)
from ssm_tread.train.ema import EMA
from ssm_tread.train.evaluation import Evaluation
from ssm_tread.train.fsdp import (
    full_optimizer_state,
    full_state_dict,
    is_sharded,
    load_optimizer_state,
    no_gradient_sync,
    shard,
)
from ssm_tread.train.metrics import Metrics, Window, plot_loss
from ssm_tread.train.rng import isolated_rng, rng_state, set_rng_state
from ssm_tread.train.runlock import RunLock
from ssm_tread.train.step import TrainStep, build_optimizer, schedule_at
from ssm_tread.train.validate import validate_config


class TrainingError(UserError, RuntimeError):
    """A run that cannot go on; the message names the problem and the fix."""


def build_dataset_from(cfg: dict):
    from ssm_tread.data import build_dataset

    data = cfg["data"]
    if data["name"] != "latents":
        return build_dataset(data["name"], **data["kwargs"])
    try:
        return build_dataset("latents", root=data["root"], verify=data["verify"], progress=cfg["log"]["progress"],
                             **data["kwargs"])
    except UserError as e:  # data.root may be a copy on this node's own disk
        e.node_local = True
        raise


def select_scan_backend(name: str | None) -> None:
    """Force the selective-scan backend for this process (None: automatic; see ssm_tread.ops)."""
    try:
        set_backend(name)
    except ValueError as e:
        raise ConfigError(f"model.scan_backend: {e}") from None


def _ignore_sigint(worker_id: int) -> None:
    """Data-loader workers leave Ctrl-C to the training process, which saves a checkpoint first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Abandon(Exception):
    """A stop signal arrived during work that :meth:`StopSignal.interruptible` runs."""


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked between steps, and ends at once the work run through
    :meth:`interruptible` (sample grids, evaluations); a second signal acts as usual."""

    def __init__(self):
        self.received = None  # the signal's number
        self._interruptible = False
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.received = signum
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self._interruptible:
            raise Abandon

    def interruptible(self, work, *args):
        """``work(*args)``, or None when a stop signal came before it or ends it (between two Python lines)."""
        if self.received is not None:
            return None
        self._interruptible = True
        try:
            return work(*args)
        except Abandon:
            return None
        finally:
            self._interruptible = False

    def agreed(self, world: int) -> bool:
        """Whether any rank received a stop signal (a collective every rank joins)."""
        return any(gather_objects(self.received is not None, world))

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def find_resume(cfg: dict, ckpt_dir: Path, say=print, overwrite: bool = False) -> dict | None:
    """The loaded checkpoint to continue from, or None for a fresh run, which replaces the checkpoints of an
    earlier run only with ``overwrite`` (asked for on the command line: tools/train.py --overwrite).

    ``train.resume=auto`` takes the newest good checkpoint, saying which corrupt ones it passed over, or
    says that it starts fresh when there is none."""
    resume, newest = cfg["train"]["resume"], latest_checkpoint(ckpt_dir)
    if resume == "auto":
        state = load_newest_good(ckpt_dir, say)
        if state is None:
            say(f"--resume: no checkpoint in {ckpt_dir}; starting fresh from step 0")
        return state and check_batch(cfg, state)
    if resume != "none":
        return check_batch(cfg, load_checkpoint(resume))
    if newest is not None and not overwrite:
        raise TrainingError(f"{ckpt_dir} already holds checkpoints (newest {newest.name}): continue that run with "
                            f"--resume, start over with --overwrite (deletes them), or choose another train.run_dir")
    return None


def check_batch(cfg: dict, state: dict) -> dict:
    """``state``, if it was trained with the global batch of ``cfg``: the data position is the step times the global
    batch, the same on any number of ranks, but another batch would skip or repeat samples."""
    saved, batch = state.get("config", {}).get("train", {}).get("batch_size", None), cfg["train"]["batch_size"]
    if saved is not None and saved != batch:
        raise TrainingError(f"train.batch_size={batch} differs from the {saved} of checkpoint {state['path']}: the "
                            f"data position is the step times the global batch, so the run would skip or repeat "
                            f"samples; resume with train.batch_size={saved} (on another number of ranks, set "
                            f"train.grad_accum so that ranks x train.grad_accum divides it)")
    return state


@dataclass
class Run:
    """Everything a run holds between setup, the loop and the finish; the loop advances ``step``, ``clock`` and
    ``last_ckpt``."""

    cfg: dict
    accelerator: object
    run_dir: Path
    dataset: object
    model: torch.nn.Module  # what the forward runs: wrapped by DDP, torch.compile or FSDP's autocast
    raw_model: torch.nn.Module
    ema: EMA
    diffusion: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    generators: dict
    step: int
    clock: list  # training time so far [wall s, CPU s], evaluations, grids and checkpoints excluded
    model_name: str
    model_kwargs: dict
    macs: int  # forward MACs per image, routed
    train_step: TrainStep
    batch_order: GlobalBatches  # the samples, noise and times of each of this rank's micro-batches
    batches: object  # the data loader's micro-batches, in that order
    workers: int  # data-loader worker processes of this rank
    decode: object  # latents -> images; None for pixel data, or latents without grids and evaluation
    metrics: Metrics | None  # rank 0's
    evaluation: Evaluation | None
    last_ckpt: Path | None

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def train(cfg: dict, overwrite: bool = False, timeout: float | None = None) -> dict:
    """Train as ``cfg`` says; returns a summary (run_dir, step, last checkpoint, final eval metrics).
    ``overwrite``: a fresh run (``train.resume=none``) may delete the checkpoints of an earlier run in the
    run dir; without it such a run dir is refused. ``timeout``: the seconds a rank waits for the others in
    a collective, and at start-up, before the run fails (None: torch's, 10 min on NCCL, 30 on gloo).

    The whole config is checked first (ConfigError, one line per problem; nothing is created). Global rank 0
    (RANK, over every node) holds the run dir's lock while the run lasts: one lock per run, not per node."""
    validate_config(cfg)
    with RunLock(run_dir_of(cfg)) if int(os.environ.get("RANK", 0)) == 0 else nullcontext():
        run = setup(cfg, overwrite, timeout)
        with lost_ranks_stop_in_one_line(run):
            if stopped := loop(run):
                return {"run_dir": run.run_dir, "step": run.step, "checkpoint": run.last_ckpt, "stopped": True,
                        "signal": stopped}
            return finish(run)


def start_accelerator(tc: dict, timeout: float | None = None):
    """Accelerate's view of the processes (DDP, bf16 autocast on CUDA, collectives that fail after ``timeout``
    seconds) and this process's thread and TF32 settings."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    wait = [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout))] if timeout else None
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda and tc["precision"] == "bf16" else "no",
                              kwargs_handlers=wait)
    if not cuda and tc["cpu_threads"]:
        torch.set_num_threads(cpu_threads_per_rank(tc["cpu_threads"]))
    if cuda and tc["tf32"]:
        allow_tf32()
    return accelerator


def setup(cfg: dict, overwrite: bool = False, timeout: float | None = None) -> Run:
    """Build or restore the model, EMA, optimizer and data stream, and open the outputs (the config is valid)."""
    tc = cfg["train"]
    accelerator = start_accelerator(tc, timeout)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    select_scan_backend(cfg["model"]["scan_backend"])
    run_dir = run_dir_of(cfg)
    state = find_resume(cfg, run_dir / "checkpoints", print if accelerator.is_main_process else lambda line: None,
                        overwrite)
    accelerator.wait_for_everyone()

    dataset = build_dataset_from(cfg)
    if world > 1:
        check_ranks_agree(cfg, state, dataset, world)
    trained = build_state(cfg, accelerator, dataset, state)
    train_step = TrainStep(trained["model"], trained["diffusion"], trained["optimizer"], trained["scheduler"],
                           trained["ema"], loss_type=cfg["routing"]["loss"], grad_clip=cfg["optim"]["grad_clip"],
                           no_sync=no_gradient_sync if is_sharded(trained["raw_model"]) else accelerator.no_sync)
    batch_order = GlobalBatches(len(dataset), tc["batch_size"], tc["batch_size"] // (world * tc["grad_accum"]), rank,
                                world, tc["seed"], trained["step"])
    workers = loader_workers(node_ranks()) if cfg["data"]["num_workers"] is None else cfg["data"]["num_workers"]
    loader = DataLoader(dataset, num_workers=workers, pin_memory=device.type == "cuda", batch_sampler=batch_order,
                        generator=torch.Generator().manual_seed(tc["seed"] + rank), worker_init_fn=_ignore_sigint,
                        persistent_workers=workers > 0)
    batches = iter(loader)
    outputs = open_outputs(cfg, accelerator, run_dir, dataset, trained, fresh=state is None)
    run = Run(cfg=cfg, accelerator=accelerator, run_dir=run_dir, dataset=dataset, **trained, train_step=train_step,
              batch_order=batch_order, batches=batches, workers=workers, **outputs)
    if run.main:
        announce(run)
    return run


def build_state(cfg: dict, accelerator, dataset, state: dict | None) -> dict:
    """The model, its EMA, the diffusion, AdamW and its schedule, and the RNG streams: new (seeded) or from
    the loaded checkpoint ``state``; sharded under FSDP, wrapped for DDP otherwise. Keyed as the fields of
    :class:`Run`."""
    from ssm_tread.diffusion import create_diffusion
    from ssm_tread.models import create_model

    tc, oc = cfg["train"], cfg["optim"]
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    torch.manual_seed(tc["seed"])
    model_name, model_kwargs = model_spec(cfg, dataset)
    model = create_model(model_name, **model_kwargs).to(device)
    if state is None and tc["init_from"]:  # fine-tuning: a fresh run from another run's (or a converted) EMA weights
        init = load_checkpoint(tc["init_from"])
        # an unconditional checkpoint (e.g. an official ZigMa) starts a class-conditional model: new label table
        new_labels = init.get("model_kwargs", {}).get("num_classes") == 0 and model.num_classes > 0
        load_weights(model, init.get("ema", init["model"]), f"train.init_from={tc['init_from']!r}",
                     keep_initialised=("y_embedder.",) if new_labels else ())
        if new_labels and rank == 0:
            print("train.init_from: the checkpoint is unconditional; the label embedding starts from its "
                  "initialisation")
    macs = count_macs(model, routed=True)
    ema = EMA(model, tc["ema_decay"])
    generators = {"noise": torch.Generator(device).manual_seed(tc["seed"]),
                  "routing": torch.Generator(device).manual_seed(tc["seed"] * 1009 + rank + 1)}
    model.router.generator = generators["routing"]
    if state is not None:
        load_weights(model, state["model"], f"checkpoint {state['path']}")
        ema.load_state_dict(state["ema"])
    fsdp = tc["fsdp"] and world > 1
    if fsdp:  # the full weights are in; the optimizer takes the sharded parameters
        mesh = init_device_mesh(device.type, (world,))
        shard(model, mesh, bf16=accelerator.mixed_precision == "bf16")
        ema.shard(mesh)
    optimizer, scheduler = build_optimizer(model, oc, tc["steps"])
    step = state["step"] if state is not None else 0
    if state is not None:
        load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler = schedule_at(optimizer, oc, tc["steps"], step)  # the config given now, not the checkpoint's
    torch.manual_seed(tc["seed"] * 1009 + rank + step)
    if state is not None and len(state["rng"]) == world:
        set_rng_state(state["rng"][rank], generators)
    elif state is not None:  # the noise stream is the same on every rank (it draws for the global batch)
        generators["noise"].set_state(state["rng"][0]["noise"])
        if accelerator.is_main_process:
            print(f"resuming on {world} ranks from a checkpoint of {len(state['rng'])}: the data order, noise and "
                  f"diffusion times continue; the per-rank streams (routing selections, label dropout, the latents' "
                  f"flips and posterior samples) restart")

    raw_model = model
    if tc["compile"]:
        model = torch.compile(model)
    if fsdp:  # what accelerator.prepare does besides DDP: autocast the forward (the root returns fp32)
        model.forward = accelerator.autocast()(model.forward)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    return dict(model=model, raw_model=raw_model, ema=ema,
                diffusion=create_diffusion(cfg["diffusion"]["objective"], **cfg["diffusion"]["kwargs"]),
                optimizer=optimizer, scheduler=scheduler, generators=generators, step=step,
                clock=list(state.get("clock", [0.0, 0.0])) if state is not None else [0.0, 0.0],
                model_name=model_name, model_kwargs=model_kwargs, macs=macs)


def open_outputs(cfg: dict, accelerator, run_dir: Path, dataset, trained: dict, fresh: bool) -> dict:
    """The VAE decoder (latent models that sample), metrics.jsonl, the evaluation and the newest checkpoint, keyed
    as the fields of :class:`Run`; ``trained`` is :func:`build_state`'s."""
    device, main = accelerator.device, accelerator.is_main_process
    lc, sc, ec = cfg["log"], cfg["sample"], cfg["eval"]
    ckpt_dir, decode = run_dir / "checkpoints", None
    if cfg["data"]["name"] == "latents" and (lc["grid_every"] or ec["num_samples"]):
        try:
            decode = load_vae(sc["vae"], device, dataset.scale_factor)  # what the dataset multiplied the latents by
        except FileNotFoundError as e:
            raise ConfigError(f"{e}; or turn off sample grids (log.grid_every=0) and evaluation "
                              f"(eval.num_samples=0 eval.every=0)") from None
    if main:  # the run has started: its config replaces the one of the run dir
        save_config(cfg, run_dir / "config.json")
        remove_partial_checkpoints(ckpt_dir)  # a killed write's temp files (rank 0 holds the run dir's lock)
    if main and fresh:
        for _, old in list_checkpoints(ckpt_dir):  # an earlier run's, with --overwrite
            old.unlink()
    metrics = Metrics(run_dir, lc["tensorboard"], trained["step"]) if main else None
    evaluation = None
    if ec["num_samples"]:
        evaluation = Evaluation(cfg, dataset.num_classes, noise_shape(trained["raw_model"]), trained["diffusion"],
                                device, decode, metrics, accelerator.process_index, accelerator.num_processes)
    return dict(decode=decode, metrics=metrics, evaluation=evaluation, last_ckpt=latest_checkpoint(ckpt_dir))


def announce(run: Run) -> None:
    """The run's banner: the model, its cost, the ranks, the batch and where it continues from."""
    cfg, device = run.cfg, run.accelerator.device
    params = sum(p.numel() for p in run.raw_model.parameters())
    world, fsdp = run.accelerator.num_processes, is_sharded(run.raw_model)
    print(f"{run.model_name}: {params / 1e6:.2f}M parameters, {run.macs / 1e9:.3f} GMACs/image routed; {world} "
          f"rank(s) on {device.type}{' (FSDP)' if fsdp else ''}, micro-batch {run.batch_order.micro} x "
          f"{cfg['train']['grad_accum']} accumulation, {run.workers} loader worker(s); run dir {run.run_dir}"
          + (f"; resuming from step {run.step}" if run.step else ""))
    if cfg["train"]["fsdp"] and not fsdp:
        print("train.fsdp: a single process has nothing to shard; it trains unsharded")
    if run.step >= cfg["train"]["steps"]:
        print(f"the run is complete at step {run.step} (train.steps={cfg['train']['steps']}): nothing to train, "
              f"only its final outputs are made again; to train longer, resume with a larger train.steps")


def loop(run: Run) -> int:
    """Train from ``run.step`` to ``train.steps``; returns the number of the signal that stopped the run (after a
    checkpoint; a grid or an evaluation in progress is abandoned), else 0."""
    cfg, accelerator = run.cfg, run.accelerator
    tc, lc, ec = cfg["train"], cfg["log"], cfg["eval"]
    device, world, shape = accelerator.device, accelerator.num_processes, noise_shape(run.raw_model)
    window = Window(run.clock)
    bar = progress_bar(total=tc["steps"], initial=run.step, enabled=run.main and lc["progress"], dynamic_ncols=True)
    stop = StopSignal()
    run.model.train()
    try:
        while run.step < tc["steps"]:
            window.start_step()
            noise = torch.randn((tc["batch_size"], *shape), generator=run.generators["noise"], device=device)
            times = run.diffusion.sample_time(noise, run.generators["noise"])
            micro_batches = []
            for j in range(tc["grad_accum"]):
                x, y = next(run.batches)
                part = run.batch_order.micro_slice(j)
                micro_batches.append((x.to(device, non_blocking=True), y.to(device, non_blocking=True), noise[part],
                                      times[part]))
            loss = run.train_step.backward(micro_batches)
            # one all-reduce per step of what the ranks must agree on before the update: the mean loss (logged; a
            # non-finite one stops every rank before its step is applied) and whether any rank got a stop signal. The
            # flag needs this host sync every step, so the loss rides along (nanoGPT reads its loss only to log).
            flags = torch.stack([loss, torch.tensor(float(stop.received is not None), device=device)])
            loss_value, stopping = (accelerator.reduce(flags, "sum") / torch.tensor([world, 1], device=device)).tolist()
            if not math.isfinite(loss_value):
                raise TrainingError(f"non-finite loss ({loss_value}) at step {run.step + 1}; last good checkpoint: "
                                    f"{run.last_ckpt or 'none'}. Lower optim.lr, set optim.grad_clip, or check the "
                                    f"data, then continue with --resume")
            grad_norm = run.train_step.update()
            run.step += 1
            window.end_step(loss_value)
            bar.update(1)
            if run.main and (run.step % lc["every"] == 0 or run.step == tc["steps"]):
                values = window.flush(tc["batch_size"], run.macs, world, run.scheduler.get_last_lr()[0], grad_norm)
                run.metrics.log(run.step, values)
                bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.0f}")
            if lc["grid_every"] and run.step % lc["grid_every"] == 0 and not stopping:
                ema_model = run.ema.sampling_model()  # under FSDP a gather every rank joins
                if run.main:
                    stop.interruptible(write_grid, run, ema_model, run.run_dir / "grids" / f"step-{run.step:07d}.png")
                stopping = stop.agreed(world)
            if tc["ckpt_every"] and run.step % tc["ckpt_every"] == 0 or stopping:
                run.last_ckpt = save(run)
            if ec["every"] and run.step % ec["every"] == 0 and not stopping:
                run.evaluation(run.ema.sampling_model(), run.step, stop.interruptible)
                stopping = stop.agreed(world)
                if stopping and run.last_ckpt != checkpoint_path(run.ckpt_dir, run.step):
                    run.last_ckpt = save(run)
            if stopping:
                signum = stop.received or signal.SIGTERM  # another rank's signal stopped this one
                if run.main:
                    bar.write(f"stopped by {signal.Signals(signum).name} at step {run.step}; checkpoint "
                              f"{run.last_ckpt}; continue with --resume")
                    run.metrics.close()
                return signum
    finally:
        stop.restore()
        bar.close()
    return 0


def write_grid(run: Run, ema_model, path: Path) -> None:
    """A grid of ``sample.grid_classes`` x ``sample.grid_per_class`` samples of ``ema_model`` from fixed noise."""
    sc, device = run.cfg["sample"], run.accelerator.device
    labels = grid_labels(grid_classes(sc, run.dataset.num_classes), sc["grid_per_class"], device)
    generator = torch.Generator().manual_seed(sc["seed"])
    noise = torch.randn((len(labels), *noise_shape(run.raw_model)), generator=generator)
    with isolated_rng(device):  # the training's draws stay as they were
        images = generate(ema_model, run.diffusion, labels, noise.to(device), sc, run.decode,
                          torch.Generator(device).manual_seed(sc["seed"]))
    save_grid(images, path, sc["grid_cols"] or sc["grid_per_class"])


def save(run: Run) -> Path:
    """A checkpoint of the current step (a collective every rank joins; rank 0 writes it and prunes)."""
    tc, world = run.cfg["train"], run.accelerator.num_processes
    states = gather_objects(rng_state(run.generators), world)
    path = checkpoint_path(run.ckpt_dir, run.step)
    weights, ema_weights = full_state_dict(run.raw_model), run.ema.state_dict()  # under FSDP: gathered to rank 0
    optimizer_state = full_optimizer_state(run.raw_model, run.optimizer)
    if run.main:
        save_checkpoint(checkpoint_state(model=weights, ema=ema_weights, step=run.step, config=run.cfg,
                                         model_name=run.model_name, model_kwargs=run.model_kwargs,
                                         optimizer=optimizer_state, rng=states, clock=list(run.clock)), path)
        prune_checkpoints(run.ckpt_dir, tc["keep_last"], tc["keep_every"])
    run.accelerator.wait_for_everyone()
    return path


def finish(run: Run) -> dict:
    """The last checkpoint, the final evaluation (eval.json), samples.png and loss.png."""
    sc = run.cfg["sample"]
    if run.last_ckpt is None or run.last_ckpt != checkpoint_path(run.ckpt_dir, run.step):
        run.last_ckpt = save(run)
    summary, grid = {"run_dir": run.run_dir, "step": run.step, "checkpoint": run.last_ckpt, "stopped": False}, None
    can_sample = run.decode is not None or run.cfg["data"]["name"] != "latents"  # latents need the VAE
    ema_model = run.ema.sampling_model() if can_sample else None  # under FSDP a gather every rank joins
    if run.evaluation is not None:
        summary["eval"], grid = run.evaluation.final(ema_model, run.step, run.run_dir)
    if run.main:
        plot_loss(run.metrics.path, run.run_dir / "loss.png")
        if grid is not None:
            save_grid(grid, run.run_dir / "samples.png", sc["grid_cols"] or sc["grid_per_class"])
        elif can_sample:
            write_grid(run, ema_model, run.run_dir / "samples.png")
        run.metrics.close()
    run.accelerator.wait_for_everyone()
    return summary
