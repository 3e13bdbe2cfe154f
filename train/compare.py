"""FFN comparison sweeps, run: train every planned run that is not finished (the tuning grid first, then every seed
at each variant's chosen point), then write the report. Planning is train/plan.py; the report train/report.py;
training runs as local jobs or Slurm jobs train/launch.py (without a launcher they train here, one after the other).
"""
from __future__ import annotations

import sys
from typing import Optional

from train.config import RunConfig, read_yaml
from train.errors import ConfigError, UserError
from train.plan import PlannedRun, SweepPlan, check_shared, resolve_selection, run_finished
from train.sweep import flatten

# Run settings that may differ between a run directory's config.yaml and the plan without changing its result.
IGNORED_ON_RESUME = {"train.resume", "train.num_threads", "train.compile", "train.log_interval", "train.ckpt_interval",
                     "train.keep_last", "train.peak_flops", "train.device", "train.parallel"}


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


DIVERGED = "diverged"


def _todo(runs: list[PlannedRun], label: str) -> list[tuple[str, PlannedRun]]:
    """(progress tag, run) for every run that still has to train; finished ones are skipped (and say so)."""
    todo = []
    for i, run in enumerate(runs, 1):
        check_existing_run(run)
        tag = f"[{label} {i}/{len(runs)}]"
        if run_finished(run):
            print(f"{tag} {run.name}: finished earlier, skipped ({run.cfg.out_dir})", flush=True)
        else:
            todo.append((tag, run))
    return todo


def _train_all(runs: list[PlannedRun], failed: dict[str, str], label: str, launcher=None) -> None:
    todo = _todo(runs, label)
    if launcher is not None:  # local jobs or Slurm (train/launch.py): any failure is that run's own
        failed.update(launcher.train(todo))
        return
    from train.trainer import TrainingDiverged
    for tag, run in todo:
        print(f"{tag} {run.name}: training -> {run.cfg.out_dir}", flush=True)
        try:
            train_run(run.cfg)
        except TrainingDiverged as e:  # other errors (config, data, checkpoint) would hit every run: stop
            print(f"warning: {run.name} diverged, the sweep goes on without it: {e}", file=sys.stderr)
            failed[run.name] = DIVERGED


def failure_message(failed: dict[str, str]) -> str:
    diverged = sorted(n for n, why in failed.items() if why == DIVERGED)
    other = sorted(n for n, why in failed.items() if why != DIVERGED)
    parts = [f"{len(diverged)} run(s) diverged ({', '.join(diverged)})"] if diverged else []
    if other:
        parts.append(f"{len(other)} run(s) failed: " + ", ".join(f"{n} ({failed[n]})" for n in other))
    return "; ".join(parts) + "; the report lists them as missing"


def run_sweep(plan: SweepPlan, command: str = "", report_only: bool = False, launcher=None,
              collect: bool = False) -> Optional[dict]:
    """Train every planned run that has no final metrics yet (resuming interrupted ones): the tuning grid first,
    then every seed at each variant's chosen point; then write the report.

    launcher (train/launch.py): None trains here, one run after the other; a LocalPool or a waiting SubmititLauncher
    trains each phase's runs as jobs and returns when they all ended. A SubmititLauncher that does not wait
    (--no-wait) only submits what can run now and returns None (no report); `collect=True` (--collect) then writes the
    report from the runs on disk and submits the chosen points' runs of variants whose tuning has finished."""
    from train.report import build_report
    for run in plan.all_runs:
        check_existing_run(run)
    failed: dict[str, str] = {}
    if collect:
        failed.update(launcher.ended_failures(plan.runs))
        if plan.sweep.tune is not None:
            resolve_selection(plan, frozenset(failed))
            check_shared(plan)
            launcher.train(_todo([r for r in plan.runs if r.reported and not r.tuning
                                  and not launcher.submitted(r.name)], "run"))
    elif not report_only and launcher is not None and not launcher.waits:
        todo = _todo([r for r in plan.runs if r.tuning], "tune") if plan.sweep.tune is not None else []
        launcher.train(todo + _todo([r for r in plan.runs if r.reported and not r.tuning], "run"))
        more = " (then the chosen points' runs)" if plan.sweep.tune is not None else ""
        print(f"submitted{more}: `--collect` writes the report from the finished runs; the same command again "
              "resubmits failed runs", flush=True)
        return None
    elif not report_only:
        if plan.sweep.tune is not None:
            _train_all([r for r in plan.runs if r.tuning], failed, "tune", launcher)
            resolve_selection(plan, frozenset(failed))
            check_shared(plan)
        _train_all([r for r in plan.runs if r.reported and not r.tuning], failed, "run", launcher)
    doc = build_report(plan, command)
    if collect:
        waiting = [r.name for r in plan.runs if (r.reported or r.tuning) and r.name not in failed
                   and not run_finished(r)]
        if waiting or plan.pending:
            later = f", {plan.pending} more wait for their variant's tuning" if plan.pending else ""
            print(f"{len(waiting)} run(s) queued or running{later}: --collect again later", flush=True)
    if failed:
        raise UserError(failure_message(failed))
    return doc
