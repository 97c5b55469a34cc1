"""Training: plain Python configs (``config``), one training step (``step``), the training loop
(``trainer.train``: DDP through accelerate, or FSDP), EMA (``ema``) and evaluation during training.

The package imports nothing on its own, so that ``ssm_tread.train.step`` can be used without the loop's
dependencies (accelerate, tensorboard): import from the submodules, e.g.
``from ssm_tread.train.trainer import train``.
"""
