"""`train.dtype: auto` on a CPU with native bf16 (AMX / AVX512-BF16): measure which precision trains *this* model
faster, and remember the answer per machine and model shape.

Native bf16 matmuls are not always the faster choice. Measured on a 2-core AMX Xeon (scripts/bench.py, 10 steps):
base.yaml's d=128 MoE ran 15.3k tok/s in fp32 and 4.0k in bf16 (oneDNN JIT-compiles a kernel for every new
expert-group shape in bf16, and at d=128 the casts cost more than the faster matmuls save); the dense model at the
same size ran 20.8k (fp32) vs 19.8k (bf16); at MiniMind2-small size (d=512, seq 512) bf16 is much faster. So the
probe times the run's own training step — forward, loss, backward of the run's model on random token ids of the
run's micro-batch shape — in fp32 and under bf16 autocast, and picks:

- bf16 only when its step takes at least PROBE_MARGIN (10%) less time than fp32's. fp32 is exact (no autocast
  rounding) and its speed does not hinge on kernel JIT, so a tie or a small win that could be measurement noise goes
  to fp32.
- Steps alternate fp32, bf16, bf16, fp32, ... on the same fresh batch per round, so a busy patch of a shared machine
  slows both. Each dtype first runs warm-up steps (PROBE_WARMUP_DENSE; PROBE_WARMUP_MOE for MoE models, whose bf16
  kernels are compiled per expert-group shape and routing varies by batch), then PROBE_TIMED timed steps, of which
  the best counts (other work only ever slows a step down; and the best step is the steady state a long run lives in,
  not the JIT start-up).
- Bounds, all on wall time. The first round is cold (page faults, oneDNN kernel creation: measured 8 s for a d=128
  MoE step that takes 0.9 s warm on a busy machine), so it is never timed and only a very long first fp32 step
  counts: over PROBE_HUGE_S (20 s) the model is far into the matmul-bound range, where native bf16 wins
  (MiniMind2-small, d=512: bf16 1.5-1.8x faster here), and a probe would take minutes, so the ISA rule (bf16)
  applies unmeasured. A warm fp32 step over PROBE_STEP_LIMIT_S (2 s) cuts the warm-up short: that round's pair
  decides (2 rounds, 4 steps in all). Past PROBE_BUDGET_S (30 s) the probe stops after the current round and decides
  on what it has (the last pair if still warming up: bf16 that has not settled by then is slow for this run too).
- A probe that fails (out of memory, a model that does not build) falls back to the ISA rule and is not cached.
- Timing a shared machine: the interleaving keeps the comparison fairer, but a step whose threads wait for a core
  is slower by a factor that changes from second to second (measured here: one d=128 step 0.7 s, then 8 s). As in
  train/hardware.py, a probe during which other processes kept our cores busy is marked `contended` (in the printed
  line and the cache entry). Its answer is cached like any other: both dtypes were timed alternately under the same
  load, and measuring again on every run of a constantly shared machine would cost 10-50 s per run. Delete the
  entry (or the file) to measure again on a quiet machine.

The answer is cached in `cache_dir()/dtype.json` (train/hardware.py: `$MINIMIND_CACHE_DIR`, else
~/.cache/minimind-ffn) under the CPU model + ISA, torch's CPU threads, the torch version and the shape (`shape_key`:
the model config that changes the step's compute, and the micro-batch): a later run of the same shape reuses it
without measuring. Delete the file to measure again. The probe runs eager; a
run with train.compile may differ.

The probe leaves the caller's RNG alone (`torch.random.fork_rng`, a private generator for the batches), builds and
frees its own model, and leaves no gradients behind. Imports nothing from train/ but train.hardware and train.fsutil.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from train.fsutil import write_atomic
from train.hardware import CONTENDED_CORES, _cache_lock, _OtherLoad, cache_dir, device_name

PROBE_MARGIN = 0.10  # bf16 must save at least this fraction of fp32's step time
PROBE_WARMUP_DENSE = 2  # untimed steps per dtype: first touch, oneDNN kernel selection
PROBE_WARMUP_MOE = 6  # MoE: bf16 kernels are JIT-compiled per new expert-group shape
PROBE_TIMED = 3  # timed steps per dtype; the best counts
PROBE_STEP_LIMIT_S = 2.0  # a warm fp32 step slower than this ends the warm-up: that round's pair decides
PROBE_HUGE_S = 20.0  # the first (cold) fp32 step slower than this: the ISA rule (bf16), bf16 not measured
PROBE_BUDGET_S = 30.0  # the probe stops after the round that passes this many seconds and decides on what it has
_CACHE_FORMAT = 1
_CACHE_FILE, _LOCK_FILE = "dtype.json", ".dtype.lock"
# model config keys that do not change a training step's cost (upcycle_from: a path, differs per run)
_NOT_COMPUTE = frozenset({"rope_theta", "rms_norm_eps", "init_std", "upcycle_from"})


@dataclass(frozen=True)
class StepTimes:
    """One probe's result: seconds per training step (None: not measured) and how the probe ended."""
    fp32_s: Optional[float]
    bf16_s: Optional[float]
    # measured | short (warm fp32 step over PROBE_STEP_LIMIT_S) | budget (past PROBE_BUDGET_S) | huge (first fp32
    # step over PROBE_HUGE_S: bf16 not measured)
    ended: str = "measured"
    contended: bool = False  # other processes kept our cores busy meanwhile


@dataclass(frozen=True)
class DtypeChoice:
    """What `auto` became and why; `line()` is the trainer's one line about it. Picklable (broadcast to ranks)."""
    dtype: str
    source: str  # measured | cached | huge | failed | rule | explicit
    fp32_ms: Optional[float] = None
    bf16_ms: Optional[float] = None
    cache_path: Optional[str] = None
    note: str = ""
    contended: bool = False

    def line(self) -> str:
        cached = f"cached in {_display(self.cache_path)}" if self.cache_path else "not cached"
        times = ", ".join(f"{name} {ms:.0f} ms/step" for name, ms in (("fp32", self.fp32_ms), ("bf16", self.bf16_ms))
                          if ms is not None)
        why = {
            "measured": f"measured{' on a busy machine' if self.contended else ''}: {times}; bf16 needs >= "
                        f"{PROBE_MARGIN:.0%} less time; {cached}"
                        + ("; delete the entry to measure again when the machine is quiet"
                           if self.contended and self.cache_path else ""),
            "cached": f"measured earlier: {times}; from {_display(self.cache_path)}",
            "huge": f"the first fp32 step took {(self.fp32_ms or 0) / 1e3:.0f} s > {PROBE_HUGE_S:g} s: a large, "
                    f"matmul-bound model, where native bf16 wins; bf16 not measured; {cached}",
        }.get(self.source, self.note)
        return f"dtype auto -> {self.dtype} ({why})"


def _display(path: Optional[str]) -> str:
    home = str(Path.home())
    return "~" + path[len(home):] if path and home != "/" and path.startswith(home + "/") else str(path)


# ----------------------------------------------------------------------------------------------------------------
# The decision

def choose(times: StepTimes) -> str:
    """fp32 or bf16 from measured step times (on a CPU with native bf16): see the module docstring."""
    if times.ended == "huge":
        return "bf16"  # the ISA rule: native bf16 matmuls win where matmuls dominate
    if times.fp32_s is None or times.bf16_s is None:
        return "fp32"
    return "bf16" if times.bf16_s <= (1.0 - PROBE_MARGIN) * times.fp32_s else "fp32"


def shape_key(model_cfg: Any, micro_batch_size: int) -> dict:
    """What the step's cost depends on: the model config (dataclass) without the keys in _NOT_COMPUTE (hidden size,
    layers, heads, KV heads, vocab, seq len, the whole FFN config: type, width, experts, top-k, ...), and the
    micro-batch size."""
    cfg = dataclasses.asdict(model_cfg)
    ffn = {k: v for k, v in (cfg.pop("ffn", None) or {}).items() if k not in _NOT_COMPUTE}
    model = {k: v for k, v in cfg.items() if k not in _NOT_COMPUTE}
    return {"model": {**model, "ffn": ffn}, "micro_batch_size": int(micro_batch_size)}


def cache_key(shape: dict) -> str:
    """The machine part (CPU model + ISA, torch threads, torch version) and a digest of the shape."""
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{device_name('cpu')}|threads={torch.get_num_threads()}|torch={torch.__version__}|{digest}"


def probe_dtype(model_cfg: Any, micro_batch_size: int, *, cache: bool = True) -> DtypeChoice:
    """`auto` on a CPU with native bf16: the cached choice for this machine and shape, else a fresh measurement
    (`measure_step_times`), cached. Concurrent runs wait for one probe (a lock) instead of sharing cores with it."""
    shape = shape_key(model_cfg, micro_batch_size)
    if not cache:
        return _measure_and_choose(model_cfg, micro_batch_size, None)
    key, path = cache_key(shape), cache_dir() / _CACHE_FILE
    with _cache_lock(_LOCK_FILE):
        entries = _read_cache(path)
        hit = entries.get(key)
        if isinstance(hit, dict) and hit.get("dtype") in ("fp32", "bf16"):
            return DtypeChoice(hit["dtype"], "cached", _ms(hit.get("fp32_ms")), _ms(hit.get("bf16_ms")), str(path))
        choice = _measure_and_choose(model_cfg, micro_batch_size, str(path))
        if choice.source in ("measured", "huge"):
            entries[key] = {"dtype": choice.dtype, "source": choice.source, "fp32_ms": choice.fp32_ms,
                            "bf16_ms": choice.bf16_ms, "contended": choice.contended,
                            "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "shape": shape}
            if not _write_cache(path, entries):
                choice = dataclasses.replace(choice, cache_path=None)
        return choice


def _measure_and_choose(model_cfg: Any, micro_batch_size: int, cache_path: Optional[str]) -> DtypeChoice:
    try:
        times = measure_step_times(model_cfg, micro_batch_size)
    except Exception as e:  # noqa: BLE001 -- a failed probe must not fail the run: fall back to the ISA rule
        cause = " ".join(str(e).split())[:200] or type(e).__name__
        return DtypeChoice("bf16", "failed", note=f"probe failed: {cause}; the CPU has native bf16")
    ms = (lambda s: None if s is None else s * 1e3)
    source = "huge" if times.ended == "huge" else "measured"
    return DtypeChoice(choose(times), source, ms(times.fp32_s), ms(times.bf16_s), cache_path,
                       contended=times.contended)


def _ms(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------------------------
# The measurement

def measure_step_times(model_cfg: Any, micro_batch_size: int, *, warmup: Optional[int] = None,
                       timed: int = PROBE_TIMED, step_limit_s: float = PROBE_STEP_LIMIT_S,
                       huge_s: float = PROBE_HUGE_S, budget_s: float = PROBE_BUDGET_S,
                       clock: Callable[[], float] = time.perf_counter) -> StepTimes:
    """Seconds per training step (forward + loss + backward, gradients dropped) of `model_cfg`'s model on random
    token ids of shape micro_batch_size × max_seq_len, fp32 vs bf16 autocast on the CPU: see the module docstring for
    the order, warm-up (at least the cold first round), best-of and bounds. The caller's RNG state is unchanged."""
    from model.model_minimind import MiniMindForCausalLM

    with torch.random.fork_rng(devices=[]):  # model init and dropout draw from the global RNG
        torch.manual_seed(0)
        model = MiniMindForCausalLM(model_cfg).train()
        try:
            n_warm = warmup if warmup is not None else (PROBE_WARMUP_MOE if model.moe_layers() else
                                                        PROBE_WARMUP_DENSE)
            load = _OtherLoad()
            times = _rounds(model, model_cfg, micro_batch_size, max(1, n_warm), max(1, timed), step_limit_s,
                            huge_s, budget_s, clock)
            return dataclasses.replace(times, contended=load.cores() > _free_cores() + CONTENDED_CORES)
        finally:
            model.zero_grad(set_to_none=True)
            del model
            gc.collect()


def _free_cores() -> int:
    """Cores others can use without touching ours (as train/hardware.py counts them)."""
    return max(0, (os.cpu_count() or 1) - torch.get_num_threads())


def _rounds(model: torch.nn.Module, model_cfg: Any, micro_batch_size: int, n_warm: int, timed: int,
            step_limit_s: float, huge_s: float, budget_s: float, clock: Callable[[], float]) -> StepTimes:
    gen = torch.Generator().manual_seed(0)  # batches from a private generator: the global RNG is not advanced
    best: dict[str, float] = {"fp32": math.inf, "bf16": math.inf}
    start, n_rounds = clock(), n_warm + timed
    for i in range(n_rounds):
        x_BT = torch.randint(0, model_cfg.vocab_size, (micro_batch_size, model_cfg.max_seq_len), generator=gen)
        y_BT = torch.randint(0, model_cfg.vocab_size, (micro_batch_size, model_cfg.max_seq_len), generator=gen)
        pair: dict[str, float] = {}
        # fp32 first on even rounds, bf16 first on odd ones: neither always runs right after the other
        for name in (("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")):
            pair[name] = _timed_step(model, x_BT, y_BT, name, clock)
            if i == 0 and name == "fp32" and pair[name] > huge_s:
                return StepTimes(pair[name], None, "huge")
        if i >= n_warm:
            best = {name: min(best[name], pair[name]) for name in best}
        if i >= 1 and pair["fp32"] > step_limit_s:  # a large model: one warm pair is enough, and all it can afford
            return StepTimes(min(best["fp32"], pair["fp32"]), min(best["bf16"], pair["bf16"]), "short")
        if i + 1 < n_rounds and clock() - start > budget_s:
            if i < n_warm:  # still warming up: the last pair is all there is
                return StepTimes(pair["fp32"], pair["bf16"], "budget")
            return StepTimes(best["fp32"], best["bf16"], "budget")
    return StepTimes(best["fp32"], best["bf16"])


def _timed_step(model: torch.nn.Module, x_BT: torch.Tensor, y_BT: torch.Tensor, dtype: str,
                clock: Callable[[], float]) -> float:
    """One training step as the trainer runs it (autocast around forward and loss, backward outside), in seconds."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    t0 = clock()
    with autocast:
        out = model(x_BT, y_BT)
        objective = out.loss if out.aux_loss is None else out.loss + out.aux_loss
    objective.backward()
    seconds = clock() - t0
    model.zero_grad(set_to_none=True)
    return seconds


# ----------------------------------------------------------------------------------------------------------------
# The cache file: {"format": 1, "choices": {key: {"dtype", "source", "fp32_ms", "bf16_ms", "measured", "shape"}}}

def _read_cache(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or corrupt: measure, then rewrite it
    if not isinstance(doc, dict) or doc.get("format") != _CACHE_FORMAT or not isinstance(doc.get("choices"), dict):
        return {}
    return doc["choices"]


def _write_cache(path: Path, entries: dict) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"format": _CACHE_FORMAT, "choices": entries}, indent=1, default=str) + "\n",
                     error=None)
        return True
    except OSError:
        return False  # an unwritable cache only costs a probe next time
