"""Convert an official DiT, DiM or ZigMa checkpoint into one that tools/sample.py and tools/train.py accept.

    python tools/convert_checkpoint.py --arch dim nnet_ema.pth runs/dim_h_official/checkpoints/step-0000000.pt
    python tools/sample.py runs/dim_h_official --num-images 50000 --labels balanced --out dim_h.npz
    python tools/train.py configs/dim_h_tread.py train.init_from=runs/dim_h_official   # fine-tune with TREAD
    # the ImageNet-512 fine-tune (its 64000-step nnet_ema.pth), then TREAD on 512 latents from it
    python tools/convert_checkpoint.py --arch dim nnet_ema.pth runs/dim_h_512_official/checkpoints/step-0000000.pt
    python tools/train.py configs/dim_h_512_tread.py train.init_from=runs/dim_h_512_official
    python tools/convert_checkpoint.py --arch dit DiT-XL-2-512x512.pt \\
        runs/dit_xl2_512_official/checkpoints/step-0000000.pt

IN: an official checkpoint (DiT: facebookresearch/DiT's ``DiT-XL-2-{256x256,512x512}.pt``; DiM:
tyshiwo1/DiM-DiffusionMamba's ``nnet_ema.pth``; ZigMa: CompVis/zigma);
nested ``ema`` / ``model`` / ``state_dict`` entries and ``module.`` prefixes are unwrapped, the EMA is
preferred. The model's sizes are read off the weights (``--set`` overrides our constructor keywords).

OUT: a checkpoint in this project's format: the weights as both ``model`` and ``ema``, ``model_name``
and ``model_kwargs``, and a resolved ``config`` (``--config``, default configs/dit_xl2.py, dim_l.py or
zigma_b2.py, for a 64x64 latent (ImageNet-512) dit_xl2_512.py, dim_h_512.py or zigma_b2_512.py, plus
overrides) with the official model's sampling conventions: for DiM the scaled-linear DDPM schedule
with the model fed n = step + 1, 50 DPM-Solver steps (the official evaluation's sampler) and guidance
scale 1.4 (1.7 for the ImageNet-512 fine-tune, whose padding layout "rho_pad" is set from its 32x32 grid).
"""
import argparse
import ast
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tools.cli import ArgumentParser, fail, run_tool  # noqa: E402
from ssm_tread.checkpoint import checkpoint_state, save_checkpoint  # noqa: E402
from ssm_tread.models import load_official  # noqa: E402
from ssm_tread.models.official import check_arch, infer_kwargs  # noqa: E402
from ssm_tread.train.config import load_config  # noqa: E402

CONFIGS = {"DiT": "configs/dit_xl2.py", "DiM": "configs/dim_l.py", "ZigMa": "configs/zigma_b2.py"}
CONFIGS_512 = {"DiT": "configs/dit_xl2_512.py", "DiM": "configs/dim_h_512.py",  # for a 64x64 latent
               "ZigMa": "configs/zigma_b2_512.py"}
# the official DiM evaluation's guidance, 1 + config.sample.scale, by latent size: 0.4 in
# configs/imagenet256_{L,H}_DiM.py, 0.7 in configs/imagenet512_H_DiM_ft.py (tyshiwo1/DiM-DiffusionMamba)
DIM_CFG_SCALE = {32: 1.4, 64: 1.7}
# the settings every run of our trainer fills from its data and config; the rest go to model.kwargs
TRAINER_KEYS = ("input_size", "in_channels", "num_classes", "learn_sigma", "class_dropout_prob")


def converted_config(arch: str, kwargs: dict, config_path: str, overrides: list[str]) -> dict:
    """The resolved config of the converted checkpoint: ``config_path`` + ``overrides``, its model set to
    the converted one and, for DiM, the official diffusion and guidance conventions."""
    cfg = load_config(config_path, overrides)
    cfg["model"].update(name=arch, learn_sigma=kwargs["learn_sigma"], class_dropout_prob=kwargs["class_dropout_prob"],
                        kwargs={k: v for k, v in kwargs.items() if k not in TRAINER_KEYS})
    if arch == "DiM":
        cfg["diffusion"] = {"objective": "ddpm", "kwargs": {"schedule": "scaled_linear", "timestep_offset": 1}}
        cfg_scale = DIM_CFG_SCALE.get(kwargs.get("input_size"), DIM_CFG_SCALE[32])
        cfg["sample"].update(sampler="dpm_solver", steps=50, cfg_scale=cfg_scale, guided_channels=None)
    elif arch == "ZigMa" and kwargs["num_classes"] == 0:
        cfg["sample"]["cfg_scale"] = 1.0
    return cfg


def convert(arch: str, source: str, out: str, config_path: str | None = None, overrides: list[str] = (),
            model_overrides: dict | None = None) -> Path:
    arch = check_arch(arch)
    official = torch.load(source, map_location="cpu", weights_only=True)
    kwargs = infer_kwargs(arch, official, **(model_overrides or {}))
    kwargs.setdefault("class_dropout_prob", 0.1)  # DiM: trained with label dropout into its null row
    model = load_official(arch, official, **kwargs)  # raises on any mismatch, before anything is written
    weights = model.state_dict()
    default_config = (CONFIGS_512 if kwargs.get("input_size") == 64 else CONFIGS)[arch]
    cfg = converted_config(arch, kwargs, config_path or default_config, list(overrides))
    return save_checkpoint(checkpoint_state(model=weights, ema=weights, step=0, config=cfg, model_name=arch,
                                            model_kwargs=kwargs, converted_from=os.path.abspath(source)), out)


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, type=str.lower, choices=["dit", "dim", "zigma"])
    parser.add_argument("input", help="official checkpoint (.pth / .pt / .ckpt)")
    parser.add_argument("output", help="converted checkpoint, e.g. runs/dim_h_official/checkpoints/step-0000000.pt")
    parser.add_argument("--config", help="config file for the converted run (default: configs/dit_xl2.py, dim_l.py "
                                         "or zigma_b2.py; at 512: dit_xl2_512.py, dim_h_512.py or zigma_b2_512.py)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one of our constructor keywords, e.g. --set class_dropout_prob=0.15 (repeatable)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. sample.cfg_scale=1.5")
    args = parser.parse_intermixed_args()
    if not Path(args.input).is_file():
        fail(f"{args.input} not found; pass the official checkpoint file")
    model_overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            model_overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            fail(f"--set {item!r} is not KEY=VALUE with a Python literal value (e.g. input_size=32)")
    path = convert(args.arch, args.input, args.output, args.config, args.overrides, model_overrides)
    print(f"wrote {path}")


if __name__ == "__main__":
    run_tool(main, expected=(ValueError,))
