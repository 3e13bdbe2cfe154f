"""Rotary position embeddings (RoPE) in MiniMind/LLaMA's "rotate_half" layout, which rotates the pairs (i, i + C/2),
and the fused q|k|v + RoPE step of attention (`QKVRope`).

Shape suffixes: B batch, T time, H query heads, G key/value heads, N = H + 2G heads of the fused projection,
C head dim, X = N·C.
"""
from __future__ import annotations

import torch


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin tables (T, C) for the "rotate_half" layout of LLaMA/MiniMind, which rotates the pairs
    (i, i + C/2): out = x·cos + flip_halves(x)·sin with sin's first half negated (see `_rotate`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles_TC = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq).repeat(1, 2)
    sign_C = torch.cat([-torch.ones(head_dim // 2), torch.ones(head_dim // 2)])
    return angles_TC.cos(), angles_TC.sin() * sign_C


def _flip_halves(x_BTNC: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (x2, x1) along the head dim: one copy, where the textbook cat((-x2, x1)) is a neg and a cat."""
    return x_BTNC.unflatten(-1, (2, -1)).flip(-2).flatten(-2)


def _rotate(x_BTNC, cos_TC, sin_TC):
    """x·cos + flip(x)·sin: the same products and sums as the textbook x·cos + rotate_half(x)·sin (the sign sits in
    the table, and (-a)·b = -(a·b) exactly), so bit-identical, without the neg and cat."""
    return x_BTNC * cos_TC[:, None, :] + _flip_halves(x_BTNC) * sin_TC[:, None, :]


def _rotate_qk(x_BTNC, cos_TC, sin_TC, H: int, G: int):
    """The fused projection's queries and keys rotated with `_rotate` (textbook roundings), as head-major views."""
    return (_rotate(x_BTNC[:, :, :H], cos_TC, sin_TC).transpose(1, 2),
            _rotate(x_BTNC[:, :, H:H + G], cos_TC, sin_TC).transpose(1, 2))


def _rotate_into(x_BTNC, cos_TC, sin_TC, out_BTNC):
    """out = x·cos + flip(x)·sin as one mul and one addcmul_ per half: no flipped copy, no temporaries, and in
    bf16/fp16 one rounding fewer than `_rotate` (the product is added before rounding)."""
    h = x_BTNC.shape[-1] // 2
    first, second = slice(0, h), slice(h, None)
    for half, other in ((first, second), (second, first)):
        torch.mul(x_BTNC[..., half], cos_TC[:, None, half], out=out_BTNC[..., half]).addcmul_(
            x_BTNC[..., other], sin_TC[:, None, half])
    return out_BTNC


class QKVRope(torch.autograd.Function):
    """The fused q|k|v projection output -> rotated queries, rotated keys, values as head-major views (B, heads, T,
    C) for attention, with a backward that writes the three gradients straight into one buffer: autograd through
    split + RoPE would concatenate them twice. RoPE's backward is the transposed rotation g·cos + flip(g·sin), i.e.
    the rotation with the sin table's halves swapped.

    fp32 keeps `_rotate`'s textbook roundings (every fp32 result keeps its digits). bf16/fp16 rotate with
    `_rotate_into` straight into a head-major (B, H+G, T, C) buffer, so the folded attention's query view needs no
    copy. Measured at configs/bench/small.yaml's shapes (paired rounds against the `_rotate` path): step 0.986x
    (SwiGLU, 20 rounds), within the machine's noise; kept because it does less work and rounds once less."""

    @staticmethod
    def forward(ctx, qkv_BTX, cos_TC, sin_TC, H: int, G: int):
        x_BTNC = qkv_BTX.unflatten(-1, (H + 2 * G, -1))
        ctx.save_for_backward(cos_TC, sin_TC)
        ctx.H, ctx.G = H, G
        v_BGTC = x_BTNC[:, :, H + G:].contiguous().transpose(1, 2)
        if qkv_BTX.dtype == torch.float32:
            return (*_rotate_qk(x_BTNC, cos_TC, sin_TC, H, G), v_BGTC)
        B, T, _, C = x_BTNC.shape
        qk_BNTC = qkv_BTX.new_empty(B, H + G, T, C)
        _rotate_into(x_BTNC[:, :, :H + G], cos_TC, sin_TC, qk_BNTC.transpose(1, 2))
        return qk_BNTC[:, :H], qk_BNTC[:, H:], v_BGTC

    @staticmethod
    def backward(ctx, dq_BHTC, dk_BGTC, dv_BGTC):  # unused outputs arrive as zeros (materialize_grads)
        cos_TC, sin_TC = ctx.saved_tensors
        H, G = ctx.H, ctx.G
        B, _, T, C = dq_BHTC.shape
        dx_BTNC = dq_BHTC.new_empty(B, T, H + 2 * G, C)
        for g_BHTC, (lo, hi) in ((dq_BHTC, (0, H)), (dk_BGTC, (H, H + G))):
            g_BTNC = g_BHTC.transpose(1, 2)
            if g_BTNC.dtype == torch.float32:
                torch.add(g_BTNC * cos_TC[:, None, :], _flip_halves(g_BTNC * sin_TC[:, None, :]),
                          out=dx_BTNC[:, :, lo:hi])
            else:
                _rotate_into(g_BTNC, cos_TC, _flip_halves(sin_TC), dx_BTNC[:, :, lo:hi])
        dx_BTNC[:, :, H + G:].copy_(dv_BGTC.transpose(1, 2))
        return dx_BTNC.flatten(-2), None, None, None, None


def qkv_rope(qkv_BTX: torch.Tensor, cos_TC: torch.Tensor, sin_TC: torch.Tensor, H: int, G: int):
    """-> q_BHTC, k_BGTC, v_BGTC (head-major) from the fused projection: `QKVRope` in eager code; inside torch.compile
    the plain ops, whose forward and backward inductor fuses itself (the Function's hand-written backward would run
    as eager ops inside the compiled graph)."""
    if not torch.compiler.is_compiling():
        return QKVRope.apply(qkv_BTX, cos_TC, sin_TC, H, G)
    x_BTNC = qkv_BTX.unflatten(-1, (H + 2 * G, -1))
    return (*_rotate_qk(x_BTNC, cos_TC, sin_TC, H, G), x_BTNC[:, :, H + G:].transpose(1, 2))
