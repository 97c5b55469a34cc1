"""What the ranks of a run share besides gradients: the global batch each takes its slice of, the Python
objects they exchange, the check that they agree before step 1 (on several nodes each node has its own
command line and its own view of the files), and a node's CPU cores."""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from ssm_tread.errors import UserError
from ssm_tread.train.config import flat_config


class RanksDisagree(UserError, RuntimeError):
    """Ranks that would train different runs; the message names the rank, its host and what differs."""


class LostRanks(UserError, RuntimeError):
    """A collective failed: another rank died, hung past ``--timeout`` or was cut off. Printed by the first
    rank of every node (as ``error: rank N: ...``), since the node of rank 0 may be the one that died."""

    node_local = True


@contextmanager
def lost_ranks_stop_in_one_line(run):
    """Turn the process group's own error, raised in this rank when another one is gone (gloo: a RuntimeError
    naming its transport; NCCL: a DistBackendError), into :class:`LostRanks`, which names the newest
    checkpoint of ``run`` (a trainer Run) to resume from. Other errors pass unchanged."""
    try:
        yield
    except RuntimeError as e:
        if run.accelerator.num_processes == 1 or isinstance(e, UserError):
            raise
        if not (isinstance(e, dist.DistError) or "gloo" in str(e) or "NCCL" in str(e)):
            raise
        # gloo's first sentence, without its source location: "[.../pair.cc:561] Connection closed by peer [ip]:port."
        cause = str(e).strip().splitlines()[0].split("] ", 1)[-1].split(". ")[0].rstrip(".")
        resume = (f"the run dir keeps {run.last_ckpt.name}: continue with --resume" if run.last_ckpt else
                  "no checkpoint was written yet")
        raise LostRanks(f"lost the other ranks at step {run.step} ({cause}): a node died, hung past --timeout or "
                        f"was cut off, its own log says why; {resume}") from e


def cpu_threads_per_rank(wanted: int) -> int:
    """``wanted`` torch threads, at most this node's cores shared among its ranks (torchrun's
    LOCAL_WORLD_SIZE): more threads than cores only wait on each other."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(wanted, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


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

    def micro_slice(self, j: int) -> slice:
        """Where micro-batch ``j`` of this rank lies in its step's global batch (of samples, noise or times)."""
        lo = (j * self.world + self.rank) * self.micro
        return slice(lo, lo + self.micro)

    def __iter__(self):
        step = self.start_step
        while True:
            indices = self.global_indices(step)
            for j in range(self.batch // (self.micro * self.world)):
                yield indices[self.micro_slice(j)].tolist()
            step += 1


def gather_objects(obj, world: int) -> list:
    """``obj`` of every rank, in rank order (a collective every rank joins; [obj] for one process)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def check_ranks_agree(cfg: dict, state: dict | None, dataset, world: int) -> None:
    """Refuse, before step 1, ranks that disagree (each node has its own command line and its own view of the
    files): in the config (except ``data.root``, which may name a node-local copy of the latents), in the
    checkpoint they resume from, or in the size of their data set. Every rank raises the same one-line error."""
    flat = {k: v for k, v in flat_config(cfg).items() if k != "data.root"}
    mine = {"config": flat, "checkpoint": state and f"{Path(state['path']).name} (sha256 {state['checksum']})",
            "data": f"{len(dataset)} images of {dataset.num_classes} classes"}
    (host0, first), *others = gather_objects((socket.gethostname(), mine), world)
    for rank, (host, theirs) in enumerate(others, start=1):
        if differ := [k for k, v in first["config"].items() if theirs["config"].get(k) != v]:
            raise RanksDisagree(f"rank {rank} on {host} has another config than rank 0 on {host0} (differs in "
                               f"{', '.join(differ)}): give every node the same command line (only data.root may "
                               f"differ, naming a node-local copy of the latents)")
        if theirs["checkpoint"] != first["checkpoint"]:
            raise RanksDisagree(f"rank {rank} on {host} resumes from {theirs['checkpoint']}, rank 0 on {host0} from "
                               f"{first['checkpoint']}: the nodes see different files in the run dir; put "
                               f"train.run_dir on the file system that every node shares")
        if theirs["data"] != first["data"]:
            raise RanksDisagree(f"rank {rank} on {host} reads {theirs['data']} from data.root, rank 0 on {host0} "
                               f"{first['data']}: give every node a complete copy of the same latents")
