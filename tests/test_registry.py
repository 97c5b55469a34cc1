"""create_model: presets, family names, overrides and the errors for bad names and keys."""

from __future__ import annotations

import importlib

import pytest
import torch

from ssm_tread.models import FAMILIES, MODEL_NAMES, create_model
from ssm_tread.models.dit import DiT
from ssm_tread.routing import Route

DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def test_model_names():
    expected = (
        [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]
        + ["DiM-S/2", "DiM-B/2", "DiM-L/2", "DiM-H/2"]
        + [f"ZigMa-{s}/{p}" for s in ("S", "B", "M", "L", "H") for p in (1, 2, 4)]
    )
    assert sorted(MODEL_NAMES) == sorted(expected)
    assert set(FAMILIES) == {"DiT", "DiM", "ZigMa"}


@pytest.mark.parametrize("size", DIT_SIZES)
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_dit_presets(size, patch):
    with torch.device("meta"):
        model = create_model(f"DiT-{size}/{patch}")
    depth, width, heads = DIT_SIZES[size]
    assert isinstance(model, DiT)
    assert (len(model.blocks), model.pos_embed.shape[-1], model.blocks[0].attn.num_heads) == (depth, width, heads)
    assert model.patch_size == patch and model.input_size == 32 and model.out_channels == 8


def test_overrides_and_routes():
    routes = [{"start": 2, "end": 8, "ratio": 0.5}]
    with torch.device("meta"):
        model = create_model("DiT-B/4", input_size=16, in_channels=1, num_classes=10, learn_sigma=False,
                             class_dropout_prob=0.0, routes=routes, scan_consistent=False, depth=10)  # fmt: skip
    assert (model.input_size, model.in_channels, model.out_channels, model.num_classes) == (16, 1, 1, 10)
    assert len(model.blocks) == 10 and model.y_embedder.embedding_table.num_embeddings == 10
    assert model.router.routes == (Route(2, 8, 0.5),) and not model.router.scan_consistent
    with torch.device("meta"):
        model = create_model("DiT-S/2", routes=[Route(1, 3, 0.25)])
    assert model.router.routes == (Route(1, 3, 0.25),)


def test_family_name_builds_from_keywords():
    model = create_model("DiT", input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    assert isinstance(model, DiT) and len(model.blocks) == 2 and model.pos_embed.shape == (1, 16, 32)


def test_unknown_name_lists_valid_names_and_suggests():
    with pytest.raises(ValueError, match="Did you mean 'DiT-XL/2'") as error:
        create_model("dit-xl/2")
    message = str(error.value)
    assert all(name in message for name in [*MODEL_NAMES, *FAMILIES])
    with pytest.raises(ValueError, match="Did you mean 'ZigMa-B/2'"):
        create_model("Zigma-B/2")
    with pytest.raises(ValueError, match="Valid names"):
        create_model("ResNet-50")


def test_bad_override_lists_valid_keys():
    with pytest.raises(ValueError, match="unknown argument.*hiden_size.*valid:.*hidden_size.*routes"):
        create_model("DiT-S/2", hiden_size=10)


def test_bad_route_is_reported():
    with pytest.raises(ValueError, match="depth = 12"):
        create_model("DiT-S/2", routes=[{"start": 2, "end": 12, "ratio": 0.5}])


def import_family(family: str):
    """The module of a Mamba family, or skip while it is not written yet."""
    module_name = FAMILIES[family][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        pytest.skip(f"{module_name} is not written yet")


@pytest.mark.parametrize("family", ["DiM", "ZigMa"])
def test_mamba_presets_match_registry(family):
    presets = getattr(import_family(family), FAMILIES[family][2])
    assert sorted(presets) == sorted(n for n in MODEL_NAMES if n.startswith(family + "-"))


@pytest.mark.parametrize(
    "family, sizes", [("DiM", dict(hidden_size=32, depth=3)), ("ZigMa", dict(hidden_size=32, depth=2))]
)
def test_mamba_family_names_build_from_keywords(family, sizes):
    cls = getattr(import_family(family), FAMILIES[family][1])
    model = create_model(family, input_size=8, num_classes=10, routes=[{"start": 0, "end": 1, "ratio": 0.5}], **sizes)
    assert isinstance(model, cls) and model.router.routes == (Route(0, 1, 0.5),)
    with pytest.raises(ValueError, match="unknown argument.*num_heads"):
        create_model(family, num_heads=4, **sizes)
