"""Model configuration: plain dataclasses, names kept as strings so a config serialises to YAML/JSON.

`train/config.py` validates these with pydantic (types, choices, unknown keys); the cross-field checks live in
`__post_init__` here so that a config built in Python is checked the same way as one read from YAML. What depends on
the FFN type (its valid settings, its width) is asked of the block class in model/registry.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from model.registry import ffn_class

# model/activations.py: the plain functions, the trainable activations, the GLU-only gpt-oss SwiGLU
Activation = Literal["relu", "gelu", "gelu_tanh", "silu", "relu2", "leaky_relu2", "sigmoid", "identity",
                     "xielu", "polyrelu", "polynorm", "swiglu_oss"]


@dataclass
class FFNConfig:
    type: str = "glu"  # a key of model.registry.FFN_REGISTRY: none | dense | glu | moe (| registered blocks)
    activation: Activation = "silu"
    # Inner width. null: derived by the block's width rule so every variant matches a dense 4·d FFN in parameters
    # (GLU: 2/3 of that width; MoE: the width of each expert such that the *active* FFN parameters per token match).
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
    # Balancing loss (model/moe_balance.py): aux_loss = Switch/GShard per micro-batch, seq_aux_loss = per sequence
    # (DeepSeek-V3), global_aux_loss = f over all ranks and the step's micro-batches so far (Qwen); aux_free = the
    # selection bias only, none = nothing. The z-loss applies whenever z_loss_coef > 0.
    balancing: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "aux_free", "none"] = "aux_loss"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.001
    # Also move the aux-loss-free selection bias beside a balancing loss (DeepSeek-V3: sigmoid + bias + seq_aux_loss).
    aux_free_bias: bool = False
    # Tokens per expert are capped at capacity_factor · top_k · T / (n_experts + n_null_experts) when set; null = no
    # token dropping.
    capacity_factor: Optional[float] = None
    # Null experts (AdaMoE): extra router outputs that compute nothing, so a token may use fewer than top_k experts.
    n_null_experts: int = 0
    # Total width of the shared experts; null = n_shared_experts × the routed expert width. When set, the routed
    # experts' derived width fills the rest of the matched budget (fine-tunes parameter matching).
    shared_d_ff: Optional[int] = None
    # Run directory of a finished dense (glu/dense) run to upcycle from at step 0 (train/upcycle.py).
    upcycle_from: Optional[str] = None

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        cls = ffn_class(self.type)  # refuses an unknown type, naming the valid ones
        if self.d_ff is not None and self.d_ff <= 0:
            raise ValueError(f"model.ffn.d_ff must be a positive integer or null, got {self.d_ff}")
        if self.multiple_of < 1:
            raise ValueError(f"model.ffn.multiple_of must be >= 1, got {self.multiple_of}")
        cls.validate(self)


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


def resolve_d_ff(ffn: FFNConfig, hidden_size: int) -> int:
    """The FFN inner width actually built (MoE: each expert's width; 0: no FFN), by the block's own width rule."""
    return ffn_class(ffn.type).width(ffn, hidden_size)
