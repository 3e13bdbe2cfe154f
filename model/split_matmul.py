"""x @ W.T (the nn.Linear layout) as a few narrower matmuls into one output, for bf16/fp16 matmuls on CPU.

Why (issue 18): those run on oneDNN, whose brgemm matmul with the weight in nn.Linear's (out, in) layout is ~1.5x
slower than the same product with the weight stored (in, out) for some output widths N, and equally fast for the rest.
Measured on a 2-core Xeon with AMX, torch 2.13.0 (`x @ w.T` vs `x @ w.T.contiguous()`, K = 512, interleaved):
at 4,096 rows only N = 2,304 and 2,816 (MiniMind2-small's fused gate|up, 2·1,408); at 655-1,056 rows (the loss's row
chunks, an MoE expert's group) most N above 1,024 that are not powers of two, e.g. the 6,400-wide LM head. Narrower
blocks of widths that are fast, each written into its own columns of one output, avoid it: the fused gate|up as its
two halves (1.3-1.8x faster forward matmul; SwiGLU training step 0.92-0.95x), the LM head's chunks in 1,024-wide
blocks (1.3-1.4x). Storing the weight transposed instead would cost a transposing copy per step (~4 ms for a
2,816x512 bf16 weight against 0.4 ms for the plain cast), more than it saves. With oneDNN capped below AMX
(ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16) both layouts ran alike.

fp32 CPU matmuls (MKL), every other device and torch.compile keep the single matmul (`split_applies`), and so do
the MoE experts' grouped matmuls: at their shapes (~1,056 rows x 1,408) both layouts ran alike and halves were slower.

Shape suffixes: M rows, K input width, N output width.
"""
from __future__ import annotations

from typing import Sequence

import torch

LM_HEAD_BLOCK = 1024  # column block of the loss's logits: a power of two (fast at every row count measured)


def split_applies(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a matmul of x in `dtype` (the compute dtype) should be split: bf16/fp16 on CPU, eager only (inside
    torch.compile inductor chooses its own matmul calls)."""
    return (x.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
            and not torch.compiler.is_compiling())


def column_blocks(n: int, block: int) -> tuple[int, ...]:
    """n split into widths of `block` and the remainder."""
    return tuple(min(block, n - start) for start in range(0, n, block))


def mm_columns(x_MK: torch.Tensor, w_NK: torch.Tensor, widths: Sequence[int], out_MN: torch.Tensor) -> torch.Tensor:
    """out = x @ w.T, one matmul per block of output columns (each writes its columns of `out` in place)."""
    start = 0
    for n in widths:
        torch.mm(x_MK, w_NK[start:start + n].T, out=out_MN[:, start:start + n])
        start += n
    return out_MN


class _SplitLinear(torch.autograd.Function):
    """F.linear(x, weight) in `dtype` with the forward split into column blocks; the backward is F.linear's under
    autocast: dx = dy @ W and dW = dy.T @ x in `dtype`, then cast to the inputs' dtypes."""

    @staticmethod
    def forward(ctx, x_MK, weight_NK, widths, dtype):
        x_c = x_MK.reshape(-1, x_MK.shape[-1]).to(dtype)
        w_c = weight_NK.to(dtype)
        y_MN = mm_columns(x_c, w_c, widths, x_c.new_empty(x_c.shape[0], w_c.shape[0]))
        ctx.save_for_backward(x_c, w_c)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x_MK.shape, x_MK.dtype, weight_NK.dtype
        return y_MN.view(*x_MK.shape[:-1], w_c.shape[0])

    @staticmethod
    def backward(ctx, dy_MN):
        x_c, w_c = ctx.saved_tensors
        dy_c = dy_MN.reshape(-1, dy_MN.shape[-1]).to(w_c.dtype)
        dx = torch.mm(dy_c, w_c).view(ctx.x_shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dw = torch.mm(dy_c.T, x_c).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def split_linear(x: torch.Tensor, weight: torch.Tensor, widths: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """F.linear(x, weight) computed in `dtype`, its output columns in blocks of `widths` (summing to weight's rows).
    Call it where `split_applies`; elsewhere F.linear is the same product."""
    assert sum(widths) == weight.shape[0], (widths, weight.shape)
    with torch.autocast(x.device.type, enabled=False):  # the dtypes are explicit; mm's out= is no autocast op
        return _SplitLinear.apply(x, weight, tuple(widths), dtype)
