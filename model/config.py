"""Model configuration: plain dataclasses, names kept as strings so a config serialises to YAML/JSON.

`train/config.py` validates these with pydantic (types, choices, unknown keys); the cross-field checks live in
`__post_init__` here so that a config built in Python is checked the same way as one read from YAML.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

Activation = Literal["relu", "gelu", "gelu_tanh", "silu", "relu2", "sigmoid", "identity"]
DENSE_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "relu2", "identity")
GLU_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "sigmoid", "identity")


@dataclass
class FFNConfig:
    type: str = "glu"  # a key of model.ffn.FFN_REGISTRY: none | dense | glu | moe
    activation: Activation = "silu"
    # Inner width. null: derived so every variant matches a dense 4·d FFN in parameters (GLU: 2/3 of that width;
    # MoE: the width of each expert such that the *active* FFN parameters per token match).
    d_ff: Optional[int] = None
    # Derived widths are rounded to the nearest multiple of this (1 = exact match; larger is kinder to matmul kernels).
    multiple_of: int = 1
    # --- moe only ---
    n_experts: int = 8
    top_k: int = 2
    n_shared_experts: int = 0
    expert_type: Literal["dense", "glu"] = "glu"
    expert_activation: Activation = "silu"
    router_scoring: Literal["softmax", "sigmoid"] = "softmax"
    # Renormalise the top-k gate weights to sum to 1. Ignored when top_k == 1: the gate stays the router probability
    # (Switch Transformer), otherwise it would be the constant 1 and the router would get no gradient from the LM loss.
    norm_topk_prob: bool = True
    balancing: Literal["aux_loss", "aux_free", "none"] = "aux_loss"  # z-loss applies whenever z_loss_coef > 0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.001
    # Tokens per expert are capped at capacity_factor · top_k · T / n_experts when set; null = no token dropping.
    capacity_factor: Optional[float] = None

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        from model.ffn import FFN_REGISTRY  # the registry is the one list of variants (imported late: no cycle)

        if self.type not in FFN_REGISTRY:
            valid = ", ".join(f"'{k}'" for k in FFN_REGISTRY)
            raise ValueError(f"model.ffn.type: invalid choice '{self.type}'; valid: {valid}")
        if self.d_ff is not None and self.d_ff <= 0:
            raise ValueError(f"model.ffn.d_ff must be a positive integer or null, got {self.d_ff}")
        if self.multiple_of < 1:
            raise ValueError(f"model.ffn.multiple_of must be >= 1, got {self.multiple_of}")
        if self.type == "dense" and self.activation not in DENSE_ACTIVATIONS:
            raise ValueError(f"model.ffn.activation '{self.activation}' is not valid for a dense FFN; "
                             f"valid: {', '.join(DENSE_ACTIVATIONS)}")
        if self.type == "moe":
            if self.n_experts < 1:
                raise ValueError(f"model.ffn.n_experts must be >= 1, got {self.n_experts}")
            if not 1 <= self.top_k <= self.n_experts:
                raise ValueError(f"model.ffn.top_k must be between 1 and n_experts={self.n_experts}, got {self.top_k}")
            if self.n_shared_experts < 0:
                raise ValueError(f"model.ffn.n_shared_experts must be >= 0, got {self.n_shared_experts}")
            if self.expert_type == "dense" and self.expert_activation not in DENSE_ACTIVATIONS:
                raise ValueError(f"model.ffn.expert_activation '{self.expert_activation}' is not valid for dense "
                                 f"experts; valid: {', '.join(DENSE_ACTIVATIONS)}")
            for key in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
                if getattr(self, key) < 0:
                    raise ValueError(f"model.ffn.{key} must be >= 0, got {getattr(self, key)}")
            if self.capacity_factor is not None and self.capacity_factor <= 0:
                raise ValueError(f"model.ffn.capacity_factor must be > 0 or null, got {self.capacity_factor}")


@dataclass
class MiniMindConfig:
    vocab_size: Optional[int] = None  # null in YAML: taken from the tokenizer before the model is built
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    max_seq_len: int = 512
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    init_std: float = 0.02
    ffn: FFNConfig = field(default_factory=FFNConfig)

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        if isinstance(self.ffn, dict):
            self.ffn = FFNConfig(**self.ffn)
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ValueError(f"model.vocab_size must be a positive integer or null, got {self.vocab_size}")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be a positive integer, got {getattr(self, key)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be divisible by "
                             f"model.num_attention_heads={self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"head size hidden_size/num_attention_heads={self.hidden_size // self.num_attention_heads}"
                             " must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"model.num_attention_heads={self.num_attention_heads} must be divisible by "
                             f"model.num_key_value_heads={self.num_key_value_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.init_std <= 0 or self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("model.init_std, model.rms_norm_eps and model.rope_theta must be > 0")
        resolve_d_ff(self.ffn, self.hidden_size)  # raises when the FFN cannot be sized

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MiniMindConfig":
        d = dict(d)
        d["ffn"] = FFNConfig(**d.get("ffn", {}))
        return cls(**d)


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def matrices_per_ffn(kind: str) -> int:
    """Weight matrices of shape d×d_ff in one FFN of this kind (dense: up+down; glu: gate+up+down)."""
    return 3 if kind == "glu" else 2


def resolve_d_ff(ffn: FFNConfig, hidden_size: int) -> int:
    """The FFN inner width actually built (for moe: each expert's width).

    The reference is a dense FFN of width 4·d: 8·d² parameters. Dense variants use 4·d; GLU variants use 2/3 of that
    (Shazeer 2020) so 3 matrices hold the same 8·d²; an MoE's experts are sized so that the parameters a token
    touches — top_k routed experts + shared experts + the router — also sum to 8·d².
    """
    if ffn.type == "none":
        return 0
    if ffn.d_ff is not None:
        return ffn.d_ff
    d = hidden_size
    budget = 8 * d * d
    if ffn.type == "dense":
        return _round_to(4 * d, ffn.multiple_of)
    if ffn.type == "glu":
        return _round_to(budget / (3 * d), ffn.multiple_of)
    # moe
    active_experts = ffn.top_k + ffn.n_shared_experts
    router = d * ffn.n_experts
    per_expert = (budget - router) / active_experts
    width = per_expert / (matrices_per_ffn(ffn.expert_type) * d)
    if width < 1:
        raise ValueError(f"model.ffn: top_k+n_shared_experts={active_experts} experts cannot fit the dense FFN's "
                         f"parameter budget at hidden_size={d}; set model.ffn.d_ff explicitly")
    return _round_to(width, ffn.multiple_of)
