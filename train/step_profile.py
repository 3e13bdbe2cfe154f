"""Where a training step's time goes: matmul / attention / everything else.

Everything else (elementwise work, casts, copies, concatenations, reductions, the optimizer's arithmetic, routing) is
what shrinking the step is about (issue 18); scripts/bench.py prints the split for every variant.

Two ways to measure it. torch.profiler (`profile_calls` + `step_breakdown`) sees every operator, inductor's kernels
and CUDA's device time, but on CPU its own allocations, alive for the whole session, fragment the heap: profiled
steps page-fault tens of thousands of times where timed steps fault ~0, and the faults' time lands on the ops that
touch new memory (the MoE's GLU-backward mul read 32 ms per call profiled, 0.55 ms timed; docs/performance.md).
`time_ops` times each top-level ATen call with a clock from a dispatch mode instead (a call's nested calls count as
its own, as the profiler's parent chain does): no fault artifact, ~5% overhead, but it sees neither device time nor
compiled code, so the bench uses it for eager CPU steps only.
"""
from __future__ import annotations

import resource
import time
from collections import Counter
from typing import Callable

from torch.utils._python_dispatch import TorchDispatchMode

# Operators whose self time is matrix multiplication or attention
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::addbmm",
              "aten::_weight_int8pack_mm", "aten::mkldnn_linear", "aten::_mkldnn_matmul")
ATTENTION_MARKS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")

# Steps profiled for the breakdown: one step's shares moved by ±9 points between runs on a shared machine (a burst of
# load lands on whichever ops run then); summed over three they are steadier.
PROFILED_STEPS = 3


def minor_faults() -> int:
    """Minor page faults of this process so far: pages the kernel zeroed on first touch (~10 us apiece on the dev
    VMs). A step that faults thousands of times is slower by that much, on whichever ops touch the new memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _OpClock(TorchDispatchMode):
    """Wall time per ATen operator over the calls made while active. Inside `__torch_dispatch__` the mode is off, so
    an operator's nested calls are timed as part of it."""

    def __init__(self):
        super().__init__()
        self.seconds: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds[func._schema.name] += time.perf_counter() - start  # "aten::mm", as the profiler names it
        return out


def time_ops(step: Callable[[], None], steps: int) -> dict:
    """`step()` called `steps` times with every top-level ATen call timed -> the breakdown (as `step_breakdown`)."""
    clock = _OpClock()
    with clock:
        for _ in range(steps):
            step()
    parts = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for name, seconds in clock.seconds.items():
        parts[_category(name) or "other"] += seconds * 1e6
    return _shares(parts, steps, method="op clock")


def _shares(parts: dict, steps: int, method: str) -> dict:
    """Microseconds of matmul / attention / other over `steps` steps -> per-step ms and shares."""
    total = sum(parts.values())
    out = {f"{k}_ms": us / 1e3 / steps for k, us in parts.items()}
    out.update({f"{k}_frac": (us / total if total else 0.0) for k, us in parts.items()})
    out["profiled_ms"], out["profiled_steps"], out["method"] = total / 1e3 / steps, steps, method
    return out


def profile_calls(step: Callable[[], None], steps: int, device_type: str = "cpu"):
    """`step()` called `steps` times under torch.profiler -> the profile."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    return prof


def op_table(prof, device_type: str, top: int) -> str:
    sort = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=60)


def _category(name: str):
    if name in MATMUL_OPS:
        return "matmul"
    if any(mark in name for mark in ATTENTION_MARKS):
        return "attention"
    return None


def step_breakdown(events, device_type: str = "cpu", steps: int = 1) -> dict:
    """Split profiled steps' self time into matmul / attention / everything else: `events` are the profiler's
    events (`prof.events()`: .name, .cpu_parent, self time in us) over `steps` steps; the _ms values are per step.
    An operator called from inside a matmul or attention operator counts as that operator's time (SDPA's backward
    zero-fills and copies its gradient buffers through aten::fill_/copy_: attention's own work, not "everything
    else"). On CUDA the device time counts (the host only queues)."""
    attr = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    parts = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for e in events:
        if str(getattr(e, "device_type", "CPU")).rsplit(".", 1)[-1] != "CPU":
            continue  # device kernels: their time is already in the CPU operator that launched them
        category, parent = _category(e.name), getattr(e, "cpu_parent", None)
        while category is None and parent is not None:
            category, parent = _category(parent.name), parent.cpu_parent
        parts[category or "other"] += float(getattr(e, attr, 0.0) or 0.0)
    return _shares(parts, steps, method="torch.profiler")
