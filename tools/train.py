"""Train a model from a config file.

    python tools/train.py configs/quickstart.py
    python tools/train.py configs/dit_b2_tread.py train.steps=1000 optim.lr=2e-4
    torchrun --nproc_per_node=8 tools/train.py configs/dim_l_tread.py data.root=/data/latents --resume
"""
import argparse
import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a busy CPU, spinning threads slow a run many times over.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssm_tread.checkpoint import CheckpointError
from ssm_tread.train.config import ConfigError, load_config
from ssm_tread.train.trainer import TrainingError, train


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a config file, e.g. configs/quickstart.py")
    parser.add_argument("overrides", nargs="*", help="group.key=value overrides, e.g. train.steps=100")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run dir")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides + (["train.resume=auto"] if args.resume else []))
        if "_study" in cfg:
            print(f"{args.config} is a study: this trains its own config, one run of its grid; the whole grid: "
                  f"python tools/benchmark.py study {args.config}")
        train(cfg)
    except (ConfigError, CheckpointError, TrainingError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
