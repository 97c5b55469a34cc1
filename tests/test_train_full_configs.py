"""Every full-size config builds its model and trains one step at batch 1 on CPU (slow: minutes, ~20 GB)."""
import gc

import pytest
import torch

from ssm_tread.train import trainer
from ssm_tread.train.config import load_config

CONFIGS = ["configs/base.py", *(f"configs/dit_{s}2{t}.py" for s in ("s", "b", "l", "xl") for t in ("", "_tread")),
           *(f"configs/dim_{s}{t}.py" for s in ("s2", "b2", "l", "h") for t in ("", "_tread")),
           *(f"configs/zigma_{s}2{t}.py" for s in ("s", "b") for t in ("", "_tread"))]


class FakeLatents(torch.utils.data.Dataset):
    channels, image_size, num_classes = 4, 32, 1000

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.randn(4, 32, 32), torch.tensor(i)


@pytest.fixture(autouse=True)
def only_when_asked(request):
    if "slow" not in request.config.getoption("markexpr"):
        pytest.skip("full-size models, minutes each: run with -m slow")


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS)
def test_full_size_config_trains_one_step(path, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "build_dataset_from", lambda cfg: FakeLatents())
    monkeypatch.setattr(trainer, "validate_config", lambda cfg: None)  # no latents on disk
    monkeypatch.setattr(trainer, "save_checkpoint", lambda state, path: path)
    cfg = load_config(path, ["train.steps=1", "train.batch_size=1", "data.num_workers=0", "log.every=1",
                             "log.tensorboard=false", "log.progress=false", "log.grid_every=0",
                             f"train.run_dir={tmp_path}"])
    summary = trainer.train(cfg)
    assert summary["step"] == 1
    gc.collect()
