"""The FFN activations: plain functions, trainable activations (modules with learned scalars) and gate-and-up GLU
functions. model/ffn.py builds them into the blocks; the names are `model.ffn.activation` values.

- `ACTIVATIONS`: name -> elementwise function with no state. Every block that takes an activation accepts these (the
  MoE experts too).
- `TRAINABLE_ACTIVATIONS`: name -> nn.Module class holding a few learned scalars (`n_params` of them, a class
  attribute, so width rules can count them without building anything). The dense and GLU blocks build one instance
  per layer through `make_activation`; the scalars are ordinary parameters: counted by param_counts, trained, saved,
  and — being 1-d — in AdamW's no-decay group (train/optim.py puts p.ndim < 2 there). Not offered to the MoE experts,
  which would need one set per expert.
- `GLU_ACTIVATIONS`: name -> f(gate, up) for GLU variants that change the up half too (gpt-oss); GLU block only.
- `NO_HF_EQUIVALENT`: name -> why transformers has no identical activation (the blocks' `hf_export` refuses with it).

Shape suffixes: F the FFN's inner width, `...` any leading dims.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU (So et al. 2021, "Primer")."""
    return F.relu(x).square()


def leaky_relu2(x: torch.Tensor) -> torch.Tensor:
    """LeakyReLU(0.5)²: relu² that keeps a gradient (and a positive output) for negative inputs. Source: the
    openai/parameter-golf speedrun records, tried in karpathy/nanochat's dev/LOG.md (2026-03-24, "slightly better
    per-step quality, but slightly slower")."""
    return F.leaky_relu(x, 0.5).square()


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "relu2": relu2,
    "leaky_relu2": leaky_relu2,
    "sigmoid": torch.sigmoid,
    "identity": identity,  # dense: a purely linear FFN; glu: the Bilinear variant
}
# sigmoid is a gate: as the only non-linearity of an ungated FFN it is refused (the GLU family takes every activation)
DENSE_ACTIVATIONS = tuple(a for a in ACTIVATIONS if a != "sigmoid")


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


def _indicator(u: torch.Tensor) -> torch.Tensor:
    """1 where u > 0, else 0, in u's dtype. Arithmetic, not a bool mask: torch.where / masked_fill on a bool mask
    measured ~10x slower than one elementwise op on CPU (2048×512 fp32, one thread)."""
    return torch.sign(F.relu(u))


# The trainable activations compute their backward by hand (autograd.Function), saving little and recomputing the
# cheap parts: each is a chain of ~10 elementwise passes forward (GELU: one), memory-bound on CPU. Composed from torch
# ops under autograd, xIELU and PolyNorm made a training step of base.yaml's d=128 model ~2.0x a GELU step (CPU, one
# thread, interleaved medians); with these ~1.6x (PolyReLU 1.6x -> 1.2x). Each has a float64 gradcheck in
# tests/test_activations.py.

class _XIELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha_p, alpha_n, beta: float, eps: float):
        p = F.relu(x)
        n = x - p  # min(x, 0), exactly
        q = (torch.expm1(n.clamp(max=eps)) - n) * (1 - _indicator(p))  # expm1(min(x, ε)) − x where x ≤ 0, else 0
        ctx.save_for_backward(x, q, alpha_p, alpha_n)
        ctx.beta, ctx.eps = beta, eps
        return torch.addcmul(torch.addcmul(beta * x, p * p, alpha_p), q, alpha_n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, q, alpha_p, alpha_n = ctx.saved_tensors
        p = F.relu(x)
        n = x - p
        negative = 1 - _indicator(p)  # x ≤ 0
        # d/dx: x > 0: 2α_p·x + β;  x ≤ 0: α_n·(e^x·[x < ε] − 1) + β
        d_negative = (torch.exp(n.clamp(max=ctx.eps)) * _indicator(ctx.eps - n) - 1) * negative
        grad_x = g * torch.addcmul(torch.addcmul(torch.full_like(x, ctx.beta), p, 2 * alpha_p), d_negative, alpha_n)
        grad_p = (g * p * p).sum().reshape(alpha_p.shape)
        grad_n = (g * q).sum().reshape(alpha_n.shape)
        return grad_x, grad_p, grad_n, None, None


class XIELU(nn.Module):
    """xIELU (Huang & Schlag 2024, "Deriving Activation Functions Using Integration", arXiv 2411.13010; the FFN
    activation of the Apertus models), with two learned scalars per layer:

        x > 0:  α_p·x² + β·x
        x ≤ 0:  α_n·(expm1(min(x, ε)) − x) + β·x

    α_p = softplus(a_p) and α_n = β + softplus(a_n) (so α_p > 0, α_n > β), β = 0.5, ε = −1e-6; initialised to
    α_p = α_n = 0.8. Source used: transformers' XIELUActivation (its Python path, the Apertus implementation,
    transformers 5.24), which follows the paper; a_p and a_n are stored with shape (1,) as there, so the state dict
    keys and shapes are Apertus's. The positive side is a learned ReLU² plus β·x; the negative side is ≈ α_n·x²/2 + β·x
    near 0 (the slope is β on both sides of 0) and tends to the line β·x − α_n·(x + 1) for x → −∞."""

    n_params = 2

    def __init__(self, alpha_p_init: float = 0.8, alpha_n_init: float = 0.8, beta: float = 0.5, eps: float = -1e-6):
        super().__init__()
        self.beta, self.eps = beta, eps
        self.alpha_p = nn.Parameter(torch.tensor([_inverse_softplus(alpha_p_init)]))
        self.alpha_n = nn.Parameter(torch.tensor([_inverse_softplus(alpha_n_init - beta)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the scalars in the activations' dtype: a (1,)-shaped fp32 tensor would promote a bf16 activation to fp32
        alpha_p = F.softplus(self.alpha_p).to(x.dtype)
        alpha_n = (self.beta + F.softplus(self.alpha_n)).to(x.dtype)
        return _XIELUFunction.apply(x, alpha_p, alpha_n, self.beta, self.eps)


class _PolyReLUFunction(torch.autograd.Function):
    """a_0 + r·(a_1 + r·(a_2 + r·a_3)), r = ReLU(x) (Horner); w = (a_3, a_2, a_1), b = (a_0,)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        r = F.relu(x)
        return torch.addcmul(b, r, torch.addcmul(w[2], r, torch.addcmul(w[1], r, w[0])))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        r = F.relu(x)
        slope = torch.addcmul(w[2], r, torch.addcmul(2 * w[1], r, 3 * w[0]))  # a_1 + 2a_2·r + 3a_3·r², for x > 0
        grad_x = g * slope * _indicator(r)
        g_r = g * r
        g_r2 = g_r * r
        grad_w = torch.stack([(g_r2 * r).sum(), g_r2.sum(), g_r.sum()])
        return grad_x, grad_w, g.sum().reshape(1)


class PolyReLU(nn.Module):
    """PolyReLU of order 3 (Zhuo et al. 2024, "Polynomial Composition Activations", PolyCom, arXiv 2411.03884):
    Σ_{i=0..3} a_i·ReLU(x)^i, four learned scalars per layer. Initialisation as the paper's code (BryceZhuo/PolyCom,
    dense_model/megatron_patch/model/llama2/transformer.py): a_1 = a_2 = a_3 = 1/3, a_0 = 0; stored like there as
    `weight` = (a_3, a_2, a_1) and `bias` = (a_0,)."""

    n_params = 4

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.full((3,), 1.0 / 3))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _PolyReLUFunction.apply(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def _inv_rms(u_F: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(u²) + eps) over the last dim, computed in at least fp32 (x⁶ overflows fp16); shape (..., 1)."""
    u_F = u_F.to(torch.promote_types(u_F.dtype, torch.float32))
    return torch.rsqrt((u_F * u_F).mean(-1, keepdim=True) + eps)


class _PolyNormFunction(torch.autograd.Function):
    """Σ_i w_i·y_i + b with y_i = u_i·s_i, u_i = x^i, s_i = 1/rms(u_i) per row; w = (a_3, a_2, a_1), b = (a_0,).
    Backward of an RMS normalisation: dL/du = s·(dL/dy − y·mean(dL/dy · y)) over the row."""

    @staticmethod
    def forward(ctx, x_F, w, b, eps: float):
        x2_F = x_F * x_F
        x3_F = x2_F * x_F
        s1, s2, s3 = (_inv_rms(u, eps).to(x_F.dtype) for u in (x_F, x2_F, x3_F))
        ctx.save_for_backward(x_F, s1, s2, s3, w)
        return torch.addcmul(torch.addcmul(torch.addcmul(b, x_F, s1 * w[2]), x2_F, s2 * w[1]), x3_F, s3 * w[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_F):
        x_F, s1, s2, s3, w = ctx.saved_tensors
        x2_F = x_F * x_F
        grad_x = torch.zeros_like(x_F)
        grad_w = []
        # i = 3, 2, 1: u_i = x^i, du_i/dx = i·x^(i-1), weight w[3 - i]
        for i, u_F, s, du_F in ((3, x2_F * x_F, s3, 3 * x2_F), (2, x2_F, s2, 2 * x_F), (1, x_F, s1, None)):
            y_F = u_F * s
            gy_F = g_F * y_F
            row = gy_F.sum(-1, keepdim=True)
            grad_w.append(row.sum())
            d_u = (g_F - y_F * (row / x_F.shape[-1])) * (s * w[3 - i])  # dL/du_i
            grad_x += d_u * du_F if du_F is not None else d_u
        return grad_x, torch.stack(grad_w), g_F.sum().reshape(1), None


class PolyNorm(nn.Module):
    """PolyNorm of order 3 (PolyCom, arXiv 2411.03884): Σ_{i=1..3} a_i·norm(x^i) + a_0, norm(u) = u / sqrt(mean(u²)
    + 1e-6) over the last (the FFN's inner) dimension, i.e. RMS normalisation without a gain. Four learned scalars per
    layer, initialised as the paper's code (BryceZhuo/PolyCom README and megatron patch): a_i = 1/3, a_0 = 0; stored
    like there as `weight` = (a_3, a_2, a_1) and `bias` = (a_0,). The row statistics are computed in at least fp32."""

    n_params = 4
    eps = 1e-6

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.full((3,), 1.0 / 3))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x_F: torch.Tensor) -> torch.Tensor:
        return _PolyNormFunction.apply(x_F, self.weight.to(x_F.dtype), self.bias.to(x_F.dtype), self.eps)


TRAINABLE_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "xielu": XIELU,
    "polyrelu": PolyReLU,
    "polynorm": PolyNorm,
}


def clamped_swiglu(gate_F: torch.Tensor, up_F: torch.Tensor, limit: float = 7.0, alpha: float = 1.702) -> torch.Tensor:
    """gpt-oss's GLU (OpenAI 2025; transformers' GptOssExperts._apply_gate, read in transformers 5.24): the gate is
    clamped to at most `limit`, the up half to [−limit, limit], gate·σ(α·gate) with α = 1.702 (the sigmoid
    approximation of GELU), and the up half enters as (up + 1). Same op order as there. gpt-oss interleaves gate and
    up columns in its fused projection (gate = [..., ::2]); ours is chunked (gate = first half): the same parameters
    in another layout. gpt-oss also has biases, which this project's blocks never have."""
    gate_F = gate_F.clamp(max=limit)
    up_F = up_F.clamp(min=-limit, max=limit)
    glu_F = gate_F * torch.sigmoid(gate_F * alpha)
    return (up_F + 1) * glu_F


GLU_ACTIVATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "swiglu_oss": clamped_swiglu,
}

NO_HF_EQUIVALENT = {
    "leaky_relu2": "transformers has no squared leaky ReLU activation",
    "xielu": ("transformers' only xIELU model, Apertus, always applies q/k RMSNorm in attention, which this model "
              "does not have, and LlamaMLP's xIELU would keep its scalars in bf16"),
    "polyrelu": "transformers has no PolyReLU activation",
    "polynorm": "transformers has no PolyNorm activation",
    "swiglu_oss": ("transformers has the clamped SwiGLU only inside GptOssExperts (a biased MoE with attention "
                   "sinks), not as a dense MLP activation"),
}


def activation_params(name: str) -> int:
    """Learned scalars one instance of activation `name` holds (0 for a plain function)."""
    cls = TRAINABLE_ACTIVATIONS.get(name)
    return cls.n_params if cls is not None else 0


def make_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation `name` for one block: a fresh module (its own learned scalars) for a trainable activation, the
    shared function otherwise."""
    cls = TRAINABLE_ACTIVATIONS.get(name)
    return cls() if cls is not None else ACTIVATIONS[name]
