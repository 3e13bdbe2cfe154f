"""LM-head + cross-entropy in row chunks, so the (tokens × vocab) logits never exist at once.

Shape suffixes: N tokens (B·T flattened), D hidden, V vocab, C rows in one chunk.

Why: the plain path (`F.cross_entropy(lm_head(h).float(), y)`) materialises bf16 logits, an fp32 copy, the
log-softmax, its gradient and a bf16 copy of that: six N×V buffers, 0.5 GB per step for MiniMind2-small (4,096 tokens
× 6,400 vocab). Fresh buffers that large come straight from the OS, so besides the memory traffic every step pays page
faults for them. Here each chunk of C rows computes its logits, loss and logit gradient (softmax − one-hot) at once,
while they are in cache, and keeps only the gradients for h (N×D) and the weight (V×D) for backward. The idea is Liger
Kernel's fused linear cross-entropy, written in plain PyTorch.

Numerics follow nn.Linear under autocast: h and W are cast to the compute dtype, the logits come out of the matmul
in that dtype and are upcast to fp32 for the log-softmax, the logit gradient is cast back for the two gradient
matmuls. The one difference: the weight gradient is the fp32 sum of per-chunk matmuls instead of one matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.precision import compute_dtype
from model.split_matmul import LM_HEAD_BLOCK, column_blocks, mm_columns, split_applies

IGNORE_INDEX = -100
CHUNK_LOGITS = 1 << 22  # logits per chunk (16 MB in fp32; 655 rows at vocab 6,400): 2^21..2^23 measured alike


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_LOGITS // vocab_size)


def _chunk_nll(logp_CV: torch.Tensor, target_C: torch.Tensor):
    """-> (summed nll of the valid rows, valid_C, target_C with ignored rows pointed at class 0)."""
    valid_C = target_C != IGNORE_INDEX
    safe_C = target_C.masked_fill(~valid_C, 0)
    nll_C = -logp_CV.gather(1, safe_C[:, None])[:, 0]
    return nll_C.masked_fill(~valid_C, 0).sum(), valid_C, safe_C


def _chunked(h_ND, w_VD, target_N, rows: int, dtype: torch.dtype, with_grad: bool):
    """-> (mean nll, 1/n_valid, and with_grad: d(sum of nll)/dh in `dtype` and d(sum of nll)/dW in fp32)."""
    h_ND_c, w_VD_c = h_ND.to(dtype), w_VD.to(dtype)
    inv_valid = 1.0 / (target_N != IGNORE_INDEX).sum().to(torch.float32)  # all ignored: nan, as F.cross_entropy
    loss_sum = torch.zeros((), dtype=torch.float32, device=h_ND.device)
    grad_h_ND = torch.empty_like(h_ND_c) if with_grad else None
    grad_w_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if with_grad else None
    # every per-chunk result goes into one of these buffers: no allocation (and no page faults) inside the loop
    C = min(rows, h_ND.shape[0])
    logits_buf = torch.empty(C, w_VD.shape[0], dtype=dtype, device=h_ND.device)  # then the logit gradient
    logp_buf = torch.empty(C, w_VD.shape[0], dtype=torch.float32, device=h_ND.device)
    grad_w_buf = torch.empty(w_VD.shape, dtype=dtype, device=w_VD.device) if with_grad else None
    # pretraining batches rarely ignore rows; asking costs a host sync, cheap on CPU but a stall on GPUs
    masked = h_ND.device.type != "cpu" or bool((target_N == IGNORE_INDEX).any())
    # the logits in column blocks where that is faster (model/split_matmul.py), else one matmul
    V = w_VD.shape[0]
    widths = column_blocks(V, LM_HEAD_BLOCK) if split_applies(h_ND, dtype) else (V,)
    for start in range(0, h_ND.shape[0], rows):
        h_CD, target_C = h_ND_c[start:start + rows], target_N[start:start + rows]
        c = h_CD.shape[0]
        logits_CV = mm_columns(h_CD, w_VD_c, widths, logits_buf[:c])
        logp_CV = torch.log_softmax(logits_CV, dim=-1, dtype=torch.float32, out=logp_buf[:c])
        chunk_sum, valid_C, safe_C = _chunk_nll(logp_CV, target_C)
        loss_sum += chunk_sum
        if not with_grad:
            continue
        # d(sum of nll)/d logits = softmax − one_hot on valid rows, 0 on ignored ones. The 1/n_valid of the mean
        # is applied to the two (smaller) gradients in backward, together with grad_loss.
        grad_CV = logp_CV.exp_().scatter_add_(1, safe_C[:, None], torch.full_like(logp_CV[:, :1], -1.0))
        if masked:
            grad_CV_c = torch.mul(grad_CV, valid_C[:, None], out=logits_buf[:c])  # mask + cast in one pass
        else:
            grad_CV_c = logits_buf[:c].copy_(grad_CV)  # the cast alone: no row is ignored
        torch.mm(grad_CV_c, w_VD_c, out=grad_h_ND[start:start + rows])
        grad_w_VD += torch.mm(grad_CV_c.T, h_CD, out=grad_w_buf)  # fp32 sum of the chunks' bf16 products
    return loss_sum * inv_valid, inv_valid, grad_h_ND, grad_w_VD


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, target_N, rows, dtype):
        loss, inv_valid, grad_h_ND, grad_w_VD = _chunked(h_ND, w_VD, target_N, rows, dtype, with_grad=True)
        ctx.save_for_backward(grad_h_ND, grad_w_VD, inv_valid)
        ctx.h_dtype, ctx.w_dtype = h_ND.dtype, w_VD.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h_ND, grad_w_VD, inv_valid = ctx.saved_tensors
        scale = grad_loss * inv_valid
        grad_h = (grad_h_ND.to(ctx.h_dtype) * scale) if ctx.needs_input_grad[0] else None
        grad_w = (grad_w_VD * scale).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
    """mean over non-ignored rows of cross_entropy(h_ND @ w_VD.T, target_N), fp32, without N×V buffers."""
    dtype, rows = compute_dtype(h_ND), chunk_rows(w_VD.shape[0])
    if h_ND.shape[0] <= rows:  # one chunk: nothing to save, and the plain path is faster (4% on configs/tiny.yaml)
        return reference_cross_entropy(h_ND, w_VD, target_N)
    with torch.autocast(h_ND.device.type, enabled=False):
        if torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad):
            return _ChunkedLinearCrossEntropy.apply(h_ND, w_VD, target_N, rows, dtype)
        with torch.no_grad():  # evaluation: the loss only
            return _chunked(h_ND, w_VD, target_N, rows, dtype, with_grad=False)[0]


def reference_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
    """The plain path, for tests and for comparison."""
    return F.cross_entropy(F.linear(h_ND, w_VD).float(), target_N, ignore_index=IGNORE_INDEX)
