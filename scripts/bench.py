"""Benchmark full training steps per variant: tokens/s, MFU against a matmul peak measured in the same run, peak
memory and the forward/backward/optimizer split (see train/bench.py for the method and the bench file format).

    python scripts/bench.py --config configs/bench/small.yaml [key=value ...] [--variants a,b] [--steps N] [--json]
    python scripts/bench.py --config configs/tiny.yaml --steps 3          # a plain training config: one variant

Progress goes to stderr; stdout gets a table, or with --json one JSON object per variant per line (JSON Lines) with
at least: variant, tokens_per_s, mfu, peak_matmul_flops, step_ms_median, peak_mem_bytes, cpu and cpu_isa (the CPU
model and its best matmul instructions: AMX, AVX-512-BF16, AVX-512 or AVX2), gpu (on CUDA), machine_peak_flops and
train_mfu (against the cached peak that training runs divide by). "vs base" (JSON: tokens_per_s_vs_baseline) is the
median over rounds of the variant's tokens/s ÷ the baseline's in the same round (paired, so machine noise mostly
cancels: quote this ratio rather than two absolute numbers). mfu_paired (the pMFU column) is the median over rounds
of each round's steps against that round's own matmul pass. After the timed rounds three more steps per variant are
timed operator by operator: `breakdown` splits them into matmul / attention / everything else (elementwise work,
casts, copies, routing, the optimizer), printed under the table (eager CPU steps by a clock around each ATen call,
compiled and GPU steps by torch.profiler: train/step_profile.py says why); --profile N also profiles three steps
and prints their N most expensive operators by self time to stderr.
"""
import json
import sys

from _cli import make_parser, run_main


def format_table(results: list[dict]) -> str:
    head = (f"{'variant':<14} {'tok/s':>9} {'MFU':>6} {'pMFU':>6} {'vs base':>7} {'step ms (p25-p75)':>22} "
            f"{'fwd/bwd/opt ms':>18} {'peak mem':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['variant']:<14} {r['tokens_per_s']:>9,.0f} {r['mfu']:>6.1%} {r['mfu_paired']:>6.1%} "
            f"{r['tokens_per_s_vs_baseline']:>6.2f}x "
            f"{r['step_ms_median']:>8.0f} ({r['step_ms_p25']:.0f}-{r['step_ms_p75']:.0f}) "
            f"{r['forward_ms_median']:>6.0f}/{r['backward_ms_median']:.0f}/{r['optimizer_ms_median']:.0f} "
            f"{r['peak_mem_bytes'] / 2**20:>7.0f}MB")
    r = results[0]
    rows, d_in, d_out, kind = r["peak_matmul_shape"]
    lines.append(f"matmul peak {r['peak_matmul_flops'] / 1e9:.1f} GFLOP/s ({kind} matmul, {rows} rows, {d_in} -> "
                 f"{d_out}); {r['device']} {r['dtype']}, {r['threads']} thread(s), torch "
                 f"{r['torch']}; {r['steps']} timed steps per variant after {r['warmup']} warm-up; memory: "
                 f"{r['peak_mem_source']}; pMFU: median over rounds of the round's step against the round's "
                 f"own matmul pass")
    lines.append(f"breakdown of {r['breakdown']['profiled_steps']} more step(s) per variant, op by op: " + "; ".join(
        f"{x['variant']} matmul {x['breakdown']['matmul_frac']:.0%} / attention {x['breakdown']['attention_frac']:.0%}"
        f" / everything else {x['breakdown']['other_frac']:.0%} of {x['breakdown']['profiled_ms']:.0f} ms per step"
        f" ({x['breakdown']['method']})" for x in results))
    lines.append("minor page faults per step, timed / breakdown steps (torch.profiler's steps fault more: its "
                 "allocations fragment the heap, and that time shows up as the ops that touch new memory): " +
                 ", ".join(f"{x['variant']} {x['minor_faults_per_step']:,.0f} / "
                           f"{x['breakdown']['minor_faults_per_step']:,.0f}" for x in results))
    gpu = f"; GPU {r['gpu']}" if r.get("gpu") else ""
    lines.append(f"CPU {r['cpu']} (matmul ISA {r['cpu_isa']}){gpu}; MFU as training logs it (vs the cached "
                 f"square-matmul peak {r['machine_peak_flops'] / 1e9:.1f} GFLOP/s): " +
                 ", ".join(f"{x['variant']} {x['train_mfu']:.1%}" for x in results))
    return "\n".join(lines)


def main() -> int:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--variants", help="comma-separated subset of the bench file's variants")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default: the bench file's, else 10)")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant first (default: the file's, else 2)")
    parser.add_argument("--json", action="store_true", help="one JSON object per variant per line on stdout")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, print the top N operators of the profiled steps of every variant")
    args = parser.parse_args()

    from train.bench import load_bench, run_bench

    only = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    plan = load_bench(args.config, args.overrides, only, args.steps, args.warmup)
    results = run_bench(plan, profile_top=args.profile)
    if args.json:
        for r in results:
            print(json.dumps(r))
    else:
        print(format_table(results))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    run_main(main)
