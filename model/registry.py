"""The FFN registry: `model.ffn.type` -> the block class that owns everything about that type.

A new feed-forward block is one class (see `model.ffn.FFNBlock` for what it answers) plus one line here, or a
`register_ffn("name", cls)` call from anywhere before the config is validated (the tests register a toy block that
way). Everything else — config validation, widths, parameter matching, summaries, run names, export, the trainer's
per-step hooks — asks the class, never compares type names. Unknown types are refused.

Imports go one way: model/config.py -> this module -> the blocks (which never import this module or the config).
"""
from __future__ import annotations

import re
from typing import Any

import torch.nn as nn

from model.ffn import GLUFFN, DenseFFN, NoFFN
from model.moe import MoEFFN

MiniMindConfig = Any  # model.config.MiniMindConfig; not imported: model/config.py imports this module

FFN_REGISTRY: dict[str, type] = {
    "none": NoFFN,
    "dense": DenseFFN,
    "glu": GLUFFN,
    "moe": MoEFFN,
}

# What every registered class must answer (see model.ffn.FFNBlock; subclassing it provides defaults for most).
CLASS_API = ("from_config", "width", "validate", "label", "slug", "describe", "hf_export", "matched_on", "step_cost")
MATCHED_ON = ("total", "active")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def ffn_class(type_name: str) -> type:
    """The block class registered as `type_name`; ValueError naming the valid choices otherwise."""
    try:
        return FFN_REGISTRY[type_name]
    except (KeyError, TypeError):
        valid = ", ".join(f"'{k}'" for k in FFN_REGISTRY)
        raise ValueError(f"model.ffn.type: invalid choice '{type_name}'; valid: {valid}") from None


def register_ffn(name: str, cls: type) -> type:
    """Make `model.ffn.type=<name>` build `cls` (returned, so this also works as a plain call at class definition).
    Refuses a malformed name, a name taken by another class, or a class missing part of the API."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"FFN type name {name!r} must be lowercase letters, digits and '_' (a valid YAML scalar)")
    if FFN_REGISTRY.get(name, cls) is not cls:
        raise ValueError(f"FFN type '{name}' is already registered to {FFN_REGISTRY[name].__name__}")
    missing = [attr for attr in CLASS_API if not hasattr(cls, attr)]
    if missing:
        raise TypeError(f"{getattr(cls, '__name__', cls)} cannot be registered as an FFN: it lacks "
                        f"{', '.join(missing)} (subclass model.ffn.FFNBlock for the defaults)")
    if cls.matched_on not in MATCHED_ON:
        raise TypeError(f"{cls.__name__}.matched_on must be one of {', '.join(MATCHED_ON)}, got {cls.matched_on!r}")
    FFN_REGISTRY[name] = cls
    return cls


def unregister_ffn(name: str) -> None:
    """Remove a type added with register_ffn (tests clean up with this)."""
    FFN_REGISTRY.pop(name, None)


def build_ffn(cfg: MiniMindConfig) -> nn.Module | None:
    """One layer's FFN sub-layer for cfg.ffn.type, or None when the block has none (`none`)."""
    return ffn_class(cfg.ffn.type).from_config(cfg)
