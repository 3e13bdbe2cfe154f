"""Batches from the memory-mapped token shards, and bits per byte.

Shapes: B = sequences per batch, T = seq_len. Every sequence is a block of T+1 consecutive tokens:
x_BT = block[:-1], y_BT = block[1:] (y[t] is the token after x[t]), as int64 CPU tensors.

Training batches are a pure function of (seed, step, micro_step, rank): the start offsets of one optimizer step's
global batch (micro_batch_size * grad_accum * world_size blocks, drawn uniformly with replacement) come from a numpy
Generator seeded with (seed, step). Nothing depends on the model, so every FFN variant sees the same data in the same
order, and resuming needs only the step. Block j of the global batch goes to micro-step j // (mb * world_size) and
rank (j // mb) % world_size, so ranks get disjoint parts and the union over ranks and micro-steps is the same global
batch whatever the split into ranks and micro-steps.

Validation is val.bin cut into consecutive blocks: block i is val[i*T : i*T + T + 1], so the inputs never overlap and
every target is scored once; identical for every variant. The blocks are split in two fixed halves: the *reporting*
part (the first half: every number a report shows) and the *tuning* part (the second half: what selection, e.g. a
learning-rate choice, reads). eval_tokens caps each part from its start, so a tuning decision never sees a reported
block.

Bits per byte = mean loss (nats per target token) / ln 2 * target tokens / UTF-8 bytes behind those targets. For a
byte-level tokenizer the bytes behind the targets are counted exactly (each token id stands for a fixed number of
bytes; EOS for none), so the number is exact even when only part of the split is evaluated. For other tokenizers it
falls back to the split's bytes/tokens ratio from meta.json (an approximation when only part of the split is used).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from train.errors import DataError


class TrainBatches:
    def __init__(self, path: str | Path, dtype, seq_len: int, micro_batch_size: int, grad_accum: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        for name, value in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size),
                            ("grad_accum", grad_accum), ("world_size", world_size)):
            if value <= 0:
                raise ValueError(f"TrainBatches: {name} must be > 0, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"TrainBatches: rank must be in [0, {world_size}), got {rank}")
        self.tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        if len(self.tokens) < seq_len + 1:
            raise DataError(f"{path} holds {len(self.tokens)} tokens, fewer than one block of seq_len+1 = "
                            f"{seq_len + 1}; use a larger corpus or a smaller model.max_seq_len")
        self.seq_len, self.micro_batch_size, self.grad_accum = seq_len, micro_batch_size, grad_accum
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.global_batch_size = micro_batch_size * grad_accum * world_size  # sequences per optimizer step
        self._cached_step, self._cached_offsets = None, None

    def offsets(self, step: int) -> np.ndarray:
        """Start positions of the blocks of one optimizer step's global batch."""
        if step != self._cached_step:
            rng = np.random.default_rng([self.seed % 2**64, step])
            self._cached_offsets = rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_batch_size)
            self._cached_step = step
        return self._cached_offsets

    def get(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= micro_step < self.grad_accum:
            raise ValueError(f"micro_step must be in [0, {self.grad_accum}), got {micro_step}")
        first = (micro_step * self.world_size + self.rank) * self.micro_batch_size
        starts = self.offsets(step)[first:first + self.micro_batch_size]
        blocks = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        x_BT, y_BT = np.ascontiguousarray(blocks[:, :-1]), np.ascontiguousarray(blocks[:, 1:])
        return torch.from_numpy(x_BT), torch.from_numpy(y_BT)


class ValBatches(list):
    """A list of (x_BT, y_BT) that also knows how many target tokens it holds and the UTF-8 bytes behind them."""
    n_tokens: int = 0
    n_bytes: float = 0.0
    exact_bytes: bool = False  # False: n_bytes estimated from the split's bytes/tokens ratio


VAL_PARTS = ("report", "tune", "all")  # all: the whole split (scoring a text of your own)


def val_part_blocks(n_blocks: int, part: str) -> range:
    """Block indices of a validation part: report = the first half, tune = the second (a split of one block has no
    tuning part), all = every block."""
    if part not in VAL_PARTS:
        raise ValueError(f"validation part must be one of {VAL_PARTS}, got {part!r}")
    half = max(1, n_blocks // 2)
    return {"report": range(0, half), "tune": range(half, n_blocks), "all": range(0, n_blocks)}[part]


def val_batches(prepared, seq_len: int, batch_size: int, eval_tokens: int | None = None,
                part: str = "report") -> ValBatches:
    """Fixed consecutive blocks of one validation part (see the module docstring), covering eval_tokens target
    tokens (rounded down to whole blocks, at least one block) or the whole part when eval_tokens is None.
    Raises DataError when the part is empty (a validation split of one block has no tuning part)."""
    val = np.memmap(prepared.val_path, dtype=prepared.dtype, mode="r")
    available = (len(val) - 1) // seq_len
    if available == 0:
        raise DataError(f"the validation split ({prepared.val_path}) holds {len(val)} tokens, fewer than one block of "
                        f"seq_len+1 = {seq_len + 1}; use more validation data or a smaller model.max_seq_len")
    blocks = val_part_blocks(available, part)
    if not blocks:
        raise DataError(f"the validation split ({prepared.val_path}) holds one block of seq_len+1 = {seq_len + 1} "
                        "tokens: no tuning part; use more validation data or a smaller model.max_seq_len")
    n_blocks = len(blocks) if eval_tokens is None else min(len(blocks), max(1, eval_tokens // seq_len))
    first = blocks.start * seq_len
    tokens = np.asarray(val[first: first + n_blocks * seq_len + 1], dtype=np.int64)
    x_NT, y_NT = tokens[:-1].reshape(n_blocks, seq_len), tokens[1:].reshape(n_blocks, seq_len)
    batches = ValBatches((torch.from_numpy(x_NT[i:i + batch_size].copy()),
                          torch.from_numpy(y_NT[i:i + batch_size].copy())) for i in range(0, n_blocks, batch_size))
    batches.n_tokens = n_blocks * seq_len
    lengths = prepared.token_byte_lengths()
    if lengths is not None:
        batches.n_bytes, batches.exact_bytes = int(lengths[y_NT].sum()), True
    else:
        batches.n_bytes = batches.n_tokens * prepared.meta["val_bytes"] / prepared.meta["val_tokens"]
    return batches


def bits_per_byte(mean_loss_nats: float, prepared, tokens_evaluated: int,
                  bytes_evaluated: float | None = None) -> float:
    """Bits per UTF-8 byte of text from a mean next-token loss over `tokens_evaluated` validation targets.

    Pass `bytes_evaluated` (e.g. `ValBatches.n_bytes`) for the exact count; without it the validation split's
    bytes/tokens ratio from meta.json is used."""
    if bytes_evaluated is None:
        bytes_evaluated = tokens_evaluated * prepared.meta["val_bytes"] / prepared.meta["val_tokens"]
    return mean_loss_nats / math.log(2) * tokens_evaluated / bytes_evaluated
