"""MiniMind decoder (LLaMA-style: RMSNorm, RoPE, GQA attention, pre-norm blocks) with a pluggable FFN.

Shape suffixes: B batch, T time (tokens in this call), P past tokens in the KV cache, D hidden, H query heads,
G key/value heads, C head dim, V vocab.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import MiniMindConfig
from model.fused_ops import rms_norm
from model.loss import linear_cross_entropy
from model.precision import compute_dtype
from model.registry import build_ffn
from model.rope import qkv_rope, rope_cos_sin

KVCache = list  # per layer: (k_BGPC, v_BGPC)


class RMSNorm(nn.Module):
    """`feeds_matmuls`: the output only goes into matmuls (a block's attention and FFN inputs), so under autocast it
    is emitted in the compute dtype, the cast the next Linear would make anyway (bit-identical forward)."""

    def __init__(self, dim: int, eps: float, feeds_matmuls: bool = False):
        super().__init__()
        self.eps, self.feeds_matmuls = eps, feeds_matmuls
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = compute_dtype(x) if self.feeds_matmuls else x.dtype
        if (x.device.type == "cpu" and out_dtype != x.dtype and x.dtype == self.weight.dtype == torch.float32
                and not torch.compiler.is_compiling()):
            # ATen's CPU rms_norm is a composite with a slow autograd backward (model/fused_ops.py). Only where it
            # also saves the casts (autocast): in fp32 it gained ~2% (noise) and would change every fp32 result's
            # digits (same math, other rounding), so fp32 runs keep the composite. Compiled code keeps it too:
            # inductor fuses the composite's forward and backward itself.
            return rms_norm(x, self.weight, self.eps, out_dtype)
        # the fused kernel needs one dtype
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


def fold_gqa(q_BHTC: torch.Tensor, G: int, past_len: int, dropout: float) -> bool:
    """Whether to run grouped-query attention as G "long" heads (`folded_gqa_attention`): on CPU under bf16/fp16
    autocast, for causal attention without a cache. fp32 keeps the plain call (its gradients would
    round differently)."""
    return (q_BHTC.device.type == "cpu" and q_BHTC.dtype in (torch.bfloat16, torch.float16) and G < q_BHTC.shape[1]
            and past_len == 0 and dropout == 0.0 and q_BHTC.shape[2] > 1)


def _folded_causal_mask(T: int, R: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(R·T, T) additive mask: row r·T + t may see keys 0..t (0 there, -inf elsewhere; the causal mask of each of
    the R stacked query heads). Additive in the query's dtype because SDPA turns a boolean mask into exactly this
    with a `where` on every call (forward and backward): the same result, without rebuilding it per layer."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril().repeat(R, 1)
    return torch.zeros(R * T, T, dtype=dtype, device=device).masked_fill_(~causal, float("-inf"))


_cached_folded_causal_mask = functools.lru_cache(maxsize=8)(_folded_causal_mask)  # eager calls: built once


def folded_gqa_attention(q_BHTC, k_BGTC, v_BGTC):
    """Causal GQA with the R = H/G query heads that share a key/value head stacked along time: G heads of R·T
    queries with an explicit causal mask. The same softmax(q·kᵀ)·v per query row. Why: PyTorch's CPU flash-attention
    backward issues five small GEMMs per (batch, head, query block) and picks 64-row query blocks below 768 queries;
    at MiniMind2-small's shapes those calls' overhead, not the arithmetic, sets its time (~100 ms per layer, 6-7x the
    forward). Stacked, there are H/G times fewer (batch, head) pairs and 256-row blocks."""
    B, H, T, C = q_BHTC.shape
    G = k_BGTC.shape[1]
    R = H // G
    # under torch.compile the mask is built in the graph (traced once); eager calls reuse a cached one
    mask = (_folded_causal_mask(T, R, q_BHTC.dtype, q_BHTC.device) if torch.compiler.is_compiling()
            else _cached_folded_causal_mask(T, R, q_BHTC.dtype, q_BHTC.device))
    y_BGRC = F.scaled_dot_product_attention(q_BHTC.reshape(B, G, R * T, C), k_BGTC, v_BGTC, attn_mask=mask)
    return y_BGRC.view(B, H, T, C)


class Attention(nn.Module):
    def __init__(self, cfg: MiniMindConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # q, k and v in one matmul: same parameters as three projections, one bigger GEMM
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD, cos_TC, sin_TC, past_kv=None, use_cache=False):
        B, T, _ = x_BTD.shape
        H, G, C = self.n_heads, self.n_kv_heads, self.head_dim
        q_BHTC, k_BGTC, v_BGTC = qkv_rope(self.qkv_proj(x_BTD), cos_TC, sin_TC, H, G)
        past_len = 0
        if past_kv is not None:
            past_len = past_kv[0].shape[2]
            k_BGTC = torch.cat([past_kv[0], k_BGTC], dim=2)
            v_BGTC = torch.cat([past_kv[1], v_BGTC], dim=2)
        present = (k_BGTC, v_BGTC) if use_cache else None
        mask, is_causal = None, True
        if past_len:  # query t sits at position past_len + t and sees keys 0..past_len + t
            is_causal = False
            if T > 1:
                mask = torch.ones(T, past_len + T, dtype=torch.bool, device=x_BTD.device).tril(diagonal=past_len)
        dropout = self.dropout if self.training else 0.0
        if fold_gqa(q_BHTC, G, past_len, dropout):
            y_BHTC = folded_gqa_attention(q_BHTC, k_BGTC, v_BGTC)
        else:
            y_BHTC = F.scaled_dot_product_attention(q_BHTC, k_BGTC, v_BGTC, attn_mask=mask, is_causal=is_causal,
                                                    dropout_p=dropout, enable_gqa=G != H)
        y_BTD = y_BHTC.transpose(1, 2).reshape(B, T, H * C)
        return self.resid_dropout(self.o_proj(y_BTD)), present


class MiniMindBlock(nn.Module):
    def __init__(self, cfg: MiniMindConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, feeds_matmuls=True)
        self.attn = Attention(cfg)
        self.ffn = build_ffn(cfg)  # None when the block has no FFN sub-layer (ffn.type 'none'): skipped entirely
        if self.ffn is not None:
            self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                    feeds_matmuls=getattr(type(self.ffn), "matmul_input", False))
            self.ffn_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD, cos_TC, sin_TC, past_kv=None, use_cache=False):
        attn_out, present = self.attn(self.attn_norm(x_BTD), cos_TC, sin_TC, past_kv, use_cache)
        x_BTD = x_BTD + attn_out
        if self.ffn is not None:
            x_BTD = x_BTD + self.ffn_dropout(self.ffn(self.ffn_norm(x_BTD)))
        return x_BTD, present


class MiniMindModel(nn.Module):
    def __init__(self, cfg: MiniMindConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(MiniMindBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # recomputed from the config, never saved
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids_BT, past_key_values: Optional[KVCache] = None, use_cache: bool = False):
        T = input_ids_BT.shape[1]
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if past_len + T > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {past_len + T} tokens exceeds model.max_seq_len={self.rope_cos.shape[0]}")
        x_BTD = self.dropout(self.embed_tokens(input_ids_BT))
        # cast once per call so RoPE stays in the activations' dtype (no fp32 round trip under autocast)
        dtype = compute_dtype(x_BTD)
        cos_TC = self.rope_cos[past_len:past_len + T].to(dtype)
        sin_TC = self.rope_sin[past_len:past_len + T].to(dtype)
        presents = [] if use_cache else None
        for i, layer in enumerate(self.layers):
            x_BTD, present = layer(x_BTD, cos_TC, sin_TC, past_key_values[i] if past_key_values else None, use_cache)
            if use_cache:
                presents.append(present)
        return self.norm(x_BTD), presents


@dataclass
class CausalLMOutput:
    logits: Optional[torch.Tensor]  # None when a loss was asked for without return_logits=True
    loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    past_key_values: Optional[KVCache] = None
    aux_loss_tensors: dict = field(default_factory=dict)  # kind -> detached 0-dim tensor, summed over the layers

    @property
    def aux_losses(self) -> dict[str, float]:
        """Auxiliary (e.g. MoE balancing) losses per kind, with coefficients, as floats. Converted on access: no sync
        in forward."""
        return {k: float(v) for k, v in self.aux_loss_tensors.items()}


class MiniMindForCausalLM(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("model.vocab_size must be set before building the model (it is null in the config; "
                             "take it from the tokenizer: dataclasses.replace(cfg, vocab_size=...))")
        self.config = config
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._init_weights()

    RESIDUAL_PROJECTIONS = ("o_proj.weight", "down_proj.weight", "experts.w_down")

    @torch.no_grad()
    def _init_weights(self) -> None:
        """normal(0, init_std); projections that write into the residual stream get std/sqrt(2·layers) (GPT-2)."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=residual_std if name.endswith(self.RESIDUAL_PROJECTIONS) else std)

    def forward(self, input_ids_BT, targets_BT=None, past_key_values=None, use_cache=False,
                return_logits=False) -> CausalLMOutput:
        """With targets the loss comes from the chunked LM-head + cross-entropy (model/loss.py) and the logits are
        not built unless return_logits=True; without targets the logits are returned (return_logits is ignored)."""
        h_BTD, presents = self.model(input_ids_BT, past_key_values, use_cache)
        logits_BTV = loss = None
        if targets_BT is None or return_logits:
            logits_BTV = self.lm_head(h_BTD)
        if targets_BT is not None:
            loss = linear_cross_entropy(h_BTD.flatten(0, 1), self.lm_head.weight, targets_BT.flatten())
        aux_loss, aux_tensors = h_BTD.new_zeros((), dtype=torch.float32), {}
        for ffn in self.ffn_layers():  # blocks with auxiliary losses leave them on .aux_loss / .aux_losses
            if getattr(ffn, "aux_loss", None) is not None:
                aux_loss = aux_loss + ffn.aux_loss
                for kind, value in ffn.aux_losses.items():
                    aux_tensors[kind] = aux_tensors.get(kind, 0) + value.detach()
        return CausalLMOutput(logits_BTV, loss, aux_loss, presents, aux_tensors)

    # --- generation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
                 greedy=False, generator=None) -> torch.Tensor:
        """-> (B, T0 + n) token ids: the prompt followed by n <= max_new_tokens new tokens (fewer when every row hit
        EOS; rows that finished early are padded with eos_token_id)."""
        new_tokens = list(self._sample_tokens(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                              greedy, generator))
        return torch.cat([input_ids, *(t[:, None] for t in new_tokens)], dim=1)

    def generate_stream(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
                        greedy=False, generator=None) -> Iterator[int]:
        """Yield new token ids one at a time (batch of one: input_ids (T,) or (1, T)); stops after EOS (yielded)."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.shape[0] != 1:
            raise ValueError(f"generate_stream takes one sequence, got a batch of {input_ids.shape[0]}")
        for token_B in self._sample_tokens(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                           greedy, generator):
            yield int(token_B[0])

    def _sample_tokens(self, input_ids_BT, max_new_tokens, temperature, top_k, top_p, eos_token_id, greedy,
                       generator) -> Iterator[torch.Tensor]:
        if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise ValueError(f"need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
        if input_ids_BT.shape[1] == 0:
            raise ValueError("generate needs a prompt of at least one token")
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield from self._sample_loop(input_ids_BT, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                             greedy, generator)
        finally:
            self.train(was_training)

    def _sample_loop(self, ids_BT, max_new_tokens, temperature, top_k, top_p, eos_token_id, greedy, generator):
        window = self.config.max_seq_len
        cache, finished_B = None, torch.zeros(ids_BT.shape[0], dtype=torch.bool, device=ids_BT.device)
        for _ in range(max_new_tokens):
            if cache is None:  # (re)fill the cache from the last `window` tokens, like nanoGPT's context crop
                h_BTD, cache = self.model(ids_BT[:, -window:], use_cache=True)
            else:
                h_BTD, cache = self.model(ids_BT[:, -1:], past_key_values=cache, use_cache=True)
            if cache[0][0].shape[2] >= window:  # full: the next token would fall outside the RoPE table
                cache = None
            next_B = sample_next_token(self.lm_head(h_BTD[:, -1]), temperature, top_k, top_p, greedy, generator)
            if eos_token_id is not None:
                next_B = torch.where(finished_B, torch.full_like(next_B, eos_token_id), next_B)
                finished_B |= next_B == eos_token_id
            ids_BT = torch.cat([ids_BT, next_B[:, None]], dim=1)
            yield next_B
            if eos_token_id is not None and bool(finished_B.all()):
                return

    # --- accounting ---------------------------------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """total counts a tied embedding once; active = what one token touches (the FFN's active_params(); MoE: top_k
        routed + shared experts + router); embedding = the token embedding (the LM head too when tied);
        non_embedding = total − embedding."""
        total = sum(p.numel() for p in self.parameters())
        embedding = self.model.embed_tokens.weight.numel()
        attention = sum(p.numel() for layer in self.model.layers for p in layer.attn.parameters())
        ffn = ffn_active = 0
        for layer_ffn in self.ffn_layers():
            n = sum(p.numel() for p in layer_ffn.parameters())
            ffn += n
            ffn_active += layer_ffn.active_params() if hasattr(layer_ffn, "active_params") else n
        return dict(total=total, active=total - ffn + ffn_active, non_embedding=total - embedding,
                    embedding=embedding, ffn=ffn, ffn_active=ffn_active, attention=attention)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token ≈ 6·N + 12·L·D·T (PaLM app. B). N: active parameters that do matmuls (the LM
        head counted once; an untied input embedding is a lookup and is left out); T: seq_len or max_seq_len."""
        counts = self.param_counts()
        n_matmul = counts["active"] - (0 if self.config.tie_word_embeddings else counts["embedding"])
        T = seq_len or self.config.max_seq_len
        return 6 * n_matmul + 12 * self.config.num_hidden_layers * self.config.hidden_size * T

    def ffn_share(self, seq_len: int | None = None) -> dict[str, float]:
        """FFN share of all parameters and of the training FLOPs per token (active FFN parameters)."""
        counts = self.param_counts()
        return dict(params=counts["ffn"] / counts["total"],
                    flops=6 * counts["ffn_active"] / self.flops_per_token(seq_len))

    # --- the FFN sub-layers and what they report ------------------------------------------------------------------
    def ffn_layers(self) -> list[nn.Module]:
        """Every layer's FFN sub-layer (none for blocks without one)."""
        return [layer.ffn for layer in self.model.layers if layer.ffn is not None]

    def moe_layers(self) -> list[nn.Module]:
        """The FFN sub-layers that count their expert load (those with expert_load(); checkpoints save their counts
        in this order)."""
        return [ffn for ffn in self.ffn_layers() if hasattr(ffn, "expert_load")]

    def expert_load(self) -> list[list[float]]:
        """Per MoE layer: fraction of routed token slots per expert since the last reset_expert_load() ([] if none)."""
        return [moe.expert_load() for moe in self.moe_layers()]

    def reset_expert_load(self) -> None:
        for moe in self.moe_layers():
            moe.reset_expert_load()

    def after_optimizer_step(self, skipped: bool = False) -> None:
        """Every sub-module's per-step hook, once per optimizer step (MoE: the aux-loss-free bias from the global
        batch's load, all-reduced inside the block so every rank's bias stays the same; a skipped step drops its
        routing counts). Same modules, same order, same `skipped` on every rank."""
        for module in self.modules():
            if module is not self and hasattr(module, "after_optimizer_step"):
                module.after_optimizer_step(skipped=skipped)


def sample_next_token(logits_BV, temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None):
    if greedy or temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, index_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        outside_BV = probs_BV.cumsum(dim=-1) - probs_BV > top_p  # keeps the smallest prefix reaching top_p
        logits_BV = logits_BV.scatter(-1, index_BV, sorted_BV.masked_fill(outside_BV, float("-inf")))
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
