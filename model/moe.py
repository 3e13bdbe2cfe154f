"""Mixture-of-Experts FFN in small pieces (after torchtitan): Router -> sort tokens by expert -> GroupedExperts.

Shape suffixes: N tokens (B·T flattened), D hidden, E routed experts, K top_k, S = N·K routed slots, F expert width,
U expert up-projection width (2F for GLU experts: gate and up fused; F for dense experts).

Design choices (see also tests/test_moe.py):
- Dispatch sorts the S slots by expert, runs every expert on its contiguous slice with one grouped matmul on stacked
  weights (`F.grouped_mm`; a split-per-expert loop where grouped_mm is unavailable or the shapes are unaligned), then
  adds each slot's gate-weighted output back into its token's row (index_add). No dense all-experts compute, no token
  dropping unless `capacity_factor` is set, no host sync in the grouped path.
- Gate weights come from the unbiased router scores; the aux-loss-free bias (DeepSeek-V3) only affects which experts
  are picked.
- top_k == 1: `norm_topk_prob` is ignored, the gate weight is the router probability itself (Switch Transformer).
  Renormalising a single probability gives the constant 1, and the router would get no gradient from the LM loss.
- Switch/GShard auxiliary loss for top-k: α·E·Σ_i f_i·P_i with f_i = (slots routed to i) / (N·K) (each token counts
  K times) and P_i = mean over tokens of i's routing probability (sigmoid scores normalised to sum 1 per token).
  Under uniform routing f_i = P_i = 1/E and the loss equals α. The router z-loss (ST-MoE) is c_z·mean(lse(logits)²)
  and is applied whenever z_loss_coef > 0, whatever the balancing mode.
- Expert load is counted with tensors (no sync); `expert_load()` converts to floats only when asked. Counting only
  happens in training mode, so evaluation and generation do not move the aux-free bias.
- Per-step bookkeeping is the block's own: `after_optimizer_step(skipped)` moves the aux-free bias (all-reducing the
  routed-slot counts under torch.distributed) and discards the counts of a skipped step.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model.ffn import ACTIVATIONS, DENSE_ACTIVATIONS, GLUFFN, DenseFFN, FFNBlock, check_activation, dense_ffn_params, \
    round_to
from model.precision import compute_dtype

if TYPE_CHECKING:
    from model.config import FFNConfig, MiniMindConfig

_GROUPED_MM = getattr(F, "grouped_mm", None)
EXPERT_CLASSES = {"dense": DenseFFN, "glu": GLUFFN}  # model.ffn.expert_type -> the block one expert computes


class Router(nn.Module):
    def __init__(self, dim: int, n_experts: int, top_k: int, scoring: str, norm_topk_prob: bool):
        super().__init__()
        self.n_experts, self.top_k, self.scoring, self.norm_topk_prob = n_experts, top_k, scoring, norm_topk_prob
        self.gate = nn.Linear(dim, n_experts, bias=False)
        # Aux-loss-free balancing bias: added to the scores only to choose the top-k (a persistent buffer, not a
        # parameter: moved by MoEFFN.after_optimizer_step, never by the optimizer). Zero unless balancing == aux_free.
        self.register_buffer("selection_bias", torch.zeros(n_experts))

    def forward(self, x_ND: torch.Tensor):
        """-> logits_NE (fp32), probs_NE (fp32, sum to 1 per token), expert_NK (int64), weight_NK (fp32)."""
        logits_NE = self.gate(x_ND).float()  # routing decisions in fp32: cheap (E columns) and stable
        if self.scoring == "softmax":
            scores_NE = logits_NE.softmax(dim=-1)
            probs_NE = scores_NE
        else:
            scores_NE = logits_NE.sigmoid()
            probs_NE = scores_NE / scores_NE.sum(dim=-1, keepdim=True)
        _, expert_NK = torch.topk(scores_NE.detach() + self.selection_bias, self.top_k, dim=-1)
        weight_NK = scores_NE.gather(-1, expert_NK)
        if self.norm_topk_prob and self.top_k > 1:  # top_k == 1: keep p (see module docstring)
            weight_NK = weight_NK / weight_NK.sum(dim=-1, keepdim=True)
        return logits_NE, probs_NE, expert_NK, weight_NK


class GroupedExperts(nn.Module):
    """E experts of the same shape with stacked weights, run on expert-sorted tokens: one grouped matmul when it
    works for the device, dtype and shapes (`grouped_mm_ok`), else a loop over the experts."""

    def __init__(self, n_experts: int, dim: int, d_ff: int, kind: str, activation: str):
        super().__init__()
        self.kind, self.activation, self.d_ff = kind, activation, d_ff
        self.act = ACTIVATIONS[activation]
        up = 2 * d_ff if kind == "glu" else d_ff
        # Stored like nn.Linear weights (out, in): x @ w.T is the fast GEMM layout on CPU.
        self.w_up = nn.Parameter(torch.empty(n_experts, up, dim))
        self.w_down = nn.Parameter(torch.empty(n_experts, dim, d_ff))

    def _hidden(self, h_SU: torch.Tensor) -> torch.Tensor:
        if self.kind == "glu":
            gate_SF, up_SF = h_SU.chunk(2, dim=-1)
            return self.act(gate_SF) * up_SF
        return self.act(h_SU)

    def grouped_mm_ok(self, x_SD: torch.Tensor) -> bool:
        dtype = compute_dtype(x_SD)
        if _GROUPED_MM is None:
            return False
        if x_SD.device.type == "cpu":
            # eager CPU runs fp32 too, but torch.compile's shape rules for grouped_mm accept bf16 only
            ok_device = dtype == torch.bfloat16 or (dtype == torch.float32 and not torch.compiler.is_compiling())
        elif x_SD.device.type == "cuda":
            ok_device = dtype == torch.bfloat16 and torch.cuda.get_device_capability(x_SD.device) >= (9, 0)
        else:
            ok_device = False
        # grouped GEMM kernels need every row stride to be a multiple of 16 bytes
        align = 16 // torch.empty((), dtype=dtype).element_size()
        return ok_device and all(n % align == 0 for n in (*self.w_up.shape[1:], self.d_ff))

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if self.grouped_mm_ok(x_SD):
            return self._forward_grouped(x_SD, counts_E)
        return self._forward_loop(x_SD, counts_E)

    def _forward_grouped(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # grouped_mm is not covered by autocast: cast like autocast would (weights to the compute dtype)
        dtype = compute_dtype(x_SD)
        w_up, w_down = self.w_up.to(dtype), self.w_down.to(dtype)
        offsets_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        h_SU = _GROUPED_MM(x_SD.to(dtype), w_up.transpose(-2, -1), offs=offsets_E)
        return _GROUPED_MM(self._hidden(h_SU), w_down.transpose(-2, -1), offs=offsets_E)

    def _forward_loop(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        outputs = []
        for e, x_sD in enumerate(x_SD.split(counts_E.tolist())):  # one host sync for the split sizes
            if x_sD.shape[0]:
                outputs.append(F.linear(self._hidden(F.linear(x_sD, self.w_up[e])), self.w_down[e]))
        if not outputs:
            return x_SD.new_zeros(x_SD.shape)
        return torch.cat(outputs)
def _position_in_group(expert_sorted_S: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Each expert-sorted slot's index inside its expert's group."""
    start_E = torch.cumsum(counts_E, 0) - counts_E
    return torch.arange(expert_sorted_S.numel(), device=expert_sorted_S.device) - start_E[expert_sorted_S]


def _pad_groups(token_S, weight_S, expert_S, counts_E, pad: int):
    """Spread the expert-sorted slots over R rows so every group's row count is a multiple of `pad`.

    R = S + E·(pad − 1) rounded up to a multiple of `pad` is fixed by the shapes (no host sync, no data-dependent
    size); the last group takes the slack. Padding rows read token 0 and have gate weight 0, so they add exactly
    zero to the output and to every gradient. -> token_R, weight_R, padded counts_E.
    """
    S, E = token_S.numel(), counts_E.numel()
    R = -(-(S + E * (pad - 1)) // pad) * pad
    padded_E = (counts_E + pad - 1) // pad * pad
    padded_E = torch.cat([padded_E[:-1], (R - padded_E[:-1].sum()).reshape(1)])
    row_S = _position_in_group(expert_S, counts_E) + (torch.cumsum(padded_E, 0) - padded_E)[expert_S]
    token_R = token_S.new_zeros(R).index_copy_(0, row_S, token_S)
    weight_R = weight_S.new_zeros(R).index_copy(0, row_S, weight_S)  # out of place: weight_S needs its gradient
    return token_R, weight_R, padded_E


class MoEFFN(FFNBlock):
    """Top-k routed experts (+ optional shared experts), matched on *active* parameters: the router, top_k routed
    experts and the shared experts a token touches together hold the dense FFN's 8·d²."""

    matched_on: ClassVar[str] = "active"
    step_cost: ClassVar[float] = 1.25  # routing, sorting and smaller matmuls: up to ~1.25x a dense step
    may_skip_params: ClassVar[bool] = True  # an expert may get no tokens in a micro-batch

    def __init__(self, dim: int, ffn: FFNConfig):
        super().__init__()
        d_ff = self.width(ffn, dim)
        self.n_experts, self.top_k, self.d_ff = ffn.n_experts, ffn.top_k, d_ff
        self.n_shared_experts = ffn.n_shared_experts
        self.balancing, self.aux_loss_coef, self.z_loss_coef = ffn.balancing, ffn.aux_loss_coef, ffn.z_loss_coef
        self.bias_update_rate, self.capacity_factor = ffn.bias_update_rate, ffn.capacity_factor
        self.router = Router(dim, ffn.n_experts, ffn.top_k, ffn.router_scoring, ffn.norm_topk_prob)
        self.experts = GroupedExperts(ffn.n_experts, dim, d_ff, ffn.expert_type, ffn.expert_activation)
        # n shared experts of width F summed == one FFN of width n·F (same parameters, one bigger matmul)
        shared_cls = EXPERT_CLASSES[ffn.expert_type]
        self.shared_experts = (shared_cls(dim, ffn.n_shared_experts * d_ff, ffn.expert_activation)
                               if ffn.n_shared_experts else None)
        # routed slots per expert: since reset_expert_load() (logging) and since the last optimizer step (aux_free)
        self.register_buffer("load_counts", torch.zeros(ffn.n_experts, dtype=torch.long), persistent=False)
        self.register_buffer("pending_counts", torch.zeros(ffn.n_experts, dtype=torch.long), persistent=False)
        self.aux_loss: torch.Tensor | None = None  # coefficient-weighted sum, set by every forward
        self.aux_losses: dict[str, torch.Tensor] = {}  # each kind, coefficient applied

    # --- what the rest of the code asks of the type ------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: MiniMindConfig) -> MoEFFN:
        return cls(cfg.hidden_size, cfg.ffn)

    @classmethod
    def width(cls, ffn: FFNConfig, hidden_size: int) -> int:
        """Each expert's width: top_k routed + n_shared_experts experts + the router hold the dense FFN's 8·d²."""
        if ffn.d_ff is not None:
            return ffn.d_ff
        d = hidden_size
        active_experts = ffn.top_k + ffn.n_shared_experts
        per_expert = (dense_ffn_params(d) - d * ffn.n_experts) / active_experts
        width = per_expert / (EXPERT_CLASSES[ffn.expert_type].matrices * d)
        if width < 1:
            raise ValueError(f"model.ffn: top_k+n_shared_experts={active_experts} experts cannot fit the dense FFN's "
                             f"parameter budget at hidden_size={d}; set model.ffn.d_ff explicitly")
        return round_to(width, ffn.multiple_of)

    @classmethod
    def validate(cls, ffn: FFNConfig) -> None:
        if ffn.n_experts < 1:
            raise ValueError(f"model.ffn.n_experts must be >= 1, got {ffn.n_experts}")
        if not 1 <= ffn.top_k <= ffn.n_experts:
            raise ValueError(f"model.ffn.top_k must be between 1 and n_experts={ffn.n_experts}, got {ffn.top_k}")
        if ffn.n_shared_experts < 0:
            raise ValueError(f"model.ffn.n_shared_experts must be >= 0, got {ffn.n_shared_experts}")
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
        return f"+{ffn.n_shared_experts}s" if ffn.n_shared_experts else ""

    @classmethod
    def describe(cls, ffn: FFNConfig) -> dict:
        return dict(activation=ffn.expert_activation, n_experts=ffn.n_experts, top_k=ffn.top_k,
                    n_shared_experts=ffn.n_shared_experts, expert_type=ffn.expert_type,
                    router_scoring=ffn.router_scoring, balancing=ffn.balancing)

    @classmethod
    def hf_export(cls, ffn: FFNConfig) -> dict:
        """Mixtral, only where its routing is ours exactly: softmax over all experts -> top-k -> divide by the top-k
        sum, gated experts stored like ours (gate_up_proj (E, 2F, D) gate first, down_proj (E, D, F)). Qwen3-MoE has
        the norm_topk_prob flag but adds per-head q/k RMSNorm to attention, which our model does not have."""
        why = None
        if ffn.expert_type != "glu":
            why = (f"model.ffn.expert_type={ffn.expert_type}: Mixtral experts are gated (act(gate·x)·(up·x)); "
                   f"ungated experts have no equivalent")
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
        """Parameters one token touches: the router, top_k routed experts and the shared experts."""
        per_expert = self.experts.w_up[0].numel() + self.experts.w_down[0].numel()
        shared = sum(p.numel() for p in self.shared_experts.parameters()) if self.shared_experts else 0
        return self.router.gate.weight.numel() + self.top_k * per_expert + shared

    # --- forward ---------------------------------------------------------------------------------------------------
    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        x_ND = x_ND.to(compute_dtype(x_ND))  # under autocast: cast the N tokens once, not the N·K gathered copies
        n_tokens, K = x_ND.shape[0], self.top_k
        logits_NE, probs_NE, expert_NK, weight_NK = self.router(x_ND)
        expert_S = expert_NK.reshape(-1)
        # slots per expert; scatter_add keeps a fixed shape (bincount's depends on the data: bad for compile)
        counts_E = torch.zeros(self.n_experts, dtype=torch.long, device=x_ND.device).scatter_add_(
            0, expert_S, torch.ones_like(expert_S))
        self._losses(logits_NE, probs_NE, counts_E, n_tokens)
        if self.training:
            self.load_counts += counts_E
            self.pending_counts += counts_E

        order_S = torch.argsort(expert_S, stable=True)  # slot ids grouped by expert, in token order within each
        expert_sorted_S, run_counts_E = expert_S[order_S], counts_E
        if self.capacity_factor is not None:
            order_S, expert_sorted_S, run_counts_E = self._drop_over_capacity(order_S, expert_sorted_S, counts_E,
                                                                              n_tokens)
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
        capacity = math.ceil(self.capacity_factor * self.top_k * n_tokens / self.n_experts)
        keep_S = _position_in_group(expert_sorted_S, counts_E) < capacity
        return order_S[keep_S], expert_sorted_S[keep_S], counts_E.clamp(max=capacity)

    def _losses(self, logits_NE, probs_NE, counts_E, n_tokens) -> None:
        zero = logits_NE.new_zeros(())
        aux, z = zero, zero
        if self.balancing == "aux_loss" and self.aux_loss_coef > 0:
            f_E = counts_E.to(probs_NE.dtype) / (n_tokens * self.top_k)
            aux = self.aux_loss_coef * self.n_experts * torch.sum(f_E * probs_NE.mean(dim=0))
        if self.z_loss_coef > 0:
            z = self.z_loss_coef * torch.logsumexp(logits_NE, dim=-1).square().mean()
        self.aux_loss = aux + z
        self.aux_losses = {"aux_loss": aux, "z_loss": z}

    # --- per-step bookkeeping and observability ------------------------------------------------------------------
    @torch.no_grad()
    def after_optimizer_step(self, skipped: bool = False) -> None:
        """Once per optimizer step. Aux-loss-free balancing (DeepSeek-V3): bias += γ·sign(mean load − load), from the
        slots routed since the previous call, summed over all processes under torch.distributed so every rank's bias
        stays the same (every rank calls this for every aux_free layer, in the same order, with the same `skipped`).
        A skipped step (non-finite loss) only discards its counts: its routing must not steer the bias."""
        if self.balancing == "aux_free" and not skipped:
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(self.pending_counts)
            if int(self.pending_counts.sum()) > 0:
                load_E = self.pending_counts.float()
                self.router.selection_bias += self.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.pending_counts.zero_()

    def expert_load(self) -> list[float]:
        """Fraction of routed token slots per expert since the last reset_expert_load() (this process only)."""
        total = int(self.load_counts.sum())
        return [0.0] * self.n_experts if total == 0 else (self.load_counts.double() / total).tolist()

    def reset_expert_load(self) -> None:
        self.load_counts.zero_()
