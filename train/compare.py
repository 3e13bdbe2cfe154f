"""FFN comparison sweeps, run: train every planned run that is not finished (a sweep's parent runs first, then the
tuning grid, then every seed at each variant's chosen point), then write the report. Planning is train/plan.py; the
report train/report.py; training runs as local jobs or Slurm jobs train/launch.py (without a launcher they train here,
one after the other).
"""
from __future__ import annotations

import sys
from typing import Optional

from train.config import RunConfig
from train.config_load import read_yaml
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


def _train_parents(plan: SweepPlan, failed: dict[str, str], launcher=None) -> None:
    """The sweep's parent runs, before anything else; one that did not finish stops the sweep (its variants would
    all fail to start), with the reason."""
    _train_all(plan.parents, failed, "parent", launcher)
    bad = [p.name for p in plan.parents if p.name in failed]
    if bad:
        raise UserError(f"parent run(s) did not finish: {', '.join(f'{n} ({failed[n]})' for n in bad)}; the variants "
                        "start from them: fix the cause and run the same command again")


def parents_finished(plan: SweepPlan) -> bool:
    return all(run_finished(p) for p in plan.parents)


def format_parents(plan: SweepPlan, rate: float) -> Optional[str]:
    """The --dry-run line on the parent runs (trained first, not reported), or None without any."""
    from types import SimpleNamespace

    from model.registry import ffn_class
    from train.estimate import estimate_seconds, run_tokens
    from train.plan import count_params
    if not plan.parents:
        return None
    cfg = plan.parents[0].cfg
    counts, fpt, _ = count_params(cfg)
    sec = estimate_seconds(SimpleNamespace(cfg=cfg, flops_per_token=fpt), rate)
    return (f"+ {len(plan.parents)} parent runs, trained first (not reported; variants with `parent` start from "
            f"their seed's): {', '.join(p.name for p in plan.parents)} -> {plan.out_dir}/; "
            f"{ffn_class(cfg.model.ffn.type).label(cfg.model.ffn)}, {counts['total']:,} params, "
            f"{run_tokens(cfg):,} tokens each, ~{sec:.0f} s each (+{len(plan.parents) * sec / 60:.1f} min on the "
            "estimate above)")


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
    report from the runs on disk and submits the chosen points' runs of variants whose tuning has finished.

    Parent runs (a sweep's `parent:`) train first; one that fails stops the sweep. Without waiting, only the parents
    are submitted while any is unfinished; once they all finished, the same command (or --collect) submits the rest."""
    from train.report import build_report
    for run in plan.all_runs:
        check_existing_run(run)
    failed: dict[str, str] = {}
    if collect:
        failed.update(launcher.ended_failures(plan.parents + plan.runs))
        if parents_finished(plan):
            if plan.sweep.tune is not None:
                resolve_selection(plan, frozenset(failed))
                check_shared(plan)
            # the chosen points' runs, and with parents every run that waited for them (those never submitted)
            waited = [r for r in plan.runs if r.reported and not r.tuning] if plan.parents or plan.sweep.tune else []
            if plan.parents:
                waited = [r for r in plan.runs if r.tuning] + waited
            launcher.train(_todo([r for r in waited if not launcher.submitted(r.name)], "run"))
    elif not report_only and launcher is not None and not launcher.waits and not parents_finished(plan):
        launcher.train(_todo(plan.parents, "parent"))
        print("submitted the parent runs only: the variants start from them; once they finished, the same command "
              "(or `--collect`) submits the rest", flush=True)
        return None
    elif not report_only and launcher is not None and not launcher.waits:
        todo = _todo([r for r in plan.runs if r.tuning], "tune") if plan.sweep.tune is not None else []
        launcher.train(todo + _todo([r for r in plan.runs if r.reported and not r.tuning], "run"))
        more = " (then the chosen points' runs)" if plan.sweep.tune is not None else ""
        print(f"submitted{more}: `--collect` writes the report from the finished runs; the same command again "
              "resubmits failed runs", flush=True)
        return None
    elif not report_only:
        _train_parents(plan, failed, launcher)
        if plan.sweep.tune is not None:
            _train_all([r for r in plan.runs if r.tuning], failed, "tune", launcher)
            resolve_selection(plan, frozenset(failed))
            check_shared(plan)
        _train_all([r for r in plan.runs if r.reported and not r.tuning], failed, "run", launcher)
    doc = build_report(plan, command)
    if collect and not parents_finished(plan):
        print("parent run(s) not finished yet, the variants are submitted once they all are: --collect again later",
              flush=True)
    elif collect:
        waiting = [r.name for r in plan.runs if (r.reported or r.tuning) and r.name not in failed
                   and not run_finished(r)]
        if waiting or plan.pending:
            later = f", {plan.pending} more wait for their variant's tuning" if plan.pending else ""
            print(f"{len(waiting)} run(s) queued or running{later}: --collect again later", flush=True)
    if failed:
        raise UserError(failure_message(failed))
    return doc
