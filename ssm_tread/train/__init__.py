"""Training: plain Python configs, the training loop (DDP through accelerate), EMA and checkpoints."""
from ssm_tread.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from ssm_tread.train.config import ConfigError, load_config
from ssm_tread.train.trainer import TrainingError, train

__all__ = ["CheckpointError", "ConfigError", "TrainingError", "latest_checkpoint", "load_checkpoint", "load_config",
           "train"]
