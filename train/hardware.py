"""What this machine is and what its matmul kernel reaches: the peak that MFU is measured against.

One implementation for the trainer (runtime.measure_peak_flops), the benchmark (train/bench.py) and sweep estimates:
`time_best` times a call as the best of many samples (other work on a shared machine only ever slows a sample down,
so the best is the least disturbed), `matmul_peak_flops` times the model's kernel (`F.linear` under the run's
autocast) and caches the result per machine in `cache_dir()/peak.json`, so that every run on a machine divides by the
same number and MFU is comparable between runs.

A measurement during which other processes kept this run's CPU cores busy (from /proc/stat: CPU time not ours, plus
hypervisor steal) is marked contended: it is used, but every later call measures again and keeps the highest
number so far, until a measurement on a quiet machine settles it. A busy machine thus never fixes a low peak (and
MFU above 100%); its cached peak only rises towards what the hardware reaches.

Lowest floor: imports nothing from train/ but train.fsutil.
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from train.fsutil import write_atomic

PEAK_BUDGET_S = 1.0  # seconds of timed samples per fresh measurement, at least PEAK_MIN_REPEATS samples
PEAK_MIN_REPEATS = 10
PEAK_SAMPLE_S = 2e-3  # a sample is enough back-to-back calls to last this long (CUDA: launch + sync overhead)
CONTENDED_CORES = 0.25  # other processes using more than this many of our cores on average: a disturbed measurement
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_CACHE_FORMAT = 1


def cache_dir() -> Path:
    """Per-user cache of this project: `$MINIMIND_CACHE_DIR`, else `~/.cache/minimind-ffn`."""
    return Path(os.environ.get("MINIMIND_CACHE_DIR") or Path.home() / ".cache" / "minimind-ffn")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset]:
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:  # x86, ARM
                    flags = frozenset(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown CPU", flags


# oneDNN (bf16/fp16 matmuls on CPU) uses the best instructions the CPU has, up to the cap an environment variable may
# set (`ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16` runs an AMX CPU's matmuls as on a CPU without AMX: the stand-in for
# such a CPU in docs/performance.md). The cap's rank among our flags: 4 keeps avx512_bf16 and drops AMX, and so on.
ISA_CAP_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
_FLAG_RANK = {"amx_tile": 5, "amx_bf16": 5, "avx512_bf16": 4, "avx512f": 3, "avx2": 2}
_CAP_RANK = {"SSE41": 1, "AVX": 1, "AVX2": 2, "AVX2_VNNI": 2, "AVX2_VNNI_2": 2, "AVX512_CORE": 3,
             "AVX512_CORE_VNNI": 3, "AVX512_CORE_BF16": 4, "AVX512_CORE_FP16": 4, "AVX10_1_512": 4}


def isa_cap() -> Optional[str]:
    """The oneDNN ISA cap in effect when it hides instructions from matmuls (e.g. 'AVX512_CORE_BF16'), else None."""
    for var in ISA_CAP_VARS:
        value = os.environ.get(var, "").strip().upper()
        if value:
            return value if value in _CAP_RANK else None  # AMX levels, ALL, DEFAULT: nothing hidden
    return None


def cpu_flags() -> frozenset:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none), less the matmul ones above an oneDNN ISA
    cap (`isa_cap`): what bf16 matmuls can use."""
    flags, cap = _cpuinfo()[1], isa_cap()
    if cap is None:
        return flags
    return frozenset(f for f in flags if _FLAG_RANK.get(f, 0) <= _CAP_RANK[cap])


def cpu_info() -> dict:
    """`model` (/proc/cpuinfo's model name), `isa`, the best matmul instructions it has: AMX, AVX-512-BF16, AVX-512,
    AVX2, else the machine type (bf16 speed on a CPU depends on exactly this), and `isa_cap` (None, or the oneDNN
    cap that hides better ones: `isa` is then what the cap leaves, and the peak cache keeps it apart)."""
    model, flags, cap = _cpuinfo()[0], cpu_flags(), isa_cap()
    for flag, isa in (("amx_tile", "AMX"), ("avx512_bf16", "AVX-512-BF16"), ("avx512f", "AVX-512"),
                      ("avx2", "AVX2")):
        if flag in flags:
            break
    else:
        isa = platform.machine() or "unknown"
    return {"model": model, "isa": f"{isa}, oneDNN cap {cap}" if cap else isa, "isa_cap": cap}


def device_name(device: torch.device | str) -> str:
    """What a peak belongs to: the GPU's name, or the CPU model with its matmul ISA."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = cpu_info()
    return f"{info['model']} [{info['isa']}]"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_best(fn: Callable[[], Any], device: torch.device | str = "cpu", repeats: int = 1, budget_s: float = 0.0,
              sample_s: float = 0.0) -> float:
    """Seconds of one call of `fn` (device work included), the best over samples: at least `repeats` of them and
    more until `budget_s` has passed. A sample is enough back-to-back calls to last `sample_s` (one sync at its
    end), divided by their number."""
    device = torch.device(device)
    calls, best, n, start = 1, math.inf, 0, time.perf_counter()
    while n < repeats or time.perf_counter() - start < budget_s:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        elapsed = time.perf_counter() - t0
        best, n = min(best, elapsed / calls), n + 1
        if elapsed < sample_s:  # too short to time well: more calls per sample from now on
            calls = min(calls * max(2, math.ceil(sample_s / max(elapsed, 1e-9))), 1 << 16)
    return best


def matmul_inputs(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device | str):
    """(x_MK, w_NK) for `F.linear(x_MK, w_NK)`: M×K times (N×K)ᵀ, 2·M·K·N FLOPs. A private generator leaves the
    global RNG (and so exact resume) alone."""
    m, k, n = shape
    gen = torch.Generator(device=device).manual_seed(0)
    return (torch.randn(m, k, device=device, generator=gen).to(dtype),
            torch.randn(n, k, device=device, generator=gen).to(dtype))


def matmul_peak_flops(device: torch.device | str, dtype: str, num_threads: Optional[int] = None,
                      shape: Optional[tuple[int, int, int]] = None, *, cache: bool = True,
                      budget_s: float = PEAK_BUDGET_S) -> float:
    """The achievable matmul peak (FLOP/s) of this machine in a training precision (`bf16`, `fp16`, `fp32`):
    `F.linear` (the model's kernel; for bf16 on CPU it is ~10x faster than `@`) under the run's autocast, square
    1024 on CPU and 4096 on CUDA unless `shape` = (M, K, N), the best of many samples (`time_best`, ~`budget_s`).

    Cached in `cache_dir()/peak.json` under (device: GPU name or CPU model + ISA, dtype, CPU threads, torch version,
    shape): once settled by a measurement on a quiet machine, every later call returns it, so every run on the
    machine divides by the same number (until then each call measures again and keeps the best, see the module
    docstring). Delete the file to measure again; `cache=False` neither reads nor writes it. A corrupt cache file
    is ignored and rewritten. `num_threads` (CPU) applies to the measurement only; None = torch's current count."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype '{dtype}': valid: {', '.join(TORCH_DTYPES)} (resolve 'auto' first)")
    shape = tuple(shape or ((4096,) * 3 if device.type == "cuda" else (1024,) * 3))
    old_threads = torch.get_num_threads()
    if device.type == "cpu" and num_threads:
        torch.set_num_threads(num_threads)
    try:
        if not cache:
            return _measure(device, dtype, shape, budget_s)[0]
        threads = f"|threads={torch.get_num_threads()}" if device.type == "cpu" else ""
        key = f"{device.type}|{device_name(device)}|{dtype}{threads}|torch={torch.__version__}|" + \
              "x".join(map(str, shape))
        with _cache_lock():  # concurrent runs (compare --jobs) wait for one measurement instead of sharing cores
            entries = _read_cache()
            old = entries.get(key) if isinstance(entries.get(key), dict) else {}
            old_rate, tries = old.get("flops"), old.get("measurements", 1)
            if not (isinstance(old_rate, (int, float)) and math.isfinite(old_rate) and old_rate > 0):
                old_rate, tries = 0.0, 0
            elif not old.get("contended"):
                return float(old_rate)
            rate, contended = _measure(device, dtype, shape, budget_s)
            entries[key] = {"flops": max(rate, old_rate), "contended": contended,
                            "measurements": (tries if isinstance(tries, int) else 0) + 1,
                            "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            _write_cache(entries)
            return entries[key]["flops"]
    finally:
        torch.set_num_threads(old_threads)


def _measure(device: torch.device, dtype: str, shape: tuple[int, int, int], budget_s: float) -> tuple[float, bool]:
    """(FLOP/s, whether other processes kept our cores busy meanwhile)."""
    x_MK, w_NK = matmul_inputs(shape, TORCH_DTYPES[dtype], device)
    amp = None if dtype == "fp32" else TORCH_DTYPES[dtype]
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=amp)) if amp is not None else nullcontext
    with torch.no_grad(), autocast():
        time_best(lambda: F.linear(x_MK, w_NK), device, repeats=2)  # warm-up: kernel selection, first touch
        load = _OtherLoad()
        seconds = time_best(lambda: F.linear(x_MK, w_NK), device, repeats=PEAK_MIN_REPEATS, budget_s=budget_s,
                            sample_s=PEAK_SAMPLE_S)
        others = load.cores()
    free = max(0, (os.cpu_count() or 1) - torch.get_num_threads())  # cores others can use without touching ours
    contended = device.type == "cpu" and others > free + CONTENDED_CORES
    m, k, n = shape
    return 2 * m * k * n / seconds, contended


class _OtherLoad:
    """CPU cores that other processes (and the hypervisor's steal) used on average since construction, from
    /proc/stat; 0 where there is no /proc/stat."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> Optional[tuple[float, float, float]]:
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()
        except OSError:
            return None
        if len(fields) < 9 or fields[0] != "cpu":
            return None
        ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        mine = os.times()
        return time.perf_counter(), busy, mine.user + mine.system

    def cores(self) -> float:
        end = self._sample()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return 0.0
        wall, busy, mine = (b - a for a, b in zip(self.start, end))
        return max(0.0, busy - mine) / wall


def _cache_path() -> Path:
    return cache_dir() / "peak.json"


def _read_cache() -> dict:
    try:
        doc = json.loads(_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or corrupt: measure, then rewrite it
    if not isinstance(doc, dict) or doc.get("format") != _CACHE_FORMAT or not isinstance(doc.get("peaks"), dict):
        return {}
    return doc["peaks"]


def _write_cache(entries: dict) -> None:
    try:
        _cache_path().parent.mkdir(parents=True, exist_ok=True)
        write_atomic(_cache_path(), json.dumps({"format": _CACHE_FORMAT, "peaks": entries}, indent=1) + "\n",
                     error=None)
    except OSError:
        pass  # an unwritable cache only costs a measurement next time


@contextmanager
def _cache_lock(name: str = ".peak.lock"):
    """An exclusive lock on `cache_dir()/name` (one file per cache: peak.json, dtype.json) while measuring."""
    try:
        import fcntl

        cache_dir().mkdir(parents=True, exist_ok=True)
        fd = os.open(cache_dir() / name, os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield  # no locking here (Windows, a read-only home): measure unguarded
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
