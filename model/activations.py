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
        positive = alpha_p * x * x + self.beta * x
        negative = (torch.expm1(torch.clamp(x, max=self.eps)) - x) * alpha_n + self.beta * x
        return torch.where(x > 0, positive, negative)


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
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        r = F.relu(x)
        r2 = r * r
        return w[0] * (r2 * r) + w[1] * r2 + w[2] * r + b


class PolyNorm(nn.Module):
    """PolyNorm of order 3 (PolyCom, arXiv 2411.03884): Σ_{i=1..3} a_i·norm(x^i) + a_0, norm(u) = u / sqrt(mean(u²)
    + 1e-6) over the last (the FFN's inner) dimension, i.e. RMS normalisation without a gain. Four learned scalars per
    layer, initialised as the paper's code (BryceZhuo/PolyCom README and megatron patch): a_i = 1/3, a_0 = 0; stored
    like there as `weight` = (a_3, a_2, a_1) and `bias` = (a_0,). F.rms_norm computes the statistics in fp32 for
    half-precision inputs (x⁶ would overflow fp16)."""

    n_params = 4
    eps = 1e-6

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.full((3,), 1.0 / 3))
        self.bias = nn.Parameter(torch.zeros(1))

    def _norm(self, u_F: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(u_F, (u_F.shape[-1],), None, self.eps)

    def forward(self, x_F: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.to(x_F.dtype), self.bias.to(x_F.dtype)
        x2_F = x_F * x_F
        return w[0] * self._norm(x2_F * x_F) + w[1] * self._norm(x2_F) + w[2] * self._norm(x_F) + b


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
