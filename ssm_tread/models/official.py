"""Official DiT, DiM and ZigMa checkpoints: key mapping and loading.

:func:`load_official` builds our DiT, DiM or ZigMa and loads an official state dict into it, key for key;
:func:`to_ours` / :func:`to_official` translate state dicts between the two namings. The official
layouts are the state dicts of github.com/facebookresearch/DiT (``DiT-XL-2-256x256.pt``,
``DiT-XL-2-512x512.pt``), github.com/CompVis/zigma (ZigMa, commit 37d837b) and
github.com/tyshiwo1/DiM-DiffusionMamba (DiM, commit 292b228).

- DiT, ZigMa: our module names are the official ones (identity mapping).
- DiM: renamed modules, plus two reshapes: ``a4m_adapter.pad_token_dec_split`` [1, 3, D] is our
  ``learned_tokens`` [3, D], and ``a4m_adapter.pad_token`` [1, D, 3] is our ``pad_tokens`` [3, D].

Released files nest their weights (an ``ema`` / ``model`` / ``state_dict`` entry, ``module.`` prefixes
from DDP); :func:`unwrap_state_dict` finds the tensors.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch
import torch.nn as nn

ARCHS = ("DiT", "DiM", "ZigMa")

Transform = Callable[[torch.Tensor], torch.Tensor]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


# (official name, our name, official -> ours, ours -> official). In the names "{i}" stands for a block
# index and "{x}" for the rest of a key; both sides of a rule have the same placeholders.
DIM_RULES: list[tuple[str, str, Transform, Transform]] = [
    ("additional_embed", "pos_embed", _same, _same),
    ("pos_embed.proj.{x}", "x_embedder.proj.{x}", _same, _same),
    ("transformer_blocks.{i}.norm1.norm.weight", "blocks.{i}.norm.weight", _same, _same),
    ("transformer_blocks.{i}.scale_shift_table", "blocks.{i}.scale_shift_table", _same, _same),
    ("transformer_blocks.{i}.attn1.{x}", "blocks.{i}.mixer.{x}", _same, _same),
    ("transformer_blocks.{i}.skip_linear.{x}", "blocks.{i}.skip_linear.{x}", _same, _same),
    ("norm_out.norm.weight", "final_layer.norm_final.weight", _same, _same),
    ("adaln_single.emb.timestep_embedder.linear_1.{x}", "t_embedder.mlp.0.{x}", _same, _same),
    ("adaln_single.emb.timestep_embedder.linear_2.{x}", "t_embedder.mlp.2.{x}", _same, _same),
    ("adaln_single.emb.class_embedder.embedding_table.weight", "y_embedder.embedding_table.weight", _same, _same),
    ("adaln_single.linear.{x}", "adaLN_modulation.1.{x}", _same, _same),
    ("label_emb.weight", "class_tokens.weight", _same, _same),
    ("a4m_adapter.pad_token_dec_split", "learned_tokens", lambda t: t[0], lambda t: t[None]),  # [1, 3, D] / [3, D]
    ("a4m_adapter.pad_token", "pad_tokens", lambda t: t[0].t(), lambda t: t.t()[None]),  # [1, D, 3] / [3, D]
    ("a4m_adapter.first_smoother.{x}", "in_conv.{x}", _same, _same),
    ("a4m_adapter.last_smoother.{x}", "out_conv.{x}", _same, _same),
    ("proj_out_1.{x}", "final_layer.adaLN_modulation.1.{x}", _same, _same),
    ("proj_out_2.{x}", "final_layer.linear.{x}", _same, _same),
]
DIM_512_TOKENS = 32 * 32  # patch tokens of the official DiM-H/2 ImageNet-512 fine-tune (64x64 latent, patch 2)
IDENTITY_RULES: list[tuple[str, str, Transform, Transform]] = [("{x}", "{x}", _same, _same)]
RULES = {"DiT": IDENTITY_RULES, "DiM": DIM_RULES, "ZigMa": IDENTITY_RULES}

_WRAPPERS = ("ema", "model_ema", "ema_model", "state_dict", "model", "module", "net", "nnet")  # in order of preference
_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")


def check_arch(arch: str) -> str:
    """``arch`` spelled as in :data:`ARCHS` (any case accepted)."""
    by_lower = {a.lower(): a for a in ARCHS}
    if arch.lower() not in by_lower:
        raise ValueError(f"unknown official architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return by_lower[arch.lower()]


def unwrap_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The tensors of a released checkpoint: descend into its ``ema`` (preferred), ``model``,
    ``state_dict``... entry until the values are tensors, then strip a ``module.`` / ``model.`` /
    ``_orig_mod.`` prefix that every key shares."""
    state = checkpoint
    while not all(isinstance(v, torch.Tensor) for v in state.values()):
        entry = next((k for k in _WRAPPERS if isinstance(state.get(k), Mapping)), None)
        if entry is None:
            raise ValueError(
                f"cannot find the weights in this checkpoint: its entries are {sorted(state)[:10]}; pass the "
                f"state dict itself (a mapping of parameter names to tensors)")
        state = state[entry]
    state = dict(state)
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def _regex(name: str) -> re.Pattern:
    pattern = re.escape(name).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{x\}", r"(?P<x>.+)")
    return re.compile(pattern)


def _translate(state: Mapping[str, torch.Tensor], arch: str, to_ours: bool) -> tuple[dict, list[str]]:
    """Rename (and reshape) every key by the first rule it matches; returns (renamed, unmatched keys)."""
    out, unmatched = {}, []
    for key, value in state.items():
        for official, ours, official_to_ours, ours_to_official in RULES[arch]:
            source, target = (official, ours) if to_ours else (ours, official)
            match = _regex(source).fullmatch(key)
            if match:
                out[target.format(**match.groupdict())] = (official_to_ours if to_ours else ours_to_official)(value)
                break
        else:
            unmatched.append(key)
    return out, unmatched


def to_ours(arch: str, official_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official state dict (released nesting allowed) in our names. Raises ValueError listing the keys
    no rule knows."""
    arch = check_arch(arch)
    out, unmatched = _translate(unwrap_state_dict(official_state), arch, to_ours=True)
    if unmatched:
        raise ValueError(f"{len(unmatched)} keys of the {arch} checkpoint are not official {arch} keys: "
                         + ", ".join(unmatched))
    return out


def to_official(arch: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in the official names and layouts (e.g. to evaluate with the official code)."""
    arch = check_arch(arch)
    out, unmatched = _translate(state, arch, to_ours=False)
    if unmatched:
        raise ValueError(f"{len(unmatched)} keys are not {arch} keys: " + ", ".join(unmatched))
    return out


def infer_kwargs(arch: str, official_state: Mapping[str, torch.Tensor], **given) -> dict:
    """Our constructor keywords: ``given``, completed from an official state dict's shapes with
    ``in_channels, patch_size, hidden_size, depth, num_classes, learn_sigma, d_state, d_conv, expand``
    and, where the position embedding tells, ``input_size`` (square inputs); DiM also ``pad_layout``
    ("rho_pad" for a 32x32 patch grid, the official ImageNet-512 fine-tune, else "lateral"); ZigMa also
    ``pos_embed`` ("learned" when stored, else "none") and ``class_dropout_prob`` (0: the official table
    has no null row; given > 0, the table's last row is taken for our null class)."""
    arch = check_arch(arch)
    shape = {k: tuple(v.shape) for k, v in to_ours(arch, official_state).items()}
    if arch == "DiT":
        return _dit_kwargs(shape, given)
    kwargs = {}  # what the shapes tell; keys that are missing surface in load_official's one error
    if "x_embedder.proj.weight" in shape:
        hidden_size, in_channels, patch_size, _ = shape["x_embedder.proj.weight"]
        kwargs.update(hidden_size=hidden_size, in_channels=in_channels, patch_size=patch_size)
        if "blocks.0.mixer.A_log" in shape:
            inner, kwargs["d_state"] = shape["blocks.0.mixer.A_log"]
            kwargs["expand"] = inner // hidden_size
        if "final_layer.linear.weight" in shape:
            kwargs["learn_sigma"] = shape["final_layer.linear.weight"][0] == 2 * in_channels * patch_size**2
    if "blocks.0.mixer.conv1d.weight" in shape:
        kwargs["d_conv"] = shape["blocks.0.mixer.conv1d.weight"][-1]
    blocks = [int(k.split(".")[1]) for k in shape if k.startswith("blocks.")]
    if blocks:
        kwargs["depth"] = 1 + max(blocks)
    table = shape.get("y_embedder.embedding_table.weight")
    if arch == "DiM":
        if table is not None:
            kwargs["num_classes"] = table[0] - 1  # the last row is the null class
        tokens = shape["pos_embed"][1] - 2 if "pos_embed" in shape else 0  # [tau, kappa, patches]
        # the weights do not record the padding layout: the one official 32x32-grid model (the ImageNet-512
        # fine-tune) pads with "rho_pad", the ImageNet-256 ones with "lateral"
        kwargs["pad_layout"] = "rho_pad" if tokens == DIM_512_TOKENS else "lateral"
    else:
        null_row = given.get("class_dropout_prob", 0.0) > 0
        kwargs.update(num_classes=0 if table is None else table[0] - null_row, class_dropout_prob=0.0,
                      pos_embed="learned" if "pos_embed" in shape else "none")
        tokens = shape["pos_embed"][1] if "pos_embed" in shape else 0
    side = round(tokens**0.5)
    if tokens and side * side == tokens and "patch_size" in kwargs:
        kwargs["input_size"] = side * kwargs["patch_size"]
    return {**kwargs, **given}


def _dit_kwargs(shape: dict, given: dict) -> dict:
    """DiT's constructor keywords from its state dict's shapes; the number of heads (not in the weights) from
    the DiT preset of that width and depth, unless given."""
    from ssm_tread.models.dit import DIT_CONFIGS

    hidden_size, in_channels, patch_size, _ = shape["x_embedder.proj.weight"]
    depth = 1 + max(int(k.split(".")[1]) for k in shape if k.startswith("blocks."))
    tokens = shape["pos_embed"][1]
    kwargs = dict(hidden_size=hidden_size, in_channels=in_channels, patch_size=patch_size, depth=depth,
                  num_classes=shape["y_embedder.embedding_table.weight"][0] - 1,  # the last row is the null class
                  learn_sigma=shape["final_layer.linear.weight"][0] == 2 * in_channels * patch_size**2,
                  input_size=round(tokens**0.5) * patch_size)
    heads = {c["num_heads"] for c in DIT_CONFIGS.values() if (c["hidden_size"], c["depth"]) == (hidden_size, depth)}
    if "num_heads" not in given:
        if len(heads) != 1:
            raise ValueError(f"a DiT of width {hidden_size} and depth {depth} is no DiT preset, and the weights do "
                             f"not tell the number of attention heads: give it (--set num_heads=N)")
        kwargs["num_heads"] = heads.pop()
    return {**kwargs, **given}


def load_official(arch: str, state_dict: Mapping, **kwargs) -> nn.Module:
    """Our ``arch`` ("DiT", "DiM" or "ZigMa") model holding the weights of an official checkpoint.

    ``state_dict``: the official weights, as a state dict or a released checkpoint file's contents
    (``ema`` / ``model`` / ``state_dict`` entries and ``module.`` prefixes are unwrapped; the EMA is
    preferred). ``kwargs``: our constructor keywords (``input_size, patch_size, in_channels,
    hidden_size, depth, num_classes, learn_sigma, d_state, d_conv, expand, class_dropout_prob``,
    ZigMa's ``num_paths, pos_embed``, routes...); those not given are read off the weights' shapes
    (:func:`infer_kwargs`). Loads strictly: keys without a counterpart, missing keys and shape
    mismatches are reported together in one ValueError.

    ``model(x, t, y)`` then equals the official forward: DiM takes t as the official model does;
    ZigMa takes 1000 * t for the official t in [0, 1] (see the models' docstrings).
    """
    from ssm_tread.models import create_model

    arch = check_arch(arch)
    state = to_ours(arch, state_dict)
    model = create_model(arch, **infer_kwargs(arch, state_dict, **kwargs))
    expected = model.state_dict()
    problems = [f"official {k} has no counterpart" for k in state if k not in expected]
    problems += [f"{k} missing from the checkpoint" for k in expected if k not in state]
    problems += [f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        raise ValueError(f"the {arch} checkpoint does not fit the model built from {kwargs or 'its shapes'} "
                         f"({len(problems)} problems): " + "; ".join(problems))
    model.load_state_dict(state)
    return model
