"""Feed-forward blocks: the `FFNBlock` contract and the `none`, `dense` and `glu` blocks. The activations live in
model/activations.py (ACTIVATIONS and DENSE_ACTIVATIONS are re-exported here).

Every FFN maps (..., D) -> (..., D). A block class answers, without being built, everything the rest of the code
needs to know about its type (see `FFNBlock`); model/registry.py maps `model.ffn.type` names to classes. Blocks never
import the registry or model/config.py (configs appear in type hints only). No biases anywhere (MiniMind / LLaMA).

Parameter matching: the reference is a dense FFN of width 4·d, i.e. 8·d² parameters (`dense_ffn_params`). A block's
`width` rule sizes it to that budget unless `model.ffn.d_ff` is given; a trainable activation's learned scalars count
against it (`matched_width`'s `extra`).

Shape suffixes: D hidden size, F inner width (`width`), `...` any leading dims.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn

from model.activations import (ACTIVATIONS, DENSE_ACTIVATIONS, GLU_ACTIVATIONS, NO_HF_EQUIVALENT,
                               TRAINABLE_ACTIVATIONS, activation_params, make_activation)
from model.fused_ops import glu_product, has_fused_glu
from model.precision import compute_dtype
from model.split_matmul import split_applies, split_linear

# model.config.FFNConfig / MiniMindConfig, by duck typing: the blocks never import the config module (it asks the
# registry, which imports the blocks), so annotations name them through these aliases.
FFNConfig = MiniMindConfig = Any


# What the dense and GLU blocks accept: the plain functions (the dense block without the sigmoid gate), the trainable
# activations, and for GLU the gate-and-up functions
DENSE_BLOCK_ACTIVATIONS = (*DENSE_ACTIVATIONS, *TRAINABLE_ACTIVATIONS)
GLU_BLOCK_ACTIVATIONS = (*ACTIVATIONS, *TRAINABLE_ACTIVATIONS, *GLU_ACTIVATIONS)


def dense_ffn_params(hidden_size: int) -> int:
    """The parameter budget every FFN is matched against: a dense FFN of width 4·d (up + down = 8·d²)."""
    return 8 * hidden_size * hidden_size


def round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def matched_width(ffn: FFNConfig, hidden_size: int, matrices: int, extra: int = 0) -> int:
    """`d_ff` when given, else the width at which `matrices` D×F matrices plus `extra` other parameters (learned
    activation scalars) hold the dense FFN's 8·d² parameters."""
    if ffn.d_ff is not None:
        return ffn.d_ff
    return round_to((dense_ffn_params(hidden_size) - extra) / (matrices * hidden_size), ffn.multiple_of)


def check_activation(key: str, activation: str, valid: tuple[str, ...], what: str) -> None:
    if activation not in valid:
        raise ValueError(f"model.ffn.{key} '{activation}' is not valid for {what}; valid: {', '.join(valid)}")


def refuse_inexact_activation(ffn: FFNConfig) -> None:
    """ValueError when transformers has no activation identical to `ffn.activation` (see NO_HF_EQUIVALENT)."""
    why = NO_HF_EQUIVALENT.get(ffn.activation)
    if why is not None:
        raise ValueError(f"model.ffn.activation={ffn.activation} ({ffn.type}) has no exact transformers equivalent: "
                         f"{why}")


class FFNBlock(nn.Module):
    """Base of the registered feed-forward blocks. Class-level answers (no model needed):

    - `matched_on`: "total" or "active", the parameter count a sweep matches against its baseline's
    - `step_cost`: step time relative to a dense FFN's, for rough time estimates
    - `may_skip_params`: some parameters may get no gradient in a step (DDP needs find_unused_parameters)
    - `matmul_input`: the block's input only feeds matmuls (Linear / grouped GEMM), so under autocast the RMSNorm
      before it may hand it over already in the compute dtype (saves a cast each way; default False: safe for
      blocks that use x in elementwise work)
    - `width(ffn, hidden_size)`: the inner width built (0: no sub-layer); honours `d_ff` and `multiple_of`
    - `validate(ffn)`: ValueError("model.ffn.<key> ...") for a config the block cannot take
    - `label(ffn)` / `slug(ffn)`: a short human label / a filesystem-safe name (default run names)
    - `describe(ffn)`: type-specific fields for summaries (`activation` at least)
    - `hf_export(ffn)`: the transformers mapping {"architecture", "activation", optionally "config": extra config
      values}, or ValueError(why there is none); the built block then gives its weights with `hf_weights()`
    - `from_config(cfg)`: the module for one layer (None: the block has no FFN sub-layer)
    Instance-level, optional: `active_params()`, `hf_weights()`, `aux_loss`/`aux_losses` (summed into the model's
    objective), `after_optimizer_step(skipped)` (called by the trainer after every optimizer step), `expert_load()`.
    """

    matched_on: ClassVar[str] = "total"
    step_cost: ClassVar[float] = 1.0
    may_skip_params: ClassVar[bool] = False
    matmul_input: ClassVar[bool] = False

    @classmethod
    def width(cls, ffn: FFNConfig, hidden_size: int) -> int:
        raise NotImplementedError(f"{cls.__name__} must define width(ffn, hidden_size)")

    @classmethod
    def validate(cls, ffn: FFNConfig) -> None:
        return None

    @classmethod
    def label(cls, ffn: FFNConfig) -> str:
        return f"{ffn.type} {ffn.activation}"

    @classmethod
    def slug(cls, ffn: FFNConfig) -> str:
        return f"{ffn.type}-{ffn.activation}"

    @classmethod
    def describe(cls, ffn: FFNConfig) -> dict:
        return {"activation": ffn.activation}

    @classmethod
    def hf_export(cls, ffn: FFNConfig) -> dict:
        raise ValueError(f"model.ffn.type={ffn.type} has no exact transformers equivalent")

    @classmethod
    def from_config(cls, cfg: MiniMindConfig) -> nn.Module | None:
        raise NotImplementedError(f"{cls.__name__} must define from_config(cfg)")

    def active_params(self) -> int:
        """Parameters one token touches (all of them, unless the block routes)."""
        return sum(p.numel() for p in self.parameters())


class NoFFN(FFNBlock):
    """No FFN sub-layer at all: every block is attention only."""

    @classmethod
    def width(cls, ffn: FFNConfig, hidden_size: int) -> int:
        return 0

    @classmethod
    def label(cls, ffn: FFNConfig) -> str:
        return "none"

    @classmethod
    def slug(cls, ffn: FFNConfig) -> str:
        return "noffn"

    @classmethod
    def describe(cls, ffn: FFNConfig) -> dict:
        return {"activation": None}

    @classmethod
    def hf_export(cls, ffn: FFNConfig) -> dict:
        raise ValueError("model.ffn.type=none (attention-only blocks) has no transformers equivalent: every "
                         "LLaMA-family block has an MLP; only GLU and MoE variants can be exported")

    @classmethod
    def from_config(cls, cfg: MiniMindConfig) -> None:
        return None


class DenseFFN(FFNBlock):
    """W_down · act(W_up · x): the original Transformer FFN."""

    matmul_input: ClassVar[bool] = True

    matrices: ClassVar[int] = 2  # weight matrices of shape D×F: up, down

    def __init__(self, dim: int, d_ff: int, activation: str):
        super().__init__()
        self.activation = activation
        self.act = make_activation(activation)  # a module (registered, with its learned scalars) or a function
        self.up_proj = nn.Linear(dim, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, dim, bias=False)

    @classmethod
    def width(cls, ffn: FFNConfig, hidden_size: int) -> int:
        return matched_width(ffn, hidden_size, cls.matrices, activation_params(ffn.activation))  # 4·d

    @classmethod
    def validate(cls, ffn: FFNConfig) -> None:
        check_activation("activation", ffn.activation, DENSE_BLOCK_ACTIVATIONS, "a dense FFN")

    @classmethod
    def hf_export(cls, ffn: FFNConfig) -> dict:
        refuse_inexact_activation(ffn)  # the activation's own reason first (xIELU: why not Apertus)
        raise ValueError(f"model.ffn.type=dense (ungated W_down·{ffn.activation}(W_up·x)) has no exact transformers "
                         f"equivalent: LlamaMLP always multiplies by a gate (act(gate·x)·(up·x)), and the ungated "
                         f"families (GPT-2, GPT-NeoX, ...) use LayerNorm/biases; only GLU and MoE variants export")

    @classmethod
    def from_config(cls, cfg: MiniMindConfig) -> DenseFFN:
        return cls(cfg.hidden_size, cls.width(cfg.ffn, cfg.hidden_size), cfg.ffn.activation)

    def forward(self, x_D: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x_D)))


class GLUFFN(FFNBlock):
    """W_down · (act(W_gate · x) ⊙ W_up · x) (Shazeer 2020). Gate and up are one fused matmul (x-transformers style):
    one larger GEMM is faster than two, and the parameters are the same. A GLU activation (GLU_ACTIVATIONS, e.g.
    gpt-oss's clamped SwiGLU `swiglu_oss`) replaces the whole act(gate) ⊙ up."""

    matrices: ClassVar[int] = 3  # gate, up, down: the width is 2/3 of the dense one (8·d²/3d)
    matmul_input: ClassVar[bool] = True

    @classmethod
    def width(cls, ffn: FFNConfig, hidden_size: int) -> int:
        return matched_width(ffn, hidden_size, cls.matrices, activation_params(ffn.activation))

    def __init__(self, dim: int, d_ff: int, activation: str):
        super().__init__()
        self.activation = activation
        # f(gate, up) for a GLU that changes the up half too (gpt-oss); else act(gate) · up
        self.glu = GLU_ACTIVATIONS.get(activation)
        self.act = make_activation(activation) if self.glu is None else None
        self.gate_up_proj = nn.Linear(dim, 2 * d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, dim, bias=False)

    @classmethod
    def validate(cls, ffn: FFNConfig) -> None:
        check_activation("activation", ffn.activation, GLU_BLOCK_ACTIVATIONS, "a GLU FFN")

    @classmethod
    def hf_export(cls, ffn: FFNConfig) -> dict:
        refuse_inexact_activation(ffn)
        # LlamaMLP computes down(act(gate(x)) * up(x)): our block exactly (gate = the first half of gate_up_proj)
        return {"architecture": "llama", "activation": ffn.activation}

    def hf_weights(self) -> dict[str, torch.Tensor]:
        """This block's weights under transformers' LlamaMLP names (relative to the layer's `mlp.`)."""
        gate_FD, up_FD = self.gate_up_proj.weight.chunk(2, dim=0)
        return {"gate_proj.weight": gate_FD, "up_proj.weight": up_FD, "down_proj.weight": self.down_proj.weight}

    @classmethod
    def from_config(cls, cfg: MiniMindConfig) -> GLUFFN:
        return cls(cfg.hidden_size, cls.width(cfg.ffn, cfg.hidden_size), cfg.ffn.activation)

    def forward(self, x_D: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x_D)
        if split_applies(x_D, dtype):  # gate and up as two matmuls into one output: faster on oneDNN (see there)
            d_ff = self.gate_up_proj.weight.shape[0] // 2
            gate_up_F2 = split_linear(x_D, self.gate_up_proj.weight, (d_ff, d_ff), dtype)
        else:
            gate_up_F2 = self.gate_up_proj(x_D)
        if has_fused_glu(self.act):  # same values, no concatenation of the gradient halves (model/fused_ops.py)
            return self.down_proj(glu_product(gate_up_F2, self.act))
        gate_F, up_F = gate_up_F2.chunk(2, dim=-1)
        if self.glu is not None:
            return self.down_proj(self.glu(gate_F, up_F))
        return self.down_proj(self.act(gate_F) * up_F)
