"""Hand-written backward passes for the elementwise parts of a block on CPU, where eager PyTorch has no fused kernels.

Why: on a CPU whose matmuls are fast (AMX), the elementwise work around them is a third of a training step
(issue 18). Each op here replaces a chain that autograd would run as many full passes over (tokens × width) tensors,
plus the casts and concatenations between them, with the fewest passes the math needs. Forward values are the same
kernels in the same order as the plain path (bit-identical); backward is the same math with fewer roundings.

- `rms_norm`: F.rms_norm's CPU kernel is a composite (pow, mean, add, rsqrt, mul, mul) whose autograd backward makes
  ~15 passes; this one makes 6 and saves x̂ = x/rms (not x: the same memory, one pass fewer in backward) and the
  per-row 1/rms. Under autocast it writes its output in the compute dtype directly (`out_dtype`), which is the cast
  the following Linear would otherwise make (and undo in backward). The model uses it only there
  (model_minimind.RMSNorm): its gradients round differently from autograd's (same math), and in fp32 the gain was
  within noise, so fp32 runs keep F.rms_norm and their digits.
- `glu_product`: act(gate) ⊙ up from the fused gate_up projection, writing both gradient halves into one buffer (the
  plain path concatenates them in chunk's backward).

Shape suffixes: N rows (any leading dims), D normalised width, F the GLU's inner width.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, weight_D, eps: float, out_dtype: Optional[torch.dtype]):
        # the same ops as ATen's composite _fused_rms_norm, so the forward is bit-identical to F.rms_norm
        rstd_N1 = x_ND.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        xhat_ND = x_ND * rstd_N1
        y_ND = torch.empty_like(x_ND, dtype=out_dtype or torch.result_type(xhat_ND, weight_D))
        # into a bf16 `out` ATen computes in fp32 and copies (profiled: one aten::copy_ per call); the same cost as the
        # Linear's own cast, which this replaces
        torch.mul(xhat_ND, weight_D, out=y_ND)
        # x̂ rather than x: the same memory (nothing else keeps x), and backward need not recompute it
        ctx.save_for_backward(xhat_ND, weight_D, rstd_N1)
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):
        xhat_ND, weight_D, rstd_N1 = ctx.saved_tensors
        D = xhat_ND.shape[-1]
        # dy arrives in the output's dtype (bf16 under autocast); upcast once (a mixed-dtype CPU op copies its input)
        dy_ND = dy_ND.to(xhat_ND.dtype)
        dyx_ND = torch.mul(dy_ND, xhat_ND)
        dweight_D = dyx_ND.flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        if not ctx.needs_input_grad[0]:
            return None, dweight_D, None, None
        # dx = rstd · (dy·w − x̂ · mean(dy·w·x̂)); the row dot product is a matrix-vector product
        dot_N1 = torch.matmul(dyx_ND, weight_D).unsqueeze(-1).mul_(-1.0 / D)
        dx_ND = torch.mul(dy_ND, weight_D)
        dx_ND.addcmul_(xhat_ND, dot_N1).mul_(rstd_N1)
        return dx_ND, dweight_D, None, None


def rms_norm(x_ND: torch.Tensor, weight_D: torch.Tensor, eps: float,
             out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """RMSNorm over the last dim, for x and weight of one dtype (fp32: the model's parameter and residual dtype);
    the result in `out_dtype` (default: x's)."""
    return _RMSNorm.apply(x_ND, weight_D, eps, out_dtype)


# act -> the ATen kernel of its derivative, called as f(grad_of_act_output, gate, out=...)
_ACT_BACKWARD: dict[Callable, Callable] = {
    F.silu: lambda g, gate, out: torch.ops.aten.silu_backward.grad_input(g, gate, grad_input=out),
    F.gelu: lambda g, gate, out: torch.ops.aten.gelu_backward.grad_input(g, gate, approximate="none", grad_input=out),
}


class _GLUProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up_NF2, act):
        gate_NF, up_NF = gate_up_NF2.chunk(2, dim=-1)
        act_NF = act(gate_NF)
        ctx.act = act
        ctx.save_for_backward(gate_up_NF2, act_NF)
        return act_NF * up_NF

    @staticmethod
    def backward(ctx, dh_NF):
        gate_up_NF2, act_NF = ctx.saved_tensors
        gate_NF, up_NF = gate_up_NF2.chunk(2, dim=-1)
        dgate_up_NF2 = torch.empty_like(gate_up_NF2)
        dgate_NF, dup_NF = dgate_up_NF2.chunk(2, dim=-1)
        torch.mul(dh_NF, act_NF, out=dup_NF)
        _ACT_BACKWARD[ctx.act](dh_NF * up_NF, gate_NF, dgate_NF)
        return dgate_up_NF2, None


def has_fused_glu(act) -> bool:
    """Whether `glu_product` serves `act` here. Not inside torch.compile: inductor fuses the plain ops' forward and
    backward into single loops, which this op's hand-written backward would hide from it."""
    return act in _ACT_BACKWARD and not torch.compiler.is_compiling()


def glu_product(gate_up_NF2: torch.Tensor, act: Callable) -> torch.Tensor:
    """act(gate) ⊙ up for gate_up = [gate | up] along the last dim; `act` one of `_ACT_BACKWARD` (has_fused_glu)."""
    return _GLUProduct.apply(gate_up_NF2, act)
