"""A sweep's plan as text, with a rough time estimate (what `scripts/compare.py --dry-run` prints).

The estimate: FLOPs / (the matmul peak of this machine in the run's precision × STEP_EFFICIENCY) × the block's
`step_cost`, + RUN_OVERHEAD_S per run (start-up, wandb, checkpoints, samples). STEP_EFFICIENCY was calibrated on a
2-core CPU in fp32 with the main job's model (a dense step reached ~0.4 of the matmul rate); small models on a GPU
reach a much smaller fraction, so expect the estimate to be optimistic there.
"""
from __future__ import annotations

import math

from train.config import RunConfig

STEP_EFFICIENCY = 0.4
RUN_OVERHEAD_S = 10.0


def run_tokens(cfg: RunConfig) -> int:
    """Training tokens of one run: max_tokens (rounded up to whole steps), else max_steps × tokens per step."""
    t = cfg.train
    per_step = t.micro_batch_size * t.grad_accum * cfg.model.max_seq_len
    if t.max_tokens is not None:
        return math.ceil(t.max_tokens / per_step) * per_step
    return t.max_steps * per_step


def eval_tokens_total(cfg: RunConfig) -> int:
    """Validation tokens evaluated over a run (every eval_interval steps, at the end, and the tuning part once);
    an upper bound."""
    t = cfg.train
    steps = run_tokens(cfg) // (t.micro_batch_size * t.grad_accum * cfg.model.max_seq_len)
    return (steps // t.eval_interval + 2) * (t.eval_tokens or 0)


def measure_rate(cfg: RunConfig) -> tuple[float, str]:
    """The matmul peak (FLOP/s) of this machine in the run's precision, and a label saying what was measured."""
    import torch

    from train.hardware import matmul_peak_flops
    device = "cuda" if cfg.train.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    from train.runtime import resolve_dtype
    dtype = resolve_dtype(cfg.train.dtype, device)
    if device == "cpu" and dtype == "fp16":
        dtype = "fp32"
    rate = matmul_peak_flops(device, dtype, cfg.train.num_threads)
    note = "" if cfg.train.device in ("auto", device) else f", config asks for {cfg.train.device}"
    return rate, f"{device} {dtype}{note}"


def estimate_seconds(info, rate: float) -> float:
    from model.registry import ffn_class
    cfg = info.cfg
    flops = info.flops_per_token * (run_tokens(cfg) + eval_tokens_total(cfg) / 3)  # evaluation: forward only
    return flops / (rate * STEP_EFFICIENCY) * ffn_class(cfg.model.ffn.type).step_cost + RUN_OVERHEAD_S


def format_plan(plan, rate: float, rate_label: str) -> str:
    from model.registry import ffn_class
    from train.plan import grid_points, model_vocab
    sweep, cfg = plan.sweep, plan.all_runs[0].cfg
    t = cfg.train
    sizes = sweep.size_names
    points = grid_points(sweep)
    n_levels = len(sweep.levels)
    lines = [f"sweep '{sweep.name}' ({plan.sweep_path}) -> {plan.out_dir}/",
             f"base config {plan.base_path}; baseline '{sweep.baseline}'; parameters matched on {sweep.match_on} "
             f"(sparse blocks on active) within {sweep.param_tolerance:.0%}",
             f"device {t.device}, dtype {t.dtype}, data {cfg.data.corpus}"
             f"{' ' + cfg.data.hf_name if cfg.data.hf_name else ''}; {t.micro_batch_size}×{t.grad_accum} sequences × "
             f"{cfg.model.max_seq_len} tokens per step"]
    if sweep.tune:
        grid = "; ".join(f"{k} ∈ {v}" for k, v in sweep.tune.grid.items())
        lines.append(f"tuning: {grid} ({len(points)} points) per variant{' and size' if sweep.sizes else ''} at seed "
                     f"{sweep.tune_seed}, chosen by the tuning validation blocks; then seeds {plan.seeds} at the "
                     "chosen point (the tuning run is reused for its seed)")
    if sweep.factors:
        lines.append("factor levels (each a sub-sweep: variants ranked, tuned and judged within it): "
                     + "; ".join(f"{k} ∈ {v}" for k, v in sweep.factors.items()))
    if any(i.vocab_estimated for infos in plan.ladder.values() for i in infos.values()):
        lines.append(f"(counts use vocab_size={model_vocab(cfg)[0]} from data.tokenizer.vocab_size; the trained "
                     "tokenizer can end up slightly smaller, which changes only the embedding, equally for all)")
    chosen = list(dict.fromkeys(r.variant for r in plan.runs))
    per_variant_runs = (len(points) + len([s for s in plan.seeds if s != sweep.tune_seed])) if sweep.tune \
        else len(plan.seeds)
    lines += ["", f"{'size':<8}{'variant':<16}{'FFN':<26}{'total':>12}{'active':>12}{'non-emb':>12}{'FLOPs/tok':>12}"
                  f"{'tokens':>12}{'match':>16}{'est./run':>10}"]
    total_s = 0.0
    for size in sizes:
        for info in plan.ladder[size].values():
            c = info.counts
            if not info.matched:
                match = "opted out"
            elif info.name == sweep.baseline:
                match = f"{info.matched_on} (base)"
            else:
                match = f"{info.matched_on} {info.rel_diff:+.2%}"
            sec = estimate_seconds(info, rate)
            runs_here = per_variant_runs * n_levels if info.name in chosen else 0
            total_s += sec * runs_here
            ffn = info.cfg.model.ffn
            line = (f"{size or '-':<8}{info.name:<16}{ffn_class(ffn.type).label(ffn):<26}{c['total']:>12,}"
                    f"{c['active']:>12,}{c['non_embedding']:>12,}{info.flops_per_token:>12,}"
                    f"{run_tokens(info.cfg):>12,}{match:>16}{sec:>9.0f}s")
            lines.append(line + ("" if runs_here else "  (reference only, not run)"))
    n_runs = len(chosen) * len(sizes) * n_levels * per_variant_runs
    shape = (f"{len(chosen)} variants × {len(sizes)} sizes × " + (f"{n_levels} factor levels × " if sweep.factors else "")
             + (f"({len(points)} grid points + {per_variant_runs - len(points)} more seeds)" if sweep.tune
                else f"{len(plan.seeds)} seeds"))
    lines += ["", f"{n_runs} runs = {shape}",
              f"runs planned now: {', '.join(r.name for r in plan.runs)}"
              + (f"; + {plan.pending} after tuning" if plan.pending else ""),
              f"estimated time: {total_s / 60:.1f} min = FLOPs/token × tokens / ({rate / 1e9:.1f} GFLOP/s matmul peak "
              f"of this machine, {rate_label}, × {STEP_EFFICIENCY} assumed step efficiency) × the block's step cost "
              f"(MoE 1.25) + {RUN_OVERHEAD_S:.0f} s per run; rough: ±2× is normal, more on a busy machine"]
    return "\n".join(lines)
