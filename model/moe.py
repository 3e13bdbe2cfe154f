"""Mixture-of-Experts FFN in small pieces (after torchtitan): Router -> sort tokens by expert -> GroupedExperts.
The parts live in model/moe_experts.py, the balancing losses, bias step and health counters in model/moe_balance.py.

Shape suffixes: N tokens (B·T flattened), D hidden, E router outputs (n_experts routed experts, then n_null_experts
null experts), K top_k, S = N·K routed slots, F expert width.

Design choices (see also tests/test_moe.py, tests/test_moe_invariants.py):
- Dispatch sorts the S slots by expert, runs every expert on its contiguous slice with one grouped matmul on stacked
  weights (`F.grouped_mm`; a split-per-expert loop where grouped_mm is unavailable or the shapes are unaligned), then
  adds each slot's gate-weighted output back into its token's row (index_add). No dense all-experts compute, no token
  dropping unless `capacity_factor` is set, no host sync in the grouped path (null experts and capacity dropping
  select slots with a mask: one sync).
- Gate weights come from the unbiased router scores; the aux-loss-free bias (DeepSeek-V3) only affects which experts
  are picked. It moves with `balancing: aux_free` (bias only) or `aux_free_bias: true` (beside a balancing loss).
- top_k == 1: `norm_topk_prob` is ignored, the gate weight is the router probability itself (Switch Transformer).
  Renormalising a single probability gives the constant 1, and the router would get no gradient from the LM loss.
- Balancing losses (Switch micro-batch, sequence-wise, global-batch) and the z-loss: see model/moe_balance.py.
- Null experts (AdaMoE, arXiv 2406.13233): extra router outputs whose expert outputs zero at no cost; a token may pick
  fewer real experts. With norm_topk_prob the gates are renormalised over the real experts picked (AdaMoE's code).
  Parameter matching counts the routed experts a token uses under balanced routing: top_k·n_experts/E.
- Expert load is counted with tensors (no sync); `expert_load()` / `health()` convert to floats only when asked.
  Counting only happens in training mode, so evaluation and generation do not move the bias or the statistics.
- Per-step bookkeeping is the block's own: `after_optimizer_step(skipped)` all-reduces the step's routed-slot counts
  under torch.distributed (global load for the bias and MaxVio), moves the bias, resets the global-batch loss's
  running counts, and discards the counts of a skipped step.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from model.ffn import ACTIVATIONS, DENSE_ACTIVATIONS, FFNBlock, check_activation, dense_ffn_params, round_to
from model.moe_balance import RoutingStats, balance_losses, bias_step, distributed
from model.moe_experts import EXPERT_CLASSES, GroupedExperts, Router, _pad_groups, _position_in_group  # noqa: F401
from model.precision import compute_dtype

# model.config.FFNConfig / MiniMindConfig, by duck typing: the blocks never import the config module (it asks the
# registry, which imports the blocks), so annotations name them through these aliases.
FFNConfig = MiniMindConfig = Any


class MoEFFN(FFNBlock):
    """Top-k routed experts (+ optional shared experts), matched on *active* parameters: the router, top_k routed
    experts and the shared experts a token touches together hold the dense FFN's 8·d²."""

    matched_on: ClassVar[str] = "active"
    step_cost: ClassVar[float] = 1.25  # routing, sorting and smaller matmuls: up to ~1.25x a dense step
    may_skip_params: ClassVar[bool] = True  # an expert may get no tokens in a micro-batch
    matmul_input: ClassVar[bool] = True  # the router's Linear and the experts' GEMMs (cast once in forward)

    def __init__(self, dim: int, ffn: FFNConfig):
        super().__init__()
        d_ff = self.width(ffn, dim)
        self.n_experts, self.top_k, self.d_ff = ffn.n_experts, ffn.top_k, d_ff
        self.n_null_experts = ffn.n_null_experts
        self.n_outputs = n_out = ffn.n_experts + ffn.n_null_experts  # router outputs E
        self.n_shared_experts = ffn.n_shared_experts
        self.balancing, self.aux_loss_coef, self.z_loss_coef = ffn.balancing, ffn.aux_loss_coef, ffn.z_loss_coef
        self.bias_update_rate, self.capacity_factor = ffn.bias_update_rate, ffn.capacity_factor
        self.uses_bias = ffn.balancing == "aux_free" or ffn.aux_free_bias
        self.router = Router(dim, ffn.n_experts, ffn.top_k, ffn.router_scoring, ffn.norm_topk_prob,
                             ffn.n_null_experts)
        self.experts = GroupedExperts(ffn.n_experts, dim, d_ff, ffn.expert_type, ffn.expert_activation)
        # n shared experts of width F summed == one FFN of width n·F (same parameters, one bigger matmul)
        shared_cls = EXPERT_CLASSES[ffn.expert_type]
        self.shared_experts = (shared_cls(dim, self.shared_width(ffn, d_ff), ffn.expert_activation)
                               if ffn.n_shared_experts else None)
        # routed slots per output: since reset_expert_load() (logging), since the last optimizer step (bias, MaxVio),
        # and all ranks' since the last optimizer step (global_aux_loss's running f)
        for name in ("load_counts", "pending_counts", "global_counts"):
            self.register_buffer(name, torch.zeros(n_out, dtype=torch.long), persistent=False)
        self.stats = RoutingStats()  # health() since reset_expert_load()
        self.aux_loss: torch.Tensor | None = None  # coefficient-weighted sum, set by every forward
        self.aux_losses: dict[str, torch.Tensor] = {}  # each kind, coefficient applied

    # --- what the rest of the code asks of the type ------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: MiniMindConfig) -> MoEFFN:
        return cls(cfg.hidden_size, cfg.ffn)

    @classmethod
    def width(cls, ffn: FFNConfig, hidden_size: int) -> int:
        """Each routed expert's width: the router, the routed experts a token uses (top_k; with null experts
        top_k·n_experts/E, their share under balanced routing) and the shared experts (n_shared_experts of this width,
        or shared_d_ff wide) hold the dense FFN's 8·d²."""
        if ffn.d_ff is not None:
            return ffn.d_ff
        d, matrices = hidden_size, EXPERT_CLASSES[ffn.expert_type].matrices
        n_out = ffn.n_experts + ffn.n_null_experts
        routed = ffn.top_k * ffn.n_experts / n_out if ffn.n_null_experts else ffn.top_k
        budget = dense_ffn_params(d) - d * n_out
        if ffn.shared_d_ff is not None and ffn.n_shared_experts:  # the shared width is given: routed experts fill up
            budget, active_experts = budget - matrices * d * ffn.shared_d_ff, routed
        else:
            active_experts = routed + ffn.n_shared_experts
        width = budget / active_experts / (matrices * d)
        if width < 1:
            raise ValueError(f"model.ffn: top_k+n_shared_experts={active_experts} experts cannot fit the dense FFN's "
                             f"parameter budget at hidden_size={d}; set model.ffn.d_ff explicitly")
        return round_to(width, ffn.multiple_of)

    @staticmethod
    def shared_width(ffn: FFNConfig, d_ff: int) -> int:
        """The shared experts' total width (they run as one FFN): shared_d_ff, else n_shared_experts · d_ff."""
        return ffn.shared_d_ff if ffn.shared_d_ff is not None else ffn.n_shared_experts * d_ff

    @classmethod
    def validate(cls, ffn: FFNConfig) -> None:
        if ffn.n_experts < 1:
            raise ValueError(f"model.ffn.n_experts must be >= 1, got {ffn.n_experts}")
        if ffn.n_null_experts < 0:
            raise ValueError(f"model.ffn.n_null_experts must be >= 0, got {ffn.n_null_experts}")
        n_out = ffn.n_experts + ffn.n_null_experts
        if not 1 <= ffn.top_k <= n_out:
            what = f"n_experts+n_null_experts={n_out}" if ffn.n_null_experts else f"n_experts={ffn.n_experts}"
            raise ValueError(f"model.ffn.top_k must be between 1 and {what}, got {ffn.top_k}")
        if ffn.n_shared_experts < 0:
            raise ValueError(f"model.ffn.n_shared_experts must be >= 0, got {ffn.n_shared_experts}")
        if ffn.shared_d_ff is not None and (ffn.shared_d_ff < 1 or not ffn.n_shared_experts):
            raise ValueError(f"model.ffn.shared_d_ff={ffn.shared_d_ff} needs n_shared_experts >= 1 and a positive "
                             f"width (null: n_shared_experts × the routed expert width)")
        if ffn.expert_type not in EXPERT_CLASSES:
            raise ValueError(f"model.ffn.expert_type '{ffn.expert_type}' is unknown; valid: "
                             f"{', '.join(EXPERT_CLASSES)}")
        valid = DENSE_ACTIVATIONS if ffn.expert_type == "dense" else tuple(ACTIVATIONS)
        check_activation("expert_activation", ffn.expert_activation, valid, f"{ffn.expert_type} experts")
        for key in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(ffn, key) < 0:
                raise ValueError(f"model.ffn.{key} must be >= 0, got {getattr(ffn, key)}")
        if ffn.capacity_factor is not None and ffn.capacity_factor <= 0:
            raise ValueError(f"model.ffn.capacity_factor must be > 0 or null, got {ffn.capacity_factor}")

    @classmethod
    def label(cls, ffn: FFNConfig) -> str:
        return f"moe {ffn.n_experts}x{ffn.top_k}{cls._shared(ffn)} {ffn.expert_type}-{ffn.expert_activation}"

    @classmethod
    def slug(cls, ffn: FFNConfig) -> str:
        return f"moe{ffn.n_experts}x{ffn.top_k}{cls._shared(ffn)}-{ffn.expert_type}-{ffn.expert_activation}"

    @staticmethod
    def _shared(ffn: FFNConfig) -> str:
        null = f"+{ffn.n_null_experts}n" if ffn.n_null_experts else ""
        return (f"+{ffn.n_shared_experts}s" if ffn.n_shared_experts else "") + null

    @classmethod
    def describe(cls, ffn: FFNConfig) -> dict:
        extra = {"n_null_experts": ffn.n_null_experts} if ffn.n_null_experts else {}
        return dict(activation=ffn.expert_activation, n_experts=ffn.n_experts, top_k=ffn.top_k,
                    n_shared_experts=ffn.n_shared_experts, expert_type=ffn.expert_type,
                    router_scoring=ffn.router_scoring, balancing=ffn.balancing, **extra)

    @classmethod
    def hf_export(cls, ffn: FFNConfig) -> dict:
        """Mixtral, only where its routing is ours exactly: softmax over all experts -> top-k -> divide by the top-k
        sum, gated experts stored like ours (gate_up_proj (E, 2F, D) gate first, down_proj (E, D, F)). Qwen3-MoE has
        the norm_topk_prob flag but adds per-head q/k RMSNorm to attention, which our model does not have."""
        why = None
        if ffn.expert_type != "glu":
            why = (f"model.ffn.expert_type={ffn.expert_type}: Mixtral experts are gated (act(gate·x)·(up·x)); "
                   f"ungated experts have no equivalent")
        elif ffn.n_null_experts:
            why = (f"model.ffn.n_null_experts={ffn.n_null_experts}: Mixtral has no zero-compute experts and always "
                   f"sends a token to top_k real experts")
        elif ffn.n_shared_experts:
            why = (f"model.ffn.n_shared_experts={ffn.n_shared_experts}: Mixtral has no shared experts (Qwen2-MoE's "
                   f"shared expert has an extra sigmoid gate and attention biases, so it is not an exact match either)")
        elif ffn.router_scoring != "softmax":
            why = (f"model.ffn.router_scoring={ffn.router_scoring}: Mixtral scores experts with a softmax over all "
                   f"router logits")
        elif ffn.top_k == 1:
            why = ("model.ffn.top_k=1: our top-1 gate weight is the router probability, Mixtral renormalises the "
                   "top-k weights (giving 1); Qwen3-MoE could keep the probability but adds per-head q/k RMSNorm to "
                   "attention")
        elif not ffn.norm_topk_prob:
            why = ("model.ffn.norm_topk_prob=false: Mixtral always renormalises the top-k weights; Qwen3-MoE has the "
                   "flag but adds per-head q/k RMSNorm to attention, which our model does not have")
        elif ffn.capacity_factor is not None:
            why = (f"model.ffn.capacity_factor={ffn.capacity_factor}: tokens over an expert's capacity are dropped, "
                   f"transformers' MoE models never drop tokens")
        if why:
            raise ValueError(f"cannot export this MoE as Mixtral: {why}")
        return {"architecture": "mixtral", "activation": ffn.expert_activation,
                "config": dict(num_local_experts=ffn.n_experts, num_experts_per_tok=ffn.top_k,
                               router_jitter_noise=0.0, router_aux_loss_coef=ffn.aux_loss_coef)}

    def hf_weights(self) -> dict[str, torch.Tensor]:
        """This block's weights under transformers' Mixtral names (relative to the layer's `mlp.`)."""
        if bool(self.router.selection_bias.any()):
            raise ValueError("cannot export this MoE as Mixtral: the router's selection bias (aux-loss-free "
                             "balancing, model.ffn.balancing=aux_free) is nonzero: it changes which experts are "
                             "picked, and Mixtral's router has no such bias")
        return {"gate.weight": self.router.gate.weight, "experts.gate_up_proj": self.experts.w_up,
                "experts.down_proj": self.experts.w_down}

    def active_params(self) -> int:
        """Parameters one token touches: the router, top_k routed experts and the shared experts (with null experts:
        the top_k·n_experts/E routed experts of balanced routing; health()'s active_ffn_params is the measured one)."""
        routed = self.top_k * self.per_expert_params()
        if self.n_null_experts:
            routed = round(routed * self.n_experts / self.n_outputs)
        return self.fixed_params() + routed

    def per_expert_params(self) -> int:
        return self.experts.w_up[0].numel() + self.experts.w_down[0].numel()

    def fixed_params(self) -> int:
        """Parameters every token uses: the router and the shared experts."""
        shared = sum(p.numel() for p in self.shared_experts.parameters()) if self.shared_experts else 0
        return self.router.gate.weight.numel() + shared

    # --- forward ---------------------------------------------------------------------------------------------------
    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        x_ND = x_ND.to(compute_dtype(x_ND))  # under autocast: cast the N tokens once, not the N·K gathered copies
        n_tokens, K = x_ND.shape[0], self.top_k
        logits_NE, probs_NE, expert_NK, weight_NK = self.router(x_ND)
        expert_S = expert_NK.reshape(-1)
        # slots per expert; scatter_add keeps a fixed shape (bincount's depends on the data: bad for compile)
        counts_E = torch.zeros(self.n_outputs, dtype=torch.long, device=x_ND.device).scatter_add_(
            0, expert_S, torch.ones_like(expert_S))
        n_seqs = x_BTD.shape[0] if x_BTD.dim() == 3 else 1  # the sequence-wise loss needs the sequences
        self.aux_loss, self.aux_losses = balance_losses(self, logits_NE, probs_NE, expert_NK, counts_E, n_seqs)
        if self.training:
            self.load_counts += counts_E
            self.pending_counts += counts_E

        order_S = torch.argsort(expert_S, stable=True)  # slot ids grouped by expert, in token order within each
        expert_sorted_S, run_counts_E = expert_S[order_S], counts_E
        if self.n_null_experts:  # null experts' slots (sorted last) compute nothing: drop them
            keep_S = expert_sorted_S < self.n_experts
            order_S, expert_sorted_S = order_S[keep_S], expert_sorted_S[keep_S]
            run_counts_E = counts_E[:self.n_experts]
        if self.capacity_factor is not None:
            order_S, expert_sorted_S, run_counts_E = self._drop_over_capacity(order_S, expert_sorted_S, run_counts_E,
                                                                              n_tokens)
        if self.training:
            self.stats.record_forward(probs_NE, counts_E[:self.n_experts].sum(), run_counts_E.sum())
        token_S, weight_S = order_S // K, weight_NK.reshape(-1)[order_S]
        pad = self.pad_rows(x_ND)
        if pad > 1:  # rows R >= S: each expert's group padded with weight-0 rows (see pad_rows)
            token_S, weight_S, run_counts_E = _pad_groups(token_S, weight_S, expert_sorted_S, run_counts_E, pad)
        y_SD = self.experts(x_ND.index_select(0, token_S), run_counts_E)
        # weight each slot's output by its gate, then sum the K slots of every token (dropped slots add nothing)
        weight_S = weight_S.to(y_SD.dtype)
        out_ND = y_SD.new_zeros(n_tokens, y_SD.shape[-1]).index_add_(0, token_S, y_SD * weight_S[:, None])
        if self.shared_experts is not None:
            out_ND = out_ND + self.shared_experts(x_ND)
        return out_ND.view(x_BTD.shape[:-1] + out_ND.shape[-1:])

    def pad_rows(self, x_ND: torch.Tensor) -> int:
        """Row multiple for every expert's group: 32 for grouped bf16/fp16 matmuls on CPU, else 1 (no padding).

        On CPU these run on oneDNN, which JIT-compiles a kernel for every new matmul shape. Expert group sizes
        follow the routing, which changes every step, so unpadded groups compile hundreds of kernels per step and
        lose them again from the primitive cache. Multiples of 32 leave a few dozen shapes that stay cached, for at
        most E·31 extra rows. fp32 runs on MKL: no JIT, no padding.
        """
        on_onednn = x_ND.device.type == "cpu" and x_ND.dtype != torch.float32
        return 32 if on_onednn and self.experts.grouped_mm_ok(x_ND) else 1

    def _drop_over_capacity(self, order_S, expert_sorted_S, counts_E, n_tokens):
        # balanced routing gives every router output (real or null) top_k·N/E slots
        capacity = math.ceil(self.capacity_factor * self.top_k * n_tokens / self.n_outputs)
        keep_S = _position_in_group(expert_sorted_S, counts_E) < capacity
        return order_S[keep_S], expert_sorted_S[keep_S], counts_E.clamp(max=capacity)

    # --- per-step bookkeeping and observability ------------------------------------------------------------------
    @torch.no_grad()
    def after_optimizer_step(self, skipped: bool = False) -> None:
        """Once per optimizer step, on every rank, in the same order (a collective under torch.distributed). The
        step's routed-slot counts are summed over all processes, so every rank sees the global batch's load: MaxVio
        is recorded from it and the aux-loss-free bias moves by γ·sign(mean load − load) (DeepSeek-V3), the same on
        every rank. A skipped step (non-finite loss) only discards its counts: its routing must not steer the bias.
        The global-batch loss's running counts start again with the next step."""
        if not skipped:
            if distributed():
                dist.all_reduce(self.pending_counts)
            self.stats.record_step(self.pending_counts[:self.n_experts])
            if self.uses_bias and int(self.pending_counts.sum()) > 0:
                bias_step(self.router.selection_bias, self.pending_counts, self.bias_update_rate, self.n_experts)
        self.pending_counts.zero_()
        self.global_counts.zero_()

    def expert_load(self) -> list[float]:
        """Fraction of routed token slots per router output (experts, then null experts) since the last
        reset_expert_load() (this process only)."""
        total = int(self.load_counts.sum())
        return [0.0] * self.n_outputs if total == 0 else (self.load_counts.double() / total).tolist()

    def health(self) -> dict[str, float]:
        """Routing health since the last reset_expert_load(), as moe_<name> (the metrics.jsonl keys; each name is
        described in model.moe_balance.RoutingStats): moe_max_vio, moe_drop_frac, moe_router_entropy, moe_bias_abs,
        moe_active_ffn_params."""
        summary = self.stats.summary(self.router.selection_bias, self.fixed_params(), self.per_expert_params())
        return {f"moe_{name}": value for name, value in summary.items()}

    def reset_expert_load(self) -> None:
        self.load_counts.zero_()
        self.stats.reset()

    def window_state(self) -> dict[str, torch.Tensor]:
        """The open logging window (load counts and health counters) as CPU tensors, for checkpoints, so that a
        resumed run's next train line matches the uninterrupted run's (load_window_state puts it back)."""
        buffers = {"load_counts": self.load_counts, **{f"stats.{n}": b for n, b in self.stats.named_buffers()}}
        return {name: b.to("cpu", copy=True) for name, b in buffers.items()}  # copies: the window moves on

    def load_window_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_counts.copy_(state["load_counts"])
        for name, buf in self.stats.named_buffers():
            if f"stats.{name}" in state:  # a checkpoint from before the health counters: keep them at zero
                buf.copy_(state[f"stats.{name}"])
