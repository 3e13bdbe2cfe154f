"""Compare FFN variants: train every run of a sweep file, then write report.md/report.json/plots.

    python scripts/compare.py --config configs/compare/shakespeare.yaml [key=value ...]
        [--variants gelu,swiglu] [--seeds 0,1] [--out-dir DIR] [--dry-run] [--report-only]
        [--jobs N|auto] [--launcher local|slurm|submitit-local] [--slurm key=value ...] [--no-wait] [--collect]

key=value overrides apply to every run (e.g. train.max_steps=20). Finished runs are skipped and an interrupted run
resumes from its last checkpoint, so the same command continues a sweep. --dry-run prints the plan (sizes × tuning
points × seeds × variants, parameter counts, FLOPs/token, tokens, a rough time estimate) and trains nothing;
--report-only rebuilds the report from the runs already on disk.

--jobs N trains up to N runs at once as child processes (cores // N threads each, or one GPU each); --jobs auto
picks N from the machine (1 at <= 2 cores). --launcher slurm submits every run as a Slurm job through submitit, with
the sweep file's `launcher: {slurm: {...}}` options and --slurm key=value on top (partition, time, cpus_per_run,
gpus_per_run, mem, account, qos, array_parallelism); it waits for the jobs, or with --no-wait submits and exits, and
--collect later writes the report from the finished runs and submits the chosen points' runs once a variant's tuning
is done. --launcher submitit-local runs the same jobs through submitit on this machine.

A sweep with `parent:` (train/sweep.py) trains its parent runs (parent-s<seed>) first; with --no-wait only they are
submitted until they all finished, then the same command or --collect submits the variants.
"""
from __future__ import annotations

import shlex
import sys

from _cli import make_parser, run_main

from train.compare import format_parents, run_sweep
from train.plan import plan_sweep
from train.errors import ConfigError
from train.estimate import format_plan, measure_rate
from train.launch import build_launcher, parse_jobs


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
    parser.add_argument("--jobs", default="1", metavar="N|auto",
                        help="train up to N runs at once as local processes (cores // N threads each, one GPU each "
                             "when there are GPUs); auto: from the machine (1 at <= 2 cores); default 1")
    parser.add_argument("--launcher", default="local", choices=["local", "slurm", "submitit-local"],
                        help="local (default), slurm: one Slurm job per run through submitit, submitit-local: the "
                             "same jobs through submitit on this machine")
    parser.add_argument("--slurm", action="append", default=[], metavar="key=value",
                        help="Slurm option over the sweep file's launcher.slurm (repeatable): partition, time, "
                             "cpus_per_run, gpus_per_run, mem, account, qos, array_parallelism")
    parser.add_argument("--no-wait", action="store_true", help="with --launcher slurm: submit, then exit")
    parser.add_argument("--collect", action="store_true",
                        help="with --launcher slurm: write the report from the finished runs and submit the chosen "
                             "points' runs of variants whose tuning finished")
    args = parser.parse_args()
    jobs = parse_jobs(args.jobs)
    if args.collect and (args.report_only or args.no_wait or args.dry_run):
        raise ConfigError("--collect goes without --report-only, --no-wait and --dry-run")
    if args.collect and args.launcher == "local":
        raise ConfigError("--collect needs --launcher slurm (or submitit-local): it gathers submitted jobs")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    seeds = _int_list(args.seeds, "--seeds") if args.seeds else None
    plan = plan_sweep(args.config, args.overrides, variants=variants, seeds=seeds, out_dir=args.out_dir)
    launcher = build_launcher(plan, args.launcher, jobs, args.slurm, wait=not (args.no_wait or args.collect))
    if args.dry_run:
        rate, rate_label = measure_rate(plan.all_runs[0].cfg)
        print(format_plan(plan, rate, rate_label))
        parents = format_parents(plan, rate)
        if parents:
            print(parents)
        if launcher is not None:
            print(f"launcher: {launcher.describe()}")
        return 0
    if launcher is not None and not args.report_only:
        print(f"launcher: {launcher.describe()}", flush=True)
    run_sweep(plan, command="python " + " ".join(shlex.quote(a) for a in sys.argv), report_only=args.report_only,
              launcher=None if args.report_only else launcher, collect=args.collect)
    return 0


if __name__ == "__main__":
    run_main(main)
