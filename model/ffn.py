"""The feed-forward block registry: `model.ffn.type` picks one class from `FFN_REGISTRY`.

Adding a variant = one class with `from_config(cfg)` + one registry line. Every FFN maps (..., D) -> (..., D) and
returns its output; the MoE additionally leaves its balancing losses on `.aux_loss` / `.aux_losses` after each forward
so the model can sum them. No biases anywhere (as in MiniMind / LLaMA).

Shape suffixes: D hidden size, F inner width (`resolve_d_ff`), `...` any leading dims.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import MiniMindConfig, resolve_d_ff
from model.moe import MoEFFN


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU (So et al. 2021, "Primer")."""
    return F.relu(x).square()


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "relu2": relu2,
    "sigmoid": torch.sigmoid,
    "identity": identity,  # dense: a purely linear FFN; glu: the Bilinear variant
}


class DenseFFN(nn.Module):
    """W_down · act(W_up · x): the original Transformer FFN."""

    def __init__(self, dim: int, d_ff: int, activation: str):
        super().__init__()
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.up_proj = nn.Linear(dim, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, dim, bias=False)

    @classmethod
    def from_config(cls, cfg: MiniMindConfig) -> "DenseFFN":
        return cls(cfg.hidden_size, resolve_d_ff(cfg.ffn, cfg.hidden_size), cfg.ffn.activation)

    def forward(self, x_D: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x_D)))


class GLUFFN(nn.Module):
    """W_down · (act(W_gate · x) ⊙ W_up · x) (Shazeer 2020). Gate and up are one fused matmul (x-transformers style):
    one larger GEMM is faster than two, and the parameters are the same."""

    def __init__(self, dim: int, d_ff: int, activation: str):
        super().__init__()
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.gate_up_proj = nn.Linear(dim, 2 * d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, dim, bias=False)

    @classmethod
    def from_config(cls, cfg: MiniMindConfig) -> "GLUFFN":
        return cls(cfg.hidden_size, resolve_d_ff(cfg.ffn, cfg.hidden_size), cfg.ffn.activation)

    def forward(self, x_D: torch.Tensor) -> torch.Tensor:
        gate_F, up_F = self.gate_up_proj(x_D).chunk(2, dim=-1)
        return self.down_proj(self.act(gate_F) * up_F)


# None: no FFN sub-layer at all (the block is attention only). Every class has from_config(cfg).
FFN_REGISTRY = {
    "none": None,
    "dense": DenseFFN,
    "glu": GLUFFN,
    "moe": MoEFFN,
}


def build_ffn(cfg: MiniMindConfig) -> nn.Module | None:
    kind = cfg.ffn.type
    if kind not in FFN_REGISTRY:
        raise ValueError(f"model.ffn.type '{kind}' is unknown; valid: {', '.join(FFN_REGISTRY)}")
    cls = FFN_REGISTRY[kind]
    return None if cls is None else cls.from_config(cfg)
