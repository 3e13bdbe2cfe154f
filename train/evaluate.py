"""Validation metrics on the fixed validation blocks (loss, perplexity, bits per byte) and sample generations.

Shared by the trainer and scripts/evaluate.py. Shapes: x_BT / y_BT are (batch, time) token ids; y_BT[t] is the token
after x_BT[t] (-100 = ignored).

Bits per byte (comparable across tokenizers) comes from `train.data.bits_per_byte` with the UTF-8 bytes behind the
evaluated targets (`ValBatches.n_bytes`: exact for byte-level BPE, else estimated from the split's bytes/token).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, ContextManager, Optional, Sequence

import torch


@torch.no_grad()
def eval_loss_sum(model: torch.nn.Module, blocks: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  device: torch.device | str = "cpu",
                  autocast: Callable[[], ContextManager] = nullcontext) -> tuple[float, int]:
    """(sum of next-token NLL in nats, number of scored tokens) over `blocks`."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for x_BT, y_BT in blocks:
        x_BT, y_BT = x_BT.to(device), y_BT.to(device)
        with autocast():
            out = model(x_BT, y_BT)
        n = int((y_BT != -100).sum())
        nll += float(out.loss.float()) * n
        count += n
    model.train(was_training)
    return nll, count


def val_metrics(nll_sum: float, tokens: int, prepared, val_bytes: Optional[float] = None) -> dict:
    """val_loss (nats/token), val_ppl, val_bpb, val_tokens from a summed NLL over `tokens` validation targets."""
    from train.data import bits_per_byte

    loss = nll_sum / max(tokens, 1)
    bpb = bits_per_byte(loss, prepared, tokens, val_bytes) if math.isfinite(loss) else float("nan")
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 80.0)), "val_bpb": bpb, "val_tokens": tokens}


def evaluate(model: torch.nn.Module, val, prepared, device="cpu", autocast=nullcontext) -> dict:
    """Metrics of `model` on `val` (a `train.data.ValBatches`), single process."""
    nll, n = eval_loss_sum(model, val, device, autocast)
    return val_metrics(nll, n, prepared, getattr(val, "n_bytes", None) if n == getattr(val, "n_tokens", -1) else None)


@torch.no_grad()
def generate_samples(model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                     temperature: float = 0.8, top_k: Optional[int] = 50, seed: int = 0, device="cpu",
                     eos_token_id: Optional[int] = None) -> list[dict]:
    """One completion per prompt with a fixed seed (so runs of different variants get comparable samples)."""
    was_training = model.training
    model.eval()
    samples = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt).ids
        if not ids:
            continue
        gen = torch.Generator(device=device).manual_seed(seed + i)
        x_1T = torch.tensor([ids], dtype=torch.long, device=device)
        out_1T = model.generate(x_1T, max_new_tokens=max_new_tokens, temperature=max(temperature, 1e-6),
                                top_k=top_k, eos_token_id=eos_token_id, greedy=temperature == 0, generator=gen)
        new_ids = out_1T[0, len(ids):].tolist()
        samples.append({"prompt": prompt, "completion": tokenizer.decode(new_ids)})
    model.train(was_training)
    return samples
