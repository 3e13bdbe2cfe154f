"""Parameter and FLOP counts of a config without building real weights: the model is built on the meta device (no
memory, no initialisation work), so this is instant even for large configs."""
from __future__ import annotations

import torch

from model.config import MiniMindConfig
from model.model_minimind import MiniMindForCausalLM


def meta_model(model_cfg: MiniMindConfig) -> MiniMindForCausalLM:
    """The model of `model_cfg` on the meta device (shapes only); model_cfg.vocab_size must be set."""
    with torch.device("meta"):
        return MiniMindForCausalLM(model_cfg)


def meta_counts(model_cfg: MiniMindConfig) -> tuple[dict, int]:
    """(param_counts(), training FLOPs per token at max_seq_len) of `model_cfg`'s model; vocab_size must be set."""
    model = meta_model(model_cfg)
    return model.param_counts(), model.flops_per_token(model_cfg.max_seq_len)
