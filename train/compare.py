"""FFN comparison sweeps, run: train every planned run that is not finished (the tuning grid first, then every seed
at each variant's chosen point), then write the report. Planning is train/plan.py; the report train/report.py.
"""
from __future__ import annotations

import sys

from train.config import RunConfig, read_yaml
from train.errors import ConfigError, UserError
from train.plan import PlannedRun, SweepPlan, check_shared, resolve_selection, run_finished
from train.sweep import flatten

# Run settings that may differ between a run directory's config.yaml and the plan without changing its result.
IGNORED_ON_RESUME = {"train.resume", "train.num_threads", "train.compile", "train.log_interval", "train.ckpt_interval",
                     "train.keep_last", "train.peak_flops", "train.device"}


def check_existing_run(run: PlannedRun) -> None:
    """Refuse to skip or resume a run directory that was trained with different settings (e.g. a smoke test with
    train.max_steps=20 in the same sweep directory): its numbers would silently enter the report."""
    path = run.cfg.out_dir / "config.yaml"
    if not path.is_file():
        return
    old = flatten(read_yaml(path))
    new = flatten(run.cfg.to_dict())
    for key in sorted(set(old) | set(new)):
        if key in IGNORED_ON_RESUME or key.startswith("wandb."):
            continue
        if key == "model.vocab_size" and new.get(key) is None:
            continue  # resolved from the tokenizer by the trainer
        if old.get(key) != new.get(key):
            raise ConfigError(f"{run.cfg.out_dir} was trained with {key}={old.get(key)!r} but this sweep asks for "
                              f"{new.get(key)!r}; delete that run directory or give the sweep another out_dir")


def train_run(cfg: RunConfig) -> dict:
    from train.trainer import train
    return train(cfg)


def _train_all(runs: list[PlannedRun], failed: set, label: str) -> None:
    from train.trainer import TrainingDiverged
    for i, run in enumerate(runs, 1):
        check_existing_run(run)
        if run_finished(run):
            print(f"[{label} {i}/{len(runs)}] {run.name}: finished earlier, skipped ({run.cfg.out_dir})", flush=True)
            continue
        print(f"[{label} {i}/{len(runs)}] {run.name}: training -> {run.cfg.out_dir}", flush=True)
        try:
            train_run(run.cfg)
        except TrainingDiverged as e:  # other errors (config, data, checkpoint) would hit every run: stop
            print(f"warning: {run.name} diverged, the sweep goes on without it: {e}", file=sys.stderr)
            failed.add(run.name)


def run_sweep(plan: SweepPlan, command: str = "", report_only: bool = False) -> dict:
    """Train every planned run that has no final metrics yet (resuming interrupted ones): the tuning grid first,
    then every seed at each variant's chosen point; then write the report."""
    from train.report import build_report
    for run in plan.all_runs:
        check_existing_run(run)
    failed: set[str] = set()
    if not report_only:
        if plan.sweep.tune is not None:
            _train_all([r for r in plan.runs if r.tuning], failed, "tune")
            resolve_selection(plan, frozenset(failed))
            check_shared(plan)
        _train_all([r for r in plan.runs if r.reported and not r.tuning], failed, "run")
    doc = build_report(plan, command)
    if failed:
        raise UserError(f"{len(failed)} run(s) diverged ({', '.join(sorted(failed))}); the report lists them as "
                        "missing")
    return doc
