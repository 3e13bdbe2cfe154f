"""Load balancing for the MoE block (model/moe.py): the balancing losses, the aux-loss-free bias step, and the routing
health counters behind `MoEFFN.health()`.

Shape suffixes: N tokens (B·T), B sequences, E router outputs (routed experts, then null experts), K top_k.

Every balancing loss has the Switch/GShard form α·E·Σ_i f_i·P_i, which equals α under uniform routing: f_i is the
fraction of routed slots that chose output i (a token counts K times), P_i the mean routing probability of i (sigmoid
scores normalised to sum 1 per token). The kinds differ only in the tokens f and P are taken over:
- `aux_loss`: this process's micro-batch (Switch Transformer, GShard).
- `seq_aux_loss`: each sequence on its own, the loss averaged over the sequences (DeepSeek-V3's complementary
  sequence-wise balance loss, used there with α ≈ 1e-4 beside the selection bias).
- `global_aux_loss`: f from the global batch (Qwen, "Demons in the Detail", arXiv 2501.11873; Megatron-core's
  `global_aux_loss`): the routed-slot counts are all-reduced over the data-parallel ranks in every micro-batch and
  summed over the micro-batches of the optimizer step so far (a buffer reset by `after_optimizer_step`). So micro-batch
  m of a step uses the counts of micro-batches 0..m of every rank; P stays this process's micro-batch (the gradient
  flows through P only, and DDP's gradient average makes it the mean over ranks). What is exact: a run on W processes
  equals the one process whose micro-batch m is the union of the W ranks' micro-batches m (micro_batch_size·W,
  grad_accum/W), and with one micro-batch per rank and step f is the whole optimizer step's batch. With several
  micro-batches per rank the early ones see only part of the step: the routing of later micro-batches does not exist
  yet when their backward runs (Qwen and Megatron accept the same running sum).
Null experts (AdaMoE): their f entries are replaced by the null group's mean, so the loss steers how many slots go
to null experts in total, not which one (they are interchangeable; AdaMoE's reference code averages them the same way).
The router z-loss (ST-MoE) c_z·mean(lse(logits)²) is added whenever z_loss_coef > 0, whatever the balancing kind.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

LOSS_KINDS = ("aux_loss", "seq_aux_loss", "global_aux_loss")  # model.ffn.balancing values that add a loss


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_nulls(x_E: torch.Tensor, n_real: int) -> torch.Tensor:
    """x with the null experts' entries (index >= n_real, last dim) replaced by their mean; x itself without nulls."""
    if x_E.shape[-1] == n_real:
        return x_E
    null = x_E[..., n_real:]
    return torch.cat([x_E[..., :n_real], null.mean(dim=-1, keepdim=True).expand_as(null)], dim=-1)


def balance_losses(moe, logits_NE: torch.Tensor, probs_NE: torch.Tensor, expert_NK: torch.Tensor,
                   counts_E: torch.Tensor, n_seqs: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(coefficient-weighted sum, {kind: value}) of `moe`'s balancing loss and z-loss for one forward."""
    zero = logits_NE.new_zeros(())
    aux, z = zero, zero
    kind = moe.balancing if moe.balancing in LOSS_KINDS else "aux_loss"  # none / aux_free: aux_loss = 0, as ever
    E, K, n_tokens, coef = probs_NE.shape[-1], moe.top_k, probs_NE.shape[0], moe.aux_loss_coef
    if moe.balancing == "aux_loss" and coef > 0:
        f_E = group_nulls(counts_E.to(probs_NE.dtype) / (n_tokens * K), moe.n_experts)
        aux = coef * E * torch.sum(f_E * probs_NE.mean(dim=0))
    elif moe.balancing == "seq_aux_loss" and coef > 0:
        B = n_seqs
        counts_BE = torch.zeros(B, E, dtype=torch.long, device=counts_E.device).scatter_add_(
            1, expert_NK.reshape(B, -1), torch.ones_like(expert_NK).reshape(B, -1))
        f_BE = group_nulls(counts_BE.to(probs_NE.dtype) / (n_tokens // B * K), moe.n_experts)
        aux = coef * E * torch.sum(f_BE * probs_NE.view(B, -1, E).mean(dim=1), dim=-1).mean()
    elif moe.balancing == "global_aux_loss" and coef > 0:
        running_E = counts_E
        if moe.training:  # the step's running, all-rank counts; evaluation stays local (ranks see different blocks)
            step_E = counts_E.clone()
            if distributed():
                dist.all_reduce(step_E)
            moe.global_counts += step_E
            running_E = moe.global_counts
        f_E = group_nulls(running_E.to(probs_NE.dtype) / running_E.sum().to(probs_NE.dtype), moe.n_experts)
        aux = coef * E * torch.sum(f_E * probs_NE.mean(dim=0))
    if moe.z_loss_coef > 0:
        z = moe.z_loss_coef * torch.logsumexp(logits_NE, dim=-1).square().mean()
    return aux + z, {kind: aux, "z_loss": z}


@torch.no_grad()
def bias_step(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float, n_real: int) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): bias += γ·sign(mean load − load), null experts as one group."""
    load_E = group_nulls(counts_E.float(), n_real)
    bias_E += rate * torch.sign(load_E.mean() - load_E)


class RoutingStats(nn.Module):
    """Routing health since the last reset (the trainer's logging window), kept as tensors: no host sync in forward.

    - max_vio: mean over optimizer steps of MaxVio = max load / mean load − 1 over the routed experts, from the step's
      global-batch counts (all ranks; "MaxVio_batch" of Wang et al. 2024, arXiv 2408.15664). 0 = perfectly balanced.
    - drop_frac: routed-expert slots dropped by capacity_factor / routed-expert slots (null-expert slots not counted).
    - router_entropy: mean over tokens of the entropy (nats) of the routing distribution over all router outputs;
      log(E) = uniform, 0 = one-hot.
    - bias_abs: mean |selection bias| (aux-loss-free balancing; 0 otherwise).
    - active_ffn_params: FFN parameters one token actually used, on average: router + shared experts + one routed
      expert's parameters per slot that ran (null-expert and dropped slots cost nothing).
    Under DDP the trainer averages each value over ranks: max_vio and bias_abs are the same on every rank, the others
    are per-rank means over equal token counts, so their average is the global mean.
    """

    NAMES = ("max_vio", "drop_frac", "router_entropy", "bias_abs", "active_ffn_params")

    def __init__(self):
        super().__init__()
        for name, dtype in (("tokens", torch.long), ("real_slots", torch.long), ("computed_slots", torch.long),
                            ("steps", torch.long), ("entropy_sum", torch.float32), ("max_vio_sum", torch.float32)):
            self.register_buffer(name, torch.zeros((), dtype=dtype), persistent=False)

    @torch.no_grad()
    def record_forward(self, probs_NE: torch.Tensor, real_slots: torch.Tensor, computed_slots: torch.Tensor) -> None:
        self.tokens += probs_NE.shape[0]
        self.entropy_sum += torch.special.entr(probs_NE.detach().float()).sum()
        self.real_slots += real_slots
        self.computed_slots += computed_slots

    @torch.no_grad()
    def record_step(self, load_E: torch.Tensor) -> None:
        """One optimizer step's routed-expert load (global counts); a step that routed nothing is not counted."""
        load_E = load_E.float()
        routed = load_E.sum() > 0  # a tensor, not a bool: no host sync per step and layer
        self.max_vio_sum += torch.where(routed, load_E.max() / load_E.mean().clamp_min(1e-30) - 1, 0.0)
        self.steps += routed.long()

    def summary(self, bias_E: torch.Tensor, fixed_params: int, per_expert_params: int) -> dict[str, float]:
        tokens, real, computed, steps = (int(t) for t in (self.tokens, self.real_slots, self.computed_slots,
                                                            self.steps))
        return {"max_vio": float(self.max_vio_sum) / steps if steps else 0.0,
                "drop_frac": (real - computed) / real if real else 0.0,
                "router_entropy": float(self.entropy_sum) / tokens if tokens else 0.0,
                "bias_abs": float(bias_E.abs().mean()),
                "active_ffn_params": fixed_params + per_expert_params * computed / tokens if tokens else 0.0}

    def reset(self) -> None:
        for buf in self.buffers():
            buf.zero_()
