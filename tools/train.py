"""Train a model from a config file.

    python tools/train.py configs/quickstart.py
    python tools/train.py configs/dit_b2_tread.py train.steps=1000 optim.lr=2e-4
    torchrun --nproc_per_node=8 tools/train.py configs/dim_l_tread.py data.root=/data/latents --resume
    torchrun --nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 --rdzv-id=$JOB \\
        tools/train.py configs/dit_xl2_tread.py data.root=/scratch/latents --timeout 900   # on each node

--resume continues the run in the run dir from its newest good checkpoint, with the run's config
(its config.json) plus the overrides given now; the learning-rate schedule follows from that config
and the step. Without --resume, a run dir that holds checkpoints is refused unless --overwrite is given
(which deletes them); no config key can do that. A bad config fails before anything is written: one
line per problem, exit code 2. SIGTERM or Ctrl-C stops a run within seconds (a sample grid or an
evaluation in progress is abandoned): it saves a checkpoint and exits with 128 + the signal's number
(143, 130), as a shell reports a process that a signal ended. --timeout bounds how long a rank waits for
the others (a node that died or hangs) before the run fails; it must exceed the longest time rank 0 works
alone (writing a checkpoint). tools/slurm/train.sbatch runs it on several nodes.
"""
import argparse
import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a busy CPU, spinning threads slow a run many times over.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.cli import ArgumentParser, positive_int, run_tool  # noqa: E402
from ssm_tread.train.config import load_config, resume_config  # noqa: E402
from ssm_tread.train.trainer import train  # noqa: E402


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a config file, e.g. configs/quickstart.py")
    parser.add_argument("overrides", nargs="*", help="group.key=value overrides, e.g. train.steps=100")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run dir's run from its newest good checkpoint (its config + these overrides)")
    start.add_argument("--overwrite", action="store_true",
                       help="start over in a run dir that holds an earlier run's checkpoints: deletes them")
    parser.add_argument("--timeout", type=positive_int, default=None, metavar="SECONDS",
                        help="fail the run when a rank waits this long for the others in a collective or at start-up "
                             "(default: torch's, 600 on NCCL, 1800 on gloo)")
    args = parser.parse_intermixed_args()  # --resume may come anywhere among the overrides
    main_rank = int(os.environ.get("RANK", 0)) == 0
    cfg = (resume_config(args.config, args.overrides, print if main_rank else lambda line: None) if args.resume
           else load_config(args.config, args.overrides))
    if "_study" in cfg and main_rank:
        print(f"{args.config} is a study: this trains its own config, one run of its grid; the whole grid: "
              f"python tools/benchmark.py study {args.config}")
    summary = train(cfg, overwrite=args.overwrite, timeout=args.timeout)
    if summary["stopped"]:  # exit as a shell reports a process a signal ended, so `train && sample` stops here
        sys.exit(128 + summary["signal"])


if __name__ == "__main__":
    run_tool(main, interrupted="the run dir keeps its checkpoints; continue with --resume")
