"""The MoE block's parts (model/moe.py): the router, the grouped experts and the padding of expert groups.

Shape suffixes: N tokens, D hidden, E router outputs (n_experts routed experts, then n_null null experts), K top_k,
S = N·K routed slots, R padded rows, F expert width, U expert up-projection width (2F for GLU experts: gate and up
fused; F for dense experts).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.ffn import ACTIVATIONS, GLUFFN, DenseFFN
from model.fused_ops import glu_product, has_fused_glu
from model.precision import compute_dtype

_GROUPED_MM = getattr(F, "grouped_mm", None)
EXPERT_CLASSES = {"dense": DenseFFN, "glu": GLUFFN}  # model.ffn.expert_type -> the block one expert computes


class Router(nn.Module):
    """Scores E = n_experts + n_null outputs; null experts (AdaMoE) are outputs whose expert computes nothing."""

    def __init__(self, dim: int, n_experts: int, top_k: int, scoring: str, norm_topk_prob: bool, n_null: int = 0):
        super().__init__()
        self.n_experts, self.top_k, self.scoring, self.norm_topk_prob = n_experts, top_k, scoring, norm_topk_prob
        self.n_null = n_null
        self.gate = nn.Linear(dim, n_experts + n_null, bias=False)
        # Aux-loss-free balancing bias: added to the scores only to choose the top-k (a persistent buffer, not a
        # parameter: moved by MoEFFN.after_optimizer_step, never by the optimizer). Zero unless the bias is used.
        self.register_buffer("selection_bias", torch.zeros(n_experts + n_null))

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
        if self.norm_topk_prob and self.top_k > 1 and self.n_null:
            # AdaMoE: renormalise over the routed experts picked (null slots output zero whatever their weight); a
            # token that picked only null experts keeps its (unused) weights
            real_NK = expert_NK < self.n_experts
            sum_N1 = (weight_NK * real_NK).sum(dim=-1, keepdim=True)
            weight_NK = weight_NK / torch.where(sum_N1 > 0, sum_N1, torch.ones_like(sum_N1))
        elif self.norm_topk_prob and self.top_k > 1:  # top_k == 1: keep p (see model/moe.py's docstring)
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
            if has_fused_glu(self.act):
                return glu_product(h_SU, self.act)
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
