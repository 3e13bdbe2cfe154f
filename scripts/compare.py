"""Compare FFN variants: train every (variant, seed) of a sweep file, then write report.md/report.json/plots.

    python scripts/compare.py --config configs/compare/shakespeare.yaml [key=value ...]
        [--variants gelu,swiglu] [--seeds 0,1] [--out-dir DIR] [--dry-run] [--report-only]

key=value overrides apply to every run (e.g. train.max_steps=20). Finished runs are skipped and an interrupted run
resumes from its last checkpoint, so the same command continues a sweep. --dry-run prints the plan (runs, parameter
counts, FLOPs/token, tokens, a rough time estimate) and trains nothing; --report-only rebuilds the report from the
runs already on disk.
"""
from __future__ import annotations

import math
import shlex
import sys

from _cli import make_parser, run_main

from train.compare import SweepPlan, VariantInfo, model_vocab, plan_sweep, run_sweep
from train.config import RunConfig
from train.errors import ConfigError

# The time estimate of --dry-run: FLOPs / (a square matmul's FLOP/s measured now × STEP_EFFICIENCY), × MOE_SLOWDOWN
# for MoE variants, + RUN_OVERHEAD_S per run (start-up, wandb, checkpoints, samples). Calibrated on a 2-core AMD EPYC
# (AVX2) in fp32 with configs/compare/shakespeare.yaml's model: a dense training step reached ~0.4 of the 512×512
# matmul rate, the 8-expert top-2 MoE ~1.25× the dense step time. Rough, stated assumptions: on a GPU small models
# reach a much smaller fraction of the matmul peak, so expect the estimate to be optimistic there.
STEP_EFFICIENCY = 0.4
MOE_SLOWDOWN = 1.25
RUN_OVERHEAD_S = 10.0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated integers, e.g. 0,1,2; got '{text}'") from None


def run_tokens(cfg: RunConfig) -> int:
    """Training tokens of one run: max_tokens (rounded up to whole steps), else max_steps × tokens per step."""
    t = cfg.train
    per_step = t.micro_batch_size * t.grad_accum * cfg.model.max_seq_len
    if t.max_tokens is not None:
        return math.ceil(t.max_tokens / per_step) * per_step
    return t.max_steps * per_step


def eval_tokens_total(cfg: RunConfig) -> int:
    """Validation tokens evaluated over a run (every eval_interval steps and at the end); an upper bound."""
    t = cfg.train
    steps = run_tokens(cfg) // (t.micro_batch_size * t.grad_accum * cfg.model.max_seq_len)
    return (steps // t.eval_interval + 1) * (t.eval_tokens or 0)


def measure_rate(cfg: RunConfig, seconds: float = 0.2) -> tuple[float, str]:
    """FLOP/s of a square matmul in the run's precision on this machine (n=512 on CPU, 4096 on CUDA; ~0.2 s)."""
    import time

    import torch
    device = "cuda" if cfg.train.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    dtype = cfg.train.dtype if not (device == "cpu" and cfg.train.dtype == "fp16") else "fp32"
    if cfg.train.num_threads and device == "cpu":
        torch.set_num_threads(cfg.train.num_threads)
    n = 4096 if device == "cuda" else 512
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(torch_dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(torch_dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    start, reps = time.perf_counter(), 0
    while reps == 0 or time.perf_counter() - start < seconds:
        a @ b
        sync()
        reps += 1
    rate = 2 * n ** 3 * reps / (time.perf_counter() - start)
    note = "" if cfg.train.device in ("auto", device) else f", config asks for {cfg.train.device}"
    return rate, f"{device} {dtype}{note}"


def estimate_seconds(info: VariantInfo, rate: float) -> float:
    cfg = info.cfg
    flops = info.flops_per_token * (run_tokens(cfg) + eval_tokens_total(cfg) / 3)  # evaluation: forward only
    slowdown = MOE_SLOWDOWN if cfg.model.ffn.type == "moe" else 1.0
    return flops / (rate * STEP_EFFICIENCY) * slowdown + RUN_OVERHEAD_S


def _ffn_label(info: VariantInfo) -> str:
    ffn = info.cfg.model.ffn
    if ffn.type == "moe":
        shared = f"+{ffn.n_shared_experts}s" if ffn.n_shared_experts else ""
        return f"moe {ffn.n_experts}x{ffn.top_k}{shared} {ffn.expert_type}-{ffn.expert_activation}"
    return "none" if ffn.type == "none" else f"{ffn.type} {ffn.activation}"


def format_plan(plan: SweepPlan, rate: float, rate_label: str) -> str:
    sweep, cfg = plan.sweep, plan.runs[0].cfg
    t = cfg.train
    lines = [f"sweep '{sweep.name}' ({plan.sweep_path}) -> {plan.out_dir}/",
             f"base config {plan.base_path}; baseline '{sweep.baseline}'; parameters matched on {sweep.match_on} "
             f"(MoE on active) within {sweep.param_tolerance:.0%}",
             f"every run: {run_tokens(cfg):,} training tokens ({t.micro_batch_size}×{t.grad_accum} sequences × "
             f"{cfg.model.max_seq_len} tokens per step), up to {eval_tokens_total(cfg):,} eval tokens, "
             f"device {t.device}, dtype {t.dtype}, data {cfg.data.corpus}{' ' + cfg.data.hf_name if cfg.data.hf_name else ''}"]
    if any(i.vocab_estimated for i in plan.variants.values()):
        lines.append(f"(counts use vocab_size={model_vocab(cfg)[0]} from data.tokenizer.vocab_size; the trained "
                     "tokenizer can end up slightly smaller, which changes only the embedding, equally for all)")
    n_runs: dict[str, int] = {}
    for r in plan.runs:
        n_runs[r.variant] = n_runs.get(r.variant, 0) + 1
    lines += ["", f"{'variant':<16}{'FFN':<28}{'total':>12}{'active':>12}{'FFN':>12}{'FLOPs/tok':>12}"
                  f"{'match':>16}{'est./run':>10}"]
    total_s = 0.0
    for info in plan.variants.values():
        c = info.counts
        if not info.matched:
            match = "opted out"
        elif info.name == sweep.baseline:
            match = f"{info.matched_on} (base)"
        else:
            match = f"{info.matched_on} {info.rel_diff:+.2%}"
        sec = estimate_seconds(info, rate)
        total_s += sec * n_runs.get(info.name, 0)
        line = (f"{info.name:<16}{_ffn_label(info):<28}{c['total']:>12,}{c['active']:>12,}{c['ffn']:>12,}"
                f"{info.flops_per_token:>12,}{match:>16}{sec:>9.0f}s")
        lines.append(line + ("" if info.name in n_runs else "  (reference only, not run)"))
    lines += ["", f"{len(plan.runs)} runs: {', '.join(r.name for r in plan.runs)}",
              f"estimated time: {total_s / 60:.1f} min = FLOPs/token × tokens / ({rate / 1e9:.1f} GFLOP/s matmul peak "
              f"measured now, {rate_label}, × {STEP_EFFICIENCY} assumed step efficiency; MoE × {MOE_SLOWDOWN}; "
              f"+ {RUN_OVERHEAD_S:.0f} s per run); rough: ±2× is normal, more on a busy machine"]
    return "\n".join(lines)


def main() -> int:
    parser = make_parser("Train and compare FFN variants (a sweep file), then write a report with plots.")
    parser.add_argument("--variants", help="comma-separated subset of the sweep's variants")
    parser.add_argument("--seeds", help="comma-separated seeds instead of the sweep's seeds")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and estimates; train nothing")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from existing runs")
    parser.add_argument("--out-dir", help="sweep directory instead of the sweep's out_dir (default runs/<name>)")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    seeds = _int_list(args.seeds, "--seeds") if args.seeds else None
    plan = plan_sweep(args.config, args.overrides, variants=variants, seeds=seeds, out_dir=args.out_dir)
    if args.dry_run:
        rate, label = measure_rate(plan.runs[0].cfg)
        print(format_plan(plan, rate, label))
        return 0
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    run_sweep(plan, command=command, report_only=args.report_only)
    return 0


if __name__ == "__main__":
    run_main(main)
