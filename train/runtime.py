"""Where and how a run executes: device, precision (autocast), threads, and torchrun's DistributedDataParallel.

Under `torchrun --nproc_per_node=N`, WORLD_SIZE/RANK/LOCAL_RANK are set: the process group uses gloo on CPU and NCCL
on CUDA. Rank 0 ("main") logs and writes; every rank computes.
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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return AMP_DTYPES[self.dtype]

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def barrier(self) -> None:
        if self.ddp:
            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's value of `obj` on every rank (picklable objects only)."""
        if not self.ddp:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> Optional[list]:
        """Every rank's `obj` as a list on rank 0 (None elsewhere)."""
        if not self.ddp:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.ddp:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0, then (if it worked) on the others: for steps that fill a shared cache. A UserError on
        rank 0 is raised on every rank, so no rank waits forever."""
        if not self.ddp:
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
                if not self.ddp:
                    raise
                error = e
        if self.ddp:
            result, error = self.broadcast((result, error))
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        if self.ddp and dist.is_initialized():
            dist.destroy_process_group()


def setup_runtime(device: str, dtype: str, num_threads: Optional[int] = None) -> Runtime:
    """Validate device/dtype, set CPU threads, and join the torchrun process group when there is one."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; valid here: auto, cpu")
    dtype = resolve_dtype(dtype, device)
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
    return Runtime(device=dev, dtype=dtype, rank=rank, local_rank=local_rank, world_size=world_size)


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
    """`auto` -> bf16 where it is fast (CUDA with bf16, CPUs with native bf16), else fp32."""
    if dtype != "auto":
        return dtype
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if fast_bf16_cpu() else "fp32"


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
