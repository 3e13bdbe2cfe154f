"""Peak memory of a phase of the benchmark (building a variant and its warm-up steps), per device.

CUDA has allocator statistics; on CPU torch allocates with malloc, which tracemalloc does not see, so this uses the
process's peak resident set size (VmHWM, reset through /proc/self/clear_refs) after returning freed heap memory to
the OS (malloc_trim), falling back to getrusage's max RSS (which cannot be reset).
"""
from __future__ import annotations

import ctypes
import gc
import resource
from pathlib import Path
from typing import Optional

import torch


def _proc_status_kb(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryMeter:
    """Peak memory of one phase (building a variant and its warm-up steps) above what was in use before it."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.source = "torch.cuda.max_memory_allocated"
        elif _proc_status_kb("VmHWM") is not None and self._reset_hwm():
            self.source = "rss_peak_delta (VmHWM)"
        else:
            self.source = "ru_maxrss_delta"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        _trim_heap()
        if self.source.startswith("rss_peak"):
            self._reset_hwm()
            self.base = _proc_status_kb("VmRSS") * 1024
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.source.startswith("rss_peak"):
            return _proc_status_kb("VmHWM") * 1024 - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
