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
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import MiniMindConfig, resolve_d_ff

_GROUPED_MM = getattr(F, "grouped_mm", None)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class Router(nn.Module):
    def __init__(self, dim: int, n_experts: int, top_k: int, scoring: str, norm_topk_prob: bool):
        super().__init__()
        self.n_experts, self.top_k, self.scoring, self.norm_topk_prob = n_experts, top_k, scoring, norm_topk_prob
        self.gate = nn.Linear(dim, n_experts, bias=False)
        # Aux-loss-free balancing bias: added to the scores only to choose the top-k (a persistent buffer, not a
        # parameter: it is moved by update_bias, never by the optimizer). Stays zero unless balancing == aux_free.
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
    """E experts of the same shape with stacked weights, run on expert-sorted tokens.

    `mode`: "auto" (grouped matmul when it works for the device/dtype/shapes, else the loop), "grouped" or "loop".
    """

    def __init__(self, n_experts: int, dim: int, d_ff: int, kind: str, activation: str):
        super().__init__()
        from model.ffn import ACTIVATIONS  # here, not at the top: model/ffn.py imports this module for its registry

        self.kind, self.activation, self.d_ff = kind, activation, d_ff
        self.act = ACTIVATIONS[activation]
        up = 2 * d_ff if kind == "glu" else d_ff
        # Stored like nn.Linear weights (out, in): x @ w.T is the fast GEMM layout on CPU.
        self.w_up = nn.Parameter(torch.empty(n_experts, up, dim))
        self.w_down = nn.Parameter(torch.empty(n_experts, dim, d_ff))
        self.mode = "auto"

    def _hidden(self, h_SU: torch.Tensor) -> torch.Tensor:
        if self.kind == "glu":
            gate_SF, up_SF = h_SU.chunk(2, dim=-1)
            return self.act(gate_SF) * up_SF
        return self.act(h_SU)

    def grouped_mm_ok(self, x_SD: torch.Tensor) -> bool:
        dtype = _autocast_dtype(x_SD.device.type) or x_SD.dtype
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

    def uses_grouped(self, x_SD: torch.Tensor) -> bool:
        return self.mode == "grouped" or (self.mode == "auto" and self.grouped_mm_ok(x_SD))

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if self.uses_grouped(x_SD):
            return self._forward_grouped(x_SD, counts_E)
        return self._forward_loop(x_SD, counts_E)

    def _forward_grouped(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # grouped_mm is not covered by autocast: cast like autocast would (weights to the compute dtype)
        dtype = _autocast_dtype(x_SD.device.type) or x_SD.dtype
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

    def expert_forward(self, e: int, x_D: torch.Tensor) -> torch.Tensor:
        """Expert e on any input, written out plainly (for the naive reference)."""
        return F.linear(self._hidden(F.linear(x_D, self.w_up[e])), self.w_down[e])


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


class MoEFFN(nn.Module):
    def __init__(self, dim: int, n_experts: int, top_k: int, d_ff: int, expert_type: str = "glu",
                 expert_activation: str = "silu", n_shared_experts: int = 0, router_scoring: str = "softmax",
                 norm_topk_prob: bool = True, balancing: str = "aux_loss", aux_loss_coef: float = 0.01,
                 z_loss_coef: float = 0.001, bias_update_rate: float = 0.001, capacity_factor: float | None = None):
        from model.ffn import DenseFFN, GLUFFN

        super().__init__()
        self.n_experts, self.top_k, self.d_ff = n_experts, top_k, d_ff
        self.n_shared_experts = n_shared_experts
        self.balancing, self.aux_loss_coef, self.z_loss_coef = balancing, aux_loss_coef, z_loss_coef
        self.bias_update_rate, self.capacity_factor = bias_update_rate, capacity_factor
        self.router = Router(dim, n_experts, top_k, router_scoring, norm_topk_prob)
        self.experts = GroupedExperts(n_experts, dim, d_ff, expert_type, expert_activation)
        # n shared experts of width F summed == one FFN of width n·F (same parameters, one bigger matmul)
        shared_cls = GLUFFN if expert_type == "glu" else DenseFFN
        self.shared_experts = (shared_cls(dim, n_shared_experts * d_ff, expert_activation)
                               if n_shared_experts else None)
        # routed slots per expert: since reset_expert_load() (logging) and since the last bias update (aux_free)
        self.register_buffer("load_counts", torch.zeros(n_experts, dtype=torch.long), persistent=False)
        self.register_buffer("pending_counts", torch.zeros(n_experts, dtype=torch.long), persistent=False)
        self.aux_loss: torch.Tensor | None = None  # coefficient-weighted sum, set by every forward
        self.aux_losses: dict[str, torch.Tensor] = {}  # each kind, coefficient applied

    @classmethod
    def from_config(cls, cfg: MiniMindConfig) -> "MoEFFN":
        f = cfg.ffn
        return cls(cfg.hidden_size, f.n_experts, f.top_k, resolve_d_ff(f, cfg.hidden_size), f.expert_type,
                   f.expert_activation, f.n_shared_experts, f.router_scoring, f.norm_topk_prob, f.balancing,
                   f.aux_loss_coef, f.z_loss_coef, f.bias_update_rate, f.capacity_factor)

    def active_params(self) -> int:
        """Parameters one token touches: the router, top_k routed experts and the shared experts."""
        per_expert = self.experts.w_up[0].numel() + self.experts.w_down[0].numel()
        shared = sum(p.numel() for p in self.shared_experts.parameters()) if self.shared_experts else 0
        return self.router.gate.weight.numel() + self.top_k * per_expert + shared

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        compute_dtype = _autocast_dtype(x_ND.device.type)
        if compute_dtype is not None:  # cast the N tokens once, not the N·K gathered copies
            x_ND = x_ND.to(compute_dtype)
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
        follow the routing, which changes every step, so unpadded groups compiled ~1,000 kernels per step on
        MiniMind2-small 8×2 (seen with strace/gdb: Xbyak mmaps under brgemm_kernel_create) and lost them again
        from the primitive cache. Multiples of 32 leave a few dozen shapes that stay cached, for at most
        E·31 extra rows (3% of the slots at 8 experts, 4,096 tokens, top-2). fp32 runs on MKL: no JIT, no padding.
        """
        on_onednn = x_ND.device.type == "cpu" and x_ND.dtype != torch.float32
        return 32 if on_onednn and self.experts.uses_grouped(x_ND) else 1

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

    # --- observability and aux-loss-free balancing -----------------------------------------------------------
    def expert_load(self) -> list[float]:
        total = int(self.load_counts.sum())
        return [0.0] * self.n_experts if total == 0 else (self.load_counts.double() / total).tolist()

    def reset_expert_load(self) -> None:
        self.load_counts.zero_()

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3: bias += γ·sign(mean load − load) from the load since the last call, once per optimizer step."""
        if self.balancing == "aux_free" and int(self.pending_counts.sum()) > 0:
            load_E = self.pending_counts.float()
            self.router.selection_bias += self.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.pending_counts.zero_()

    @torch.no_grad()
    def reference_forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Naive per-token loop (no sorting, no grouping) for tests; ignores capacity_factor."""
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        _, _, expert_NK, weight_NK = self.router(x_ND)
        out_ND = torch.zeros_like(x_ND)
        for n in range(x_ND.shape[0]):
            for k in range(self.top_k):
                out_ND[n] += weight_NK[n, k] * self.experts.expert_forward(int(expert_NK[n, k]), x_ND[n])
            if self.shared_experts is not None:
                out_ND[n] += self.shared_experts(x_ND[n])
        return out_ND.view_as(x_BTD)
