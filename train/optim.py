"""Optimizers (AdamW, or Muon for hidden matrices + AdamW for the rest), the learning-rate schedule and the step
budget."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from train.errors import ConfigError

# torch.optim.Muon exists from torch 2.9; requirements admit >= 2.6, where only train.optimizer=muon is refused
_TorchMuon = getattr(torch.optim, "Muon", torch.optim.Optimizer)
OptimizerLike = Any  # torch.optim.AdamW (train.optimizer=adamw) or CombinedOptimizer (muon): the same duck type

# Module names whose matrices stay on AdamW under Muon: a router's (n_experts, d) gate is a small classifier head
# whose logits set the routing, not a hidden transform; orthogonalising it would flatten its singular values.
ADAMW_MODULES = frozenset({"router"})


def build_optimizer(model: torch.nn.Module, t) -> OptimizerLike:
    """train.optimizer=adamw: AdamW on everything (adamw_groups). muon: torch's Muon on the hidden matrices
    (muon_params) and AdamW on the rest, one CombinedOptimizer."""
    if t.optimizer == "adamw":
        return _adamw(adamw_groups(model.parameters(), model, t), t)
    if _TorchMuon is torch.optim.Optimizer:
        raise ConfigError(f"train.optimizer=muon needs torch >= 2.9 (torch.optim.Muon); this is torch "
                          f"{torch.__version__}")
    # adjust_lr_fn="match_rms_adamw" (Moonshot, "Muon is Scalable for LLM Training"): each matrix's step is scaled
    # by 0.2*sqrt(max(out, in)), so its update RMS is ~0.2*lr like AdamW's. Then Muon shares AdamW's lr, schedule and
    # weight decay (train.muon_lr null), a sweep tuning train.lr tunes both, and matrices of different shapes get
    # the same RMS step. Keller Jordan's "original" rule (sqrt(max(1, out/in))) would need its own lr near 0.02.
    # Weight decay is decoupled like AdamW's: w *= 1 - lr*wd, matrices only (these are all matrices).
    matrices = muon_params(model)
    taken = {id(p) for p in matrices}
    muon = MuonStacks(matrices, lr=t.lr * muon_lr_scale(t), weight_decay=t.weight_decay, momentum=t.muon_momentum,
                      nesterov=True, adjust_lr_fn="match_rms_adamw")
    for group in muon.param_groups:
        group["lr_scale"] = muon_lr_scale(t)  # set_lr: Muon's lr = its peak x the shared schedule's factor
    rest = [p for p in model.parameters() if id(p) not in taken]
    return CombinedOptimizer(muon, _adamw(adamw_groups(rest, model, t), t))


def adamw_groups(params, model: torch.nn.Module, t) -> list[dict]:
    """Decoupled weight decay on matrices only: norms, biases and embeddings (incl. a tied LM head) get none unless
    train.decay_embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in params:
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or (id(p) in embeddings and not t.decay_embeddings)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw(groups: list[dict], t) -> torch.optim.AdamW:
    """The fused implementation (one pass over each parameter's memory, CPU and CUDA): on 2 CPU cores it took the
    optimizer step of a 26M-parameter model from ~535 to ~190 ms (median, measured interleaved in one process;
    issue 6); torch's default on CPU is a for-loop of ~10 elementwise ops per parameter, with temporaries."""
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused or None)


def muon_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The hidden matrices Muon trains: every trainable 2-D parameter (attention qkv/o, FFN up/gate_up/down, any
    registered block's matrices) and 3-D expert stack (E, out, in), except the token embedding, the LM head (tied
    or not: it maps to/from vocabulary space, not a hidden transform) and ADAMW_MODULES' matrices (the router)."""
    skip = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if head is not None:
        skip.add(id(head.weight))
    return [p for name, p in model.named_parameters()  # named_parameters lists a tied weight once
            if p.requires_grad and p.ndim in (2, 3) and id(p) not in skip
            and not ADAMW_MODULES & set(name.split(".")[:-1])]


def muon_lr_scale(t) -> float:
    """Muon's peak lr / AdamW's (train.muon_lr null = the same lr: match_rms_adamw makes them one scale)."""
    return 1.0 if t.muon_lr is None else t.muon_lr / t.lr


class MuonStacks(_TorchMuon):
    """torch.optim.Muon that also takes stacks of matrices (E, out, in) and orthogonalises each expert's (out, in)
    slice on its own, exactly as if every expert were a separate 2-D parameter (tests/test_optim.py checks this).
    Reshaping the stack to (E*out, in) would instead orthogonalise all experts jointly and couple them.

    How: torch's step works on the lists `_init_group` fills (param, grad, momentum buffer); this splits a stack's
    entries into E views of the same storage, so torch's in-place update (momentum lerp, decay, step) and its
    shape-based lr adjustment act per expert. The momentum buffer stays one (E, out, in) tensor in the state dict.
    Torch refuses non-2-D parameters at construction, so stacks join as a second param group with the same
    hyperparameters. `_init_group` is a private torch hook (as of torch 2.13): the equivalence test guards it."""

    def __init__(self, params: list[torch.nn.Parameter], **kwargs: Any):
        super().__init__([p for p in params if p.ndim == 2], **kwargs)
        stacks = [p for p in params if p.ndim == 3]
        if stacks:
            self.add_param_group({"params": stacks})

    def _init_group(self, group: dict, params_with_grad: list[torch.Tensor], grads: list[torch.Tensor],
                    muon_momentum_bufs: list[torch.Tensor]) -> bool:
        start = len(params_with_grad)
        has_complex = super()._init_group(group, params_with_grad, grads, muon_momentum_bufs)
        for entries in (params_with_grad, grads, muon_momentum_bufs):
            entries[start:] = [m for x in entries[start:] for m in (x.unbind(0) if x.ndim == 3 else (x,))]
        return has_complex


class CombinedOptimizer:
    """Muon + AdamW behind the optimizer interface the trainer, GradScaler and checkpoints use: param_groups (Muon's
    then AdamW's, the same dicts, so setting group["lr"] reaches both), step, zero_grad, state_dict /
    load_state_dict. The state dict is {"muon": ..., "adamw": ...} of torch's own dicts: tensors, numbers, strings
    and tuples only, so state.pt stays weights_only-loadable."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> None:
        if closure is not None:
            raise ValueError("CombinedOptimizer.step takes no closure")  # it would run twice
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:  # e.g. an AdamW-only checkpoint: the trainer names the file
            raise ValueError(f"expected Muon + AdamW optimizer state, got keys {sorted(state)[:4]}")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def set_lr(optimizer: OptimizerLike, lr: float) -> None:
    """Every group's lr for one step: `lr` (lr_at's value, AdamW's scale) x the group's lr_scale (Muon groups only;
    absent = 1, so AdamW's lr is exactly lr_at's)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


def lr_at(step: int, t, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to lr, then cosine decay to min_lr at
    max_steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, max_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


def plan_budget(t, seq_len: int) -> tuple[int, int]:
    """(optimizer steps, tokens per step). The global batch is micro_batch_size * grad_accum sequences whatever the
    number of processes; train.max_tokens wins over train.max_steps (steps = ceil(max_tokens / tokens per step))."""
    tokens_per_step = t.micro_batch_size * t.grad_accum * seq_len
    steps = math.ceil(t.max_tokens / tokens_per_step) if t.max_tokens else t.max_steps
    return steps, tokens_per_step
