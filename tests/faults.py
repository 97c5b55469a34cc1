"""Run a command-line tool under one injected fault, for the reliability tests:

    python tests/faults.py FAULT tools/train.py configs/quickstart.py ...

The tool runs unchanged (``runpy`` as ``__main__``); the fault stands in for what cannot be staged
portably on a test machine (a full disk, a read-only file system when tests run as root, a Ctrl-C at a
given moment, weights that diverge while the loss stays finite).
"""
import errno
import os
import runpy
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def disk_full_on_second_checkpoint():
    """Writing the second checkpoint file fails with ENOSPC, as on a full disk."""
    from ssm_tread import checkpoint

    opened = []

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" in mode:
            opened.append(path)
            if len(opened) >= 2:
                return FullDisk(f)
        return f

    checkpoint.open = full_open


def read_only_run_dir():
    """Every file created under train.run_dir fails with EROFS, as on a read-only mount."""
    run_dir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("train.run_dir="))
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(run_dir) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    os.open = read_only


def ctrl_c_during_start_up():
    """Ctrl-C arrives while the data set is being built."""
    from ssm_tread.train import trainer

    # as in a terminal: a test run started in the background (``cmd &``) inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)

    build = trainer.build_dataset_from

    def interrupted(cfg):
        os.kill(os.getpid(), signal.SIGINT)
        return build(cfg)

    trainer.build_dataset_from = interrupted


def ema_diverges_at_step_3():
    """The EMA weights turn NaN at step 3 while the training loss stays finite."""
    import torch

    from ssm_tread.train.ema import EMA

    update, count = EMA.update, []

    def diverging(self, model):
        update(self, model)
        count.append(1)
        if len(count) == 3:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))

    EMA.update = diverging


def sigterm_while_sampling():
    """SIGTERM arrives as the first sampling (a grid or an evaluation's first chunk) starts; every sampling
    call prints a line "fault: sampling"."""
    from ssm_tread import sampling

    generate, calls = sampling.generate, []

    def signalled(*args, **kwargs):
        print("fault: sampling", flush=True)
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return generate(*args, **kwargs)

    sampling.generate = signalled  # before the trainer imports it


def ctrl_c_twice():
    """Ctrl-C during start-up, and again while the interpreter runs its exit handlers (atexit)."""
    import atexit
    import time

    atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(1)))  # runs last: registered first
    ctrl_c_during_start_up()


FAULTS = {f.__name__.replace("_", "-"): f for f in
          (disk_full_on_second_checkpoint, read_only_run_dir, ctrl_c_during_start_up, ema_diverges_at_step_3,
           sigterm_while_sampling, ctrl_c_twice)}

if __name__ == "__main__":
    fault, tool, *args = sys.argv[1:]
    sys.argv = [tool, *args]
    FAULTS[fault]()
    runpy.run_path(tool, run_name="__main__")
