"""Training-step benchmark: tokens/s, MFU against a matmul peak measured in the same run, memory, time split.

A bench file (configs/bench/*.yaml) looks like a compare sweep without seeds:

    base: ../base.yaml             # training config the variants start from (relative to this file)
    overrides: {model.hidden_size: 512, train.dtype: bf16}   # applied to every variant
    steps: 10                      # timed steps per variant (--steps)
    warmup: 2                      # untimed steps per variant first (compile, allocator, kernel selection)
    baseline: swiglu               # speed ratios are against this variant (default: the first one)
    variants:
      swiglu: {model.ffn.type: glu}
      moe8x2: {model.ffn.type: moe, model.ffn.n_experts: 8, model.ffn.top_k: 2}

A plain training config is accepted too: it is benchmarked as one variant named after its FFN. Per variant:
base + overrides + variant overrides + command-line overrides. No prepared data: random token ids of the model's
vocab size (model.vocab_size, else data.tokenizer.vocab_size).

Method (all in one process): every variant is built and warmed up in turn (its peak memory is measured here), then
the timed steps go round-robin over the variants, with one pass of the matmul-peak microbenchmark per round, so that
machine noise hits everything alike. A step is exactly the trainer's: grad_accum × (autocast forward + loss +
backward), gradient clipping, optimizer step (train/optim.build_optimizer), router-bias update, zero_grad.
`mfu` is against that in-run peak of the model's own shapes (the best pass of the run); `mfu_paired` is the median
over rounds of each round's steps against that round's own pass (on a shared machine the best pass catches a quiet
moment and `mfu` reads low); `train_mfu` is against `machine_peak_flops`, the cached square-matmul peak the
trainer's metrics.jsonl uses (train/hardware.py), so the two can be compared. `breakdown` splits PROFILED_STEPS
steps (after timing) into matmul / attention / everything else (train/step_profile.py: eager CPU steps by an op
clock, compiled or GPU steps by torch.profiler, `method` says which); `minor_faults_per_step` (timed, and in
`breakdown` for its steps) counts first touches of new memory.
"""
from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from train.compiler import compile_for_training, resolve_compile
from train.bench_memory import MemoryMeter
from train.config import RunConfig, ffn_label
from train.config_load import load_config, read_yaml
from train.errors import ConfigError
from train.hardware import cpu_info, device_name, matmul_peak_flops, time_best
from train.runtime import clip_grad_norm, setup_runtime
from train.step_profile import PROFILED_STEPS, minor_faults, op_table, profile_calls, step_breakdown, time_ops

REQUIRED_KEYS = ("variant", "tokens_per_s", "mfu", "peak_matmul_flops", "step_ms_median", "peak_mem_bytes")


class BenchFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str
    description: Optional[str] = None
    overrides: dict[str, Any] = {}
    steps: int = 10
    warmup: int = 2
    baseline: Optional[str] = None
    variants: dict[str, dict[str, Any]]

    @field_validator("variants", mode="before")
    @classmethod
    def _empty_variant(cls, value: Any) -> Any:  # `name:` with nothing after it = no overrides
        return {k: (v or {}) for k, v in value.items()} if isinstance(value, dict) else value


@dataclass
class BenchPlan:
    variants: dict[str, RunConfig]
    steps: int
    warmup: int
    baseline: str


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _as_overrides(d: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in _flatten(d).items()]  # JSON is valid YAML: values round-trip


def load_bench(path: str | Path, cli_overrides: list[str] = (), only: Optional[list[str]] = None,
               steps: Optional[int] = None, warmup: Optional[int] = None) -> BenchPlan:
    """Resolve the bench file (or plain training config) into one validated RunConfig per chosen variant."""
    path = Path(path)
    data = read_yaml(path)
    if "variants" not in data:  # a plain training config: one variant
        cfg = load_config(path, list(cli_overrides))
        configs = {ffn_label(cfg.model.ffn): cfg}
        plan = BenchPlan(configs, 10, 2, next(iter(configs)))
    else:
        try:
            bench = BenchFile.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"{path}: {loc}: {first['msg']} (bench file keys: "
                              f"{', '.join(BenchFile.model_fields)})") from None
        if not bench.variants:
            raise ConfigError(f"{path}: variants: at least one variant is needed")
        base = path.parent / bench.base
        if not base.is_file():
            raise ConfigError(f"{path}: base training config not found: {base}")
        common = _as_overrides(bench.overrides)
        configs = {name: load_config(base, common + _as_overrides(over) + list(cli_overrides))
                   for name, over in bench.variants.items()}
        baseline = bench.baseline or next(iter(configs))
        if baseline not in configs:
            raise ConfigError(f"{path}: baseline '{baseline}' is not a variant; variants: {', '.join(configs)}")
        plan = BenchPlan(configs, bench.steps, bench.warmup, baseline)
    if only:
        unknown = [v for v in only if v not in plan.variants]
        if unknown:
            raise ConfigError(f"--variants: unknown {', '.join(unknown)}; valid: {', '.join(plan.variants)}")
        plan.variants = {k: v for k, v in plan.variants.items() if k in only}
        if plan.baseline not in plan.variants:
            plan.baseline = next(iter(plan.variants))
    plan.steps = plan.steps if steps is None else steps
    plan.warmup = plan.warmup if warmup is None else warmup
    if plan.steps < 1 or plan.warmup < 0:
        raise ConfigError(f"need steps >= 1 and warmup >= 0, got steps={plan.steps}, warmup={plan.warmup}")
    return plan


# ----------------------------------------------------------------------------------------------------------------
# Matmul peak: the run's dtype, the model's own projection shapes at B·T rows; the best of all passes.

def matmul_shapes(model: torch.nn.Module, rows: int) -> set[tuple[int, int, int]]:
    """(rows, in, out) of every projection: nn.Linear layers and stacked MoE expert weights (as one dense layer)."""
    shapes = set()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and min(m.in_features, m.out_features) >= 64:  # skips the tiny router
            shapes.add((rows, m.in_features, m.out_features))
        for name in ("w_up", "w_down"):
            w = getattr(m, name, None)
            if isinstance(w, torch.nn.Parameter) and w.dim() == 3:
                shapes.add((rows, w.shape[2], w.shape[1]))
    return shapes


class MatmulPeak:
    """Best FLOP/s over the three matmuls of a linear layer's training step (forward x·Wᵀ, input gradient g·W,
    weight gradient gᵀ·x) at each shape: kernels can differ a lot by layout (bf16 on AVX2-only CPUs: >10x). Each
    pass times every matmul once (`train.hardware.time_best`); the best over all passes is kept."""

    def __init__(self, shapes: set, dtype: torch.dtype, device: torch.device):
        gen = torch.Generator(device=device).manual_seed(0)
        self.device = device
        self.operands = [tuple(torch.randn(*shape, device=device, generator=gen).to(dtype)
                               for shape in ((m, k), (n, k), (m, n))) for m, k, n in sorted(shapes)]
        self.best, self.best_shape = 0.0, None

    def run_pass(self) -> float:
        """-> this pass's best FLOP/s (the machine's speed right now, for the round's paired MFU)."""
        pass_best = 0.0
        for x_MK, w_NK, g_MN in self.operands:
            for name, fn in (("forward", lambda: F.linear(x_MK, w_NK)), ("grad_input", lambda: g_MN @ w_NK),
                             ("grad_weight", lambda: g_MN.t() @ x_MK)):
                flops = 2 * x_MK.shape[0] * x_MK.shape[1] * w_NK.shape[0] / time_best(fn, self.device)
                pass_best = max(pass_best, flops)
                if flops > self.best:
                    self.best, self.best_shape = flops, (x_MK.shape[0], x_MK.shape[1], w_NK.shape[0], name)
        return pass_best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------
# One variant: model, optimizer, a fixed random batch, and the trainer's step with timers.

@dataclass
class Variant:
    name: str
    cfg: RunConfig
    model: torch.nn.Module
    step_model: Any
    optimizer: torch.optim.Optimizer
    batches: list
    tokens_per_step: int
    compile_mode: str = "off"
    times: dict = field(default_factory=lambda: {"step": [], "forward": [], "backward": [], "optimizer": []})
    peak_mem_bytes: int = 0


def build_variant(name: str, cfg: RunConfig, rt) -> Variant:
    from model.model_minimind import MiniMindForCausalLM
    from train.optim import build_optimizer

    vocab = cfg.model.vocab_size or cfg.data.tokenizer.vocab_size
    cfg = cfg.model_copy(update={"model": replace(cfg.model, vocab_size=vocab)})
    t = cfg.train
    torch.manual_seed(t.seed)
    model = MiniMindForCausalLM(cfg.model).to(rt.device).train()
    optimizer = build_optimizer(model, t)
    compile_mode = resolve_compile(t.compile, max(1, t.max_steps or 1))
    step_model = compile_for_training(model, model, compile_mode)
    gen = torch.Generator().manual_seed(t.seed)
    shape = (t.micro_batch_size, cfg.model.max_seq_len)
    batches = [(torch.randint(0, vocab, shape, generator=gen).to(rt.device),
                torch.randint(0, vocab, shape, generator=gen).to(rt.device)) for _ in range(t.grad_accum)]
    return Variant(name, cfg, model, step_model, optimizer, batches, t.grad_accum * shape[0] * shape[1], compile_mode)


def train_step(v: Variant, rt) -> None:
    """The trainer's optimizer step (train/trainer.py: Trainer._train_step without DDP/GradScaler/logging)."""
    t, device = v.cfg.train, rt.device
    t0 = time.perf_counter()
    fwd = bwd = 0.0
    loss_sum = torch.zeros((), device=device)
    for x_BT, y_BT in v.batches:
        with rt.autocast():
            out = v.step_model(x_BT, y_BT)
            objective = (out.loss + out.aux_loss) / len(v.batches)
        _sync(device)
        t1 = time.perf_counter()
        objective.backward()
        loss_sum += out.loss.detach().float()
        _ = out.aux_losses  # the trainer reads the MoE balancing losses as floats every micro-step
        _sync(device)
        t2 = time.perf_counter()
        fwd, bwd, t0 = fwd + (t1 - t0), bwd + (t2 - t1), t2
    clip_grad_norm(v.model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
    float(loss_sum)
    v.optimizer.step()
    v.model.after_optimizer_step()
    v.optimizer.zero_grad(set_to_none=True)
    _sync(device)
    opt = time.perf_counter() - t0
    for key, value in (("forward", fwd), ("backward", bwd), ("optimizer", opt), ("step", fwd + bwd + opt)):
        v.times[key].append(value)


# ----------------------------------------------------------------------------------------------------------------

def run_bench(plan: BenchPlan, profile_top: int = 0,
              log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> list[dict]:
    first = next(iter(plan.variants.values())).train
    for name, cfg in plan.variants.items():  # one process, one device, one precision, one thread count
        for key in ("device", "dtype", "num_threads"):
            if getattr(cfg.train, key) != getattr(first, key):
                raise ConfigError(f"variant '{name}': train.{key} differs from the other variants; a bench run "
                                  f"uses one {key} (run the bench once per {key})")
    rt = setup_runtime(first.device, first.dtype, first.num_threads)
    dtype = rt.amp_dtype or torch.float32
    meter = MemoryMeter(rt.device)
    variants: list[Variant] = []
    for name, cfg in plan.variants.items():
        meter.start()
        v = build_variant(name, cfg, rt)
        log(f"[bench] {name}: {v.model.param_counts()['active'] / 1e6:.2f}M active params, warm-up "
            f"{plan.warmup} step(s)")
        for _ in range(plan.warmup):
            train_step(v, rt)
        v.peak_mem_bytes = meter.peak()
        v.times = {k: [] for k in v.times}
        variants.append(v)

    machine_peak = matmul_peak_flops(rt.device, rt.dtype)  # the trainer's MFU denominator (cached per machine)
    shapes = set().union(*(matmul_shapes(v.model, v.batches[0][0].numel()) for v in variants))
    peak = MatmulPeak(shapes, dtype, rt.device)
    peak.run_pass()  # warm-up: kernel selection, first-touch of the operands
    peak.best = 0.0
    round_peaks = []  # each round's own peak: the MFU of a round's steps against the speed the machine had then
    faults = {v.name: 0 for v in variants}
    for step in range(plan.steps):
        for v in variants:
            before = minor_faults()
            train_step(v, rt)
            faults[v.name] += minor_faults() - before
        round_peaks.append(peak.run_pass())
        log(f"[bench] round {step + 1}/{plan.steps}: " +
            ", ".join(f"{v.name} {v.times['step'][-1] * 1e3:.0f} ms" for v in variants) +
            f"; matmul peak so far {peak.best / 1e9:.1f} GFLOP/s")
    results = [_result(v, variants, plan, rt, peak, meter.source, machine_peak, round_peaks) for v in variants]
    for v, r in zip(variants, results):  # after timing: neither clock's overhead enters the timed steps
        r["minor_faults_per_step"] = faults[v.name] / plan.steps
        times, v.times = v.times, {k: [] for k in v.times}  # the breakdown's steps are not recorded
        step, prof = functools.partial(train_step, v, rt), None
        before = minor_faults()
        if rt.device.type == "cpu" and v.compile_mode == "off":  # the op clock: no profiler page faults
            r["breakdown"] = time_ops(step, PROFILED_STEPS)
        else:  # compiled code and device time: only the profiler sees them
            prof = profile_calls(step, PROFILED_STEPS, rt.device.type)
            r["breakdown"] = step_breakdown(prof.events(), rt.device.type, PROFILED_STEPS)
        r["breakdown"]["minor_faults_per_step"] = (minor_faults() - before) / PROFILED_STEPS
        if profile_top:
            prof = prof or profile_calls(step, PROFILED_STEPS, rt.device.type)
            log(f"[bench] profile of {PROFILED_STEPS} steps of {v.name}:\n"
                f"{op_table(prof, rt.device.type, profile_top)}")
        v.times = times
    return results


def _quantile(xs: list[float], q: float) -> float:
    xs, pos = sorted(xs), q * (len(xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _result(v: Variant, variants: list[Variant], plan: BenchPlan, rt, peak: MatmulPeak, mem_source: str,
            machine_peak: float, round_peaks: list[float]) -> dict:
    base = next(b for b in variants if b.name == plan.baseline)
    step = v.times["step"]
    median = statistics.median(step)
    tok_s = v.tokens_per_step / median
    fpt = v.model.flops_per_token(v.cfg.model.max_seq_len)
    counts = v.model.param_counts()
    # paired per-round ratios: both steps of a round saw the same machine load
    ratios = [(v.tokens_per_step / a) / (base.tokens_per_step / b) for a, b in zip(step, base.times["step"])]
    # paired MFU: each round's step against that round's matmul pass. The best-of peak of `mfu` comes from the
    # quietest moment of the run while the step is a median, so on a shared machine `mfu` reads low; this does not.
    paired = [fpt * v.tokens_per_step / t / p for t, p in zip(step, round_peaks)]
    return {
        "variant": v.name, "ffn": ffn_label(v.cfg.model.ffn),
        "tokens_per_s": tok_s, "mfu": fpt * tok_s / peak.best, "peak_matmul_flops": peak.best,
        "mfu_paired": statistics.median(paired),
        "peak_matmul_shape": list(peak.best_shape),
        "machine_peak_flops": machine_peak, "train_mfu": fpt * tok_s / machine_peak,
        "step_ms_median": median * 1e3, "step_ms_p25": _quantile(step, 0.25) * 1e3,
        "step_ms_p75": _quantile(step, 0.75) * 1e3, "step_ms_min": min(step) * 1e3, "step_ms_max": max(step) * 1e3,
        **{f"{k}_ms_median": statistics.median(v.times[k]) * 1e3 for k in ("forward", "backward", "optimizer")},
        "tokens_per_s_vs_baseline": statistics.median(ratios), "baseline": base.name,
        "peak_mem_bytes": v.peak_mem_bytes, "peak_mem_source": mem_source,
        "flops_per_token": fpt, "tokens_per_step": v.tokens_per_step,
        "params_total": counts["total"], "params_active": counts["active"],
        "steps": len(step), "warmup": plan.warmup, "device": str(rt.device), "dtype": rt.dtype,
        "threads": torch.get_num_threads(), "compile": v.cfg.train.compile, "torch": torch.__version__,
        "cpu": cpu_info()["model"], "cpu_isa": cpu_info()["isa"],
        **({"gpu": device_name(rt.device)} if rt.device.type == "cuda" else {}),
    }
