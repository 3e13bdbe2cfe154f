"""Where and how a run executes: device, precision (autocast), threads, and data parallelism under torchrun.

Under `torchrun --nproc_per_node=N`, WORLD_SIZE/RANK/LOCAL_RANK are set: the process group uses gloo on CPU and NCCL
on CUDA. Rank 0 ("main") logs and writes; every rank computes. `train.parallel` picks how the ranks share the model:
`ddp` (DistributedDataParallel: every rank holds the whole model and optimizer state, gradients are all-reduced) or
`fsdp` (FSDP2's `fully_shard` on every transformer block and on the root: parameters, gradients and optimizer state
are sharded on dim 0 across ranks, each block's parameters all-gathered just in time). In a single process both are
the plain model: nothing is wrapped, the run is the single-process run bit for bit.

FSDP and precision: weights and optimizer state stay fp32 shards and the trainer's autocast runs as it does for DDP.
On CUDA with bf16 the blocks also get `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: they all-gather
bf16 copies (half the traffic) that autocast would have made anyway, and reduce gradients in fp32. The root (embedding,
tied LM head, final norm) stays fp32 and the blocks do not cast their inputs, so the residual stream stays fp32 as
under DDP; what differs from DDP is the RMSNorm weights inside blocks, used as bf16 values.
"""
from __future__ import annotations

import os
import random
import signal
import sys
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from train.errors import ConfigError, UserError
from train.hardware import cpu_flags, matmul_peak_flops  # matmul_peak_flops: also imported from here

T = TypeVar("T")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class Runtime:
    device: torch.device
    dtype: str  # bf16 | fp16 | fp32: the autocast precision; weights and optimizer state stay fp32
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    parallel: str = "ddp"  # train.parallel: ddp | fsdp (only matters with more than one process)
    dtype_requested: str = ""  # train.dtype as given; "auto" may still be refined by settle_auto_dtype

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process: collectives are real."""
        return self.world_size > 1

    @property
    def ddp(self) -> bool:
        """The model is wrapped in DistributedDataParallel."""
        return self.distributed and self.parallel == "ddp"

    @property
    def fsdp(self) -> bool:
        """The model is sharded with FSDP2 (`fully_shard`)."""
        return self.distributed and self.parallel == "fsdp"

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return AMP_DTYPES[self.dtype]

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's value of `obj` on every rank (picklable objects only)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> Optional[list]:
        """Every rank's `obj` as a list on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0, then (if it worked) on the others: for steps that fill a shared cache. A UserError on
        rank 0 is raised on every rank, so no rank waits forever."""
        if not self.distributed:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except UserError as e:
                error = e
        error = self.broadcast(error)
        if error is not None:
            raise error
        return result if self.is_main else fn()

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only; its (picklable) result, or the UserError it raised, reaches every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except UserError as e:
                if not self.distributed:
                    raise
                error = e
        if self.distributed:
            result, error = self.broadcast((result, error))
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def setup_runtime(device: str, dtype: str, num_threads: Optional[int] = None, parallel: str = "ddp") -> Runtime:
    """Validate device/dtype, set CPU threads, and join the torchrun process group when there is one. `parallel`
    (train.parallel) is recorded for `wrap_model`; it changes nothing in a single process."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; valid here: auto, cpu")
    requested, dtype = dtype, resolve_dtype(dtype, device)
    if dtype == "fp16" and device != "cuda":
        raise ConfigError("train.dtype=fp16 needs CUDA (it trains with a GradScaler); on CPU use bf16 or fp32")
    if dtype == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.dtype=bf16 is not supported by this GPU; use fp16 or fp32")
    if num_threads:
        torch.set_num_threads(num_threads)
    if device == "cpu":
        keep_freed_memory()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1:
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    dev = torch.device(f"cuda:{local_rank}" if device == "cuda" else "cpu")
    return Runtime(device=dev, dtype=dtype, rank=rank, local_rank=local_rank, world_size=world_size,
                   parallel=parallel, dtype_requested=requested)


# ----------------------------------------------------------------------------------------------------------------
# Data parallelism: wrapping, gradient sync, clipping

def wrap_model(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    """The module a training step calls. ddp: a DistributedDataParallel wrapper around `model`. fsdp: `model` itself,
    sharded in place by `shard_model` (which must run before the optimizer is built). A single process: `model`."""
    if rt.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # find_unused_parameters: a block class may say some parameters can miss a micro-batch (an MoE expert with no
        # tokens). broadcast_buffers=False: MoE load counters are per rank, not rank 0's copied everywhere.
        skips = any(getattr(m, "may_skip_params", False) for m in model.modules())
        return DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
                   find_unused_parameters=skips, broadcast_buffers=False)
    return model


def fsdp_mixed_precision(rt: Runtime):
    """The blocks' FSDP2 MixedPrecisionPolicy: bf16 all-gathers with fp32 gradient reduction on CUDA with bf16
    autocast (the module docstring says why the residual stream stays fp32); None (fp32 shards all the way, autocast
    alone) elsewhere."""
    if rt.device.type != "cuda" or rt.amp_dtype is not torch.bfloat16:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard_model(model: torch.nn.Module, blocks, rt: Runtime) -> torch.nn.Module:
    """FSDP2: `fully_shard` every transformer block in `blocks` (each one all-gather / reduce-scatter unit, its
    parameters freed after its forward) and then the root `model`, which keeps the rest (embedding, tied LM head,
    final norm) in one group; a tied embedding/LM head shares one sharded parameter. Parameter names do not change.
    In place, and a no-op unless rt.fsdp; returns `model`.
    The MoE's expert stacks are ordinary parameters of their block and are sharded on dim 0 (experts) like the rest;
    its buffers (selection bias, load counters) are not sharded and stay per rank."""
    if not rt.fsdp:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    mp = fsdp_mixed_precision(rt)
    block_kw = {"mp_policy": mp} if mp is not None else {}
    for block in blocks:
        fully_shard(block, mesh=mesh, **block_kw)
    fully_shard(model, mesh=mesh)
    return model


def grad_sync(wrapped: torch.nn.Module, rt: Runtime, sync: bool):
    """Context for one micro-step's forward and backward: gradients are reduced across ranks only when `sync` (the
    last micro-step of an optimizer step). ddp: `no_sync()` otherwise; fsdp: `set_requires_gradient_sync(sync)` (the
    unsharded gradients accumulate locally until the final micro-step reduce-scatters them)."""
    if rt.ddp and not sync:
        return wrapped.no_sync()
    if rt.fsdp:
        wrapped.set_requires_gradient_sync(sync)
    return nullcontext()


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Clip gradients to a global L2 norm of `max_norm` (inf: measure only) and return that norm (before clipping),
    the same on every rank. FSDP2's gradients are DTensor shards: their norm is reduced over all ranks (full_tensor)
    before the clip coefficient is computed, so it is the whole model's norm, not one shard's."""
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(total, "full_tensor"):  # a DTensor
        total = total.full_tensor()
    # torch multiplies every gradient by the clamped coefficient even when it is exactly 1 (a pass over all the
    # gradients for nothing: 2-3% of a MoE step on CPU); skip it then. Same coefficient, same test as torch's.
    coef = max_norm / (total + 1e-6)
    if not bool(coef >= 1.0):  # NaN/inf norms take torch's path too
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """CPU runs on glibc: keep freed memory in the process for the next step instead of giving it back to the OS.

    By default glibc serves large blocks with fresh mmaps and trims the heap top as soon as a step frees its
    activations, so every step page-faults its working set back in (the kernel zeroes each page). Measured on the
    2-core dev VM, MiniMind2-small MoE 8×2 after 14 warm-up steps: 12k–18k page faults and 60–260 ms of kernel
    time per step before, 0 faults after. Blocks up to 32 MB (glibc's maximum mmap threshold) now come from the
    heap and the heap is trimmed only when over 1 GB of it is free, so the process keeps the peak memory that every
    step reaches anyway.
    -> True when applied (glibc found), False elsewhere (macOS, musl): nothing changes there.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def measure_peak_flops(rt: Runtime) -> float:
    """The run's peak for MFU: `train.hardware.matmul_peak_flops` in the run's precision and CPU threads (cached per
    machine, so every run here divides by the same number), measured on rank 0 and the same on every rank."""
    return rt.on_main(lambda: matmul_peak_flops(rt.device, rt.dtype))


def fast_bf16_cpu() -> bool:
    """Whether this CPU has native bf16 matmul (AVX512-BF16 or AMX); without it bf16 autocast is many times slower
    than fp32 (measured ~10x on an AVX2-only EPYC)."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` -> the ISA rule: bf16 where it can be fast (CUDA with bf16, CPUs with native bf16), else fp32; refined
    per model shape once the model is known (`settle_auto_dtype`). Explicit dtypes are returned as they are."""
    if dtype != "auto":
        return dtype
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if fast_bf16_cpu() else "fp32"


def auto_dtype_choice(dtype: str, device: str, model_cfg: Any, micro_batch_size: int):
    """What `dtype` resolves to for this model shape, with why (a train.dtype_probe.DtypeChoice). Only `auto` on a
    CPU with native bf16 measures (train/dtype_probe.py: bf16 must be >= 10% faster than fp32, cached per machine and
    shape); CUDA and CPUs without native bf16 keep the ISA rule, explicit dtypes never probe."""
    from train.dtype_probe import DtypeChoice, probe_dtype

    if dtype != "auto":
        return DtypeChoice(dtype, "explicit", note=f"train.dtype={dtype}")
    if device.startswith("cuda"):
        return DtypeChoice(resolve_dtype("auto", "cuda"), "rule", note="CUDA: bf16 where the GPU supports it")
    if not fast_bf16_cpu():
        return DtypeChoice("fp32", "rule", note="this CPU has no native bf16 matmul (AMX / AVX512-BF16)")
    return probe_dtype(model_cfg, micro_batch_size)


def settle_auto_dtype(rt: Runtime, model_cfg: Any, micro_batch_size: int) -> Optional[str]:
    """For train.dtype=auto, once the model's shape is known (vocab from the tokenizer): set `rt.dtype` to what
    `auto_dtype_choice` picks and return the line to print ("dtype auto -> fp32 (measured: ...)"); None (nothing
    changed) for an explicit dtype. Rank 0 decides (it alone probes) and every rank gets its answer, so all agree."""
    if rt.dtype_requested != "auto":
        return None
    device = rt.device.type
    choice = rt.on_main(lambda: auto_dtype_choice("auto", device, model_cfg, micro_batch_size))
    rt.dtype = choice.dtype
    return choice.line()


class StopRequest:
    """Ctrl-C / SIGTERM set a flag that the training loop checks at each step boundary (it then saves a checkpoint and
    exits); a second Ctrl-C stops at once. SIGXFSZ is ignored so that a file-size limit surfaces as a write error
    (EFBIG) that names the file, instead of killing the process."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old: dict = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGXFSZ):
                self._old[sig] = signal.signal(sig, signal.SIG_IGN if sig == signal.SIGXFSZ else self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if sys.stderr.isatty():  # logs and callers get just the one line printed on exit
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to quit "
                  "without)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
