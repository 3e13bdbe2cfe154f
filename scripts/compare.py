"""Compare FFN variants: train every run of a sweep file, then write report.md/report.json/plots.

    python scripts/compare.py --config configs/compare/shakespeare.yaml [key=value ...]
        [--variants gelu,swiglu] [--seeds 0,1] [--out-dir DIR] [--dry-run] [--report-only]

key=value overrides apply to every run (e.g. train.max_steps=20). Finished runs are skipped and an interrupted run
resumes from its last checkpoint, so the same command continues a sweep. --dry-run prints the plan (sizes × tuning
points × seeds × variants, parameter counts, FLOPs/token, tokens, a rough time estimate) and trains nothing;
--report-only rebuilds the report from the runs already on disk.
"""
from __future__ import annotations

import shlex
import sys

from _cli import make_parser, run_main

from train.compare import run_sweep
from train.plan import plan_sweep
from train.errors import ConfigError
from train.estimate import format_plan, measure_rate


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated integers, e.g. 0,1,2; got '{text}'") from None


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
        print(format_plan(plan, *measure_rate(plan.all_runs[0].cfg)))
        return 0
    run_sweep(plan, command="python " + " ".join(shlex.quote(a) for a in sys.argv), report_only=args.report_only)
    return 0


if __name__ == "__main__":
    run_main(main)
