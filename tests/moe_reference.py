"""Test helpers for the MoE: a naive per-token reference and a switch to force the per-expert loop path.

Shape suffixes as in model/moe.py: N tokens, D hidden, K top_k.
"""
from __future__ import annotations

import torch

import model.moe_experts as experts_module
from model.config import FFNConfig
from model.moe import MoEFFN


def make_moe(dim: int, std: float | None = None, seed: int = 0, **ffn) -> MoEFFN:
    """An MoE layer of width `dim` from FFNConfig(type="moe", **ffn); weights ~ N(0, std²) when std is given."""
    torch.manual_seed(seed)
    moe = MoEFFN(dim, FFNConfig(type="moe", **ffn))
    if std is not None:
        with torch.no_grad():
            for p in moe.parameters():
                p.normal_(0, std)
    return moe


def expert_forward(moe: MoEFFN, e: int, x_D: torch.Tensor) -> torch.Tensor:
    """Routed expert e on any input, written out plainly on the stacked weights (differentiable)."""
    ex = moe.experts
    h = x_D @ ex.w_up[e].t()
    if ex.kind == "glu":
        gate, up = h.chunk(2, dim=-1)
        h = ex.act(gate) * up
    else:
        h = ex.act(h)
    return h @ ex.w_down[e].t()


def naive_moe(moe: MoEFFN, x_ND: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert (no sorting, no grouping, no capacity limit; differentiable). A null expert
    (index >= n_experts) adds nothing."""
    _, _, expert_NK, weight_NK = moe.router(x_ND)
    rows = []
    for n in range(x_ND.shape[0]):
        out_D = torch.zeros_like(x_ND[n])
        for k in range(moe.top_k):
            e = int(expert_NK[n, k])
            if e < moe.n_experts:
                out_D = out_D + weight_NK[n, k].to(x_ND.dtype) * expert_forward(moe, e, x_ND[n])
        if moe.shared_experts is not None:
            out_D = out_D + moe.shared_experts(x_ND[n])
        rows.append(out_D)
    return torch.stack(rows)


@torch.no_grad()
def reference_forward(moe: MoEFFN, x_BTD: torch.Tensor) -> torch.Tensor:
    """naive_moe on any (..., D) input, without gradients."""
    return naive_moe(moe, x_BTD.reshape(-1, x_BTD.shape[-1])).view_as(x_BTD)


def use_path(monkeypatch, path: str) -> None:
    """Force the experts' dispatch path for the rest of the test: "loop" hides grouped_mm (as on a torch without
    it), "grouped" keeps the default, which picks grouped_mm wherever it works (the caller checks grouped_mm_ok)."""
    assert path in ("grouped", "loop")
    if path == "loop":
        monkeypatch.setattr(experts_module, "_GROUPED_MM", None)
    else:
        monkeypatch.setattr(experts_module, "_GROUPED_MM", torch.nn.functional.grouped_mm)
