"""Sweep planning: one RunConfig per variant × size × tuning point × seed, fairness checks (shared data/budget/
optimizer per seed, parameter matching per size) and per-variant tuning selection. Trains nothing.

The sweep file and its key rules are in train/sweep.py; running in train/compare.py; reading run directories in
train/runs.py. Tuning (a sweep's `tune:` grid): every variant trains once per grid point at the tuning seed; the point
with the lowest *tuning* loss (`tune_loss`: the tuning half of the validation blocks, see train/data/loader.py) is
chosen for that variant and size, and all seeds then run at it. Selection never reads the reporting blocks
(`val_loss`), which are the only numbers a report's tables and verdicts use.

A sweep's `parent:` (train/sweep.py) adds one run per seed, `parent-s<seed>` (SweepPlan.parents: neither reported nor
tuning, trained first by train/compare.py); a variant's override value `parent` for train.init_from or
model.ffn.upcycle_from becomes that seed's parent directory here, and the variant's model is checked against the
parent's planned one (same model for init_from, the upcycling rules for upcycle_from) before anything trains.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from train.config import RunConfig
from train.config_load import load_config, parse_override
from train.errors import ConfigError
from train.runs import is_finished, read_final
from train.sweep import (ALLOWED_VARIANT_KEYS, FORBIDDEN_MODEL_KEYS, PARENT, PARENT_KEYS, SweepConfig,
                         check_parent_value, check_sweep_key, flatten, load_sweep)

@dataclass
class PlannedRun:
    variant: str
    seed: int
    cfg: RunConfig
    size: Optional[str] = None
    point: dict = field(default_factory=dict)  # the tuning-grid values of this run ({} without tuning)
    tuning: bool = False  # a run of the tuning grid (read by selection, through its tune_loss only)
    reported: bool = True  # a run the report's tables use (without tuning: all; with: the chosen point's seeds)
    level: dict = field(default_factory=dict)  # the factor level of this run ({} without factors)

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def level_name(self) -> Optional[str]:
        return tag(self.level) or None


@dataclass
class VariantInfo:
    name: str
    cfg: RunConfig  # the config of its first run (model + budget are the same for every seed and grid point)
    counts: dict  # param_counts() of the model built on the meta device
    flops_per_token: int
    matched: bool
    matched_on: str  # total | active | "-" (opted out)
    vocab_estimated: bool
    rel_diff: Optional[float] = None  # vs the baseline, on matched_on
    size: Optional[str] = None


@dataclass
class Selection:
    """The tuning outcome of one variant at one size: every grid point's tuning loss and the chosen one."""
    variant: str
    size: Optional[str]
    level: Optional[str]
    points: list[dict]
    tune_losses: list[Optional[float]]  # None: not finished (or diverged)
    chosen: Optional[int] = None  # index into points
    on_edge: list[str] = field(default_factory=list)  # tuned keys whose chosen value is the grid's min or max


@dataclass
class SweepPlan:
    sweep: SweepConfig
    sweep_path: Path
    base_path: Path
    out_dir: Path
    runs: list[PlannedRun]  # what this invocation trains (final runs appear once their variant's tuning is done)
    variants: dict[str, VariantInfo] = field(default_factory=dict)  # at the largest (or only) size
    cli_overrides: list[str] = field(default_factory=list)
    reference_runs: list[PlannedRun] = field(default_factory=list)  # the baseline's, when --variants leaves it out
    ladder: dict[Optional[str], dict[str, VariantInfo]] = field(default_factory=dict)  # size -> variant -> info
    seeds: list[int] = field(default_factory=list)
    selections: dict[tuple, Selection] = field(default_factory=dict)  # (variant, size, level name) -> tuning
    pending: int = 0  # final runs not planned yet: they wait for their variant's tuning
    parents: list[PlannedRun] = field(default_factory=list)  # the sweep's `parent:` runs, one per seed, trained first

    @property
    def all_runs(self) -> list[PlannedRun]:
        return self.parents + self.runs + self.reference_runs


# ----------------------------------------------------------------------------------------------------------------
# Planning

def _as_override(key: str, value: Any) -> str:
    # JSON is valid YAML, so the value round-trips through load_config's YAML scalar parsing unchanged.
    return f"{key}={json.dumps(value)}"


def grid_points(sweep: SweepConfig) -> list[dict]:
    if sweep.tune is None:
        return [{}]
    keys = list(sweep.tune.grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(sweep.tune.grid[k] for k in keys))]


def tag(values: dict) -> str:
    """A short name part for a tuning point or factor level: {train.lr: 0.002} -> lr0.002, {train.optimizer: muon}
    -> muon."""
    return "-".join(v if isinstance(v, str) else f"{k.split('.')[-1]}{v:g}" if isinstance(v, float)
                    else f"{k.split('.')[-1]}{v}" for k, v in values.items())


def run_name(variant: str, size: Optional[str], point: dict, seed: int, level: Optional[dict] = None) -> str:
    return "-".join(p for p in (variant, size, tag(level or {}), tag(point)) if p) + f"-s{seed}"


def plan_sweep(sweep_path: str | Path, cli_overrides: list[str] = (), variants: Optional[list[str]] = None,
               seeds: Optional[list[int]] = None, out_dir: Optional[str] = None) -> SweepPlan:
    """Resolve every run config and the per-variant parameter counts; trains nothing. With a tuning grid, final runs
    are planned for the variants whose tuning runs are already finished on disk."""
    sweep, base = load_sweep(sweep_path)
    tuned = set(sweep.tune.grid) if sweep.tune else set()
    for text in cli_overrides:
        key, value = parse_override(text)
        check_sweep_key(key, "command line")
        check_parent_value(key, value, "command line")
        if key in tuned:
            raise ConfigError(f"command line: '{key}' is tuned by the sweep (tune:); change the grid instead")
        if key in (sweep.factors or {}):
            raise ConfigError(f"command line: '{key}' is a factor of the sweep (factors:); change its levels instead")
    chosen = list(sweep.variants)
    if variants:
        unknown = [v for v in variants if v not in sweep.variants]
        if unknown:
            raise ConfigError(f"--variants: unknown {', '.join(unknown)}; valid: {', '.join(sweep.variants)}")
        chosen = [v for v in chosen if v in variants]
    run_seeds = list(dict.fromkeys(seeds)) if seeds else list(sweep.seeds)
    if min(run_seeds) < 0:
        raise ConfigError(f"--seeds must be non-negative integers, got {seeds}")
    out = Path(out_dir or sweep.out_dir or Path("runs") / sweep.name)
    plan = SweepPlan(sweep, Path(sweep_path), base, out, [], cli_overrides=list(cli_overrides), seeds=run_seeds)
    everyone = list(dict.fromkeys([sweep.baseline, *chosen]))  # the baseline is always counted (and read)
    for size in sweep.size_names:
        size_over = _size_overrides(plan, size)
        plan.ladder[size] = {}
        for variant in everyone:
            target = plan.runs if variant in chosen else plan.reference_runs
            for level in sweep.levels:
                if sweep.tune is None:
                    target += [_planned(plan, variant, size, size_over, {}, s, level) for s in run_seeds]
                else:
                    target += [replace(_planned(plan, variant, size, size_over, p, sweep.tune_seed, level),
                                       tuning=True, reported=False) for p in grid_points(sweep)]
            first = next(r for r in target if r.variant == variant and r.size == size)
            plan.ladder[size][variant] = _variant_info(sweep, variant, first.cfg, size)
        check_param_match(plan, plan.ladder[size], size)
    plan.variants = plan.ladder[sweep.size_names[-1]]
    plan.parents = _plan_parents(plan, chosen)
    resolve_selection(plan)
    check_shared(plan)
    check_parents(plan)
    return plan


def _size_overrides(plan: SweepPlan, size: Optional[str]) -> list[str]:
    """The size's shape (and budget) overrides; with budget.tokens_per_param, train.max_tokens is r × the baseline's
    non-embedding parameters at this size, the same for every variant."""
    sweep = plan.sweep
    if size is None:
        return []
    over = [_as_override(k, v) for k, v in flatten(sweep.sizes[size] or {}).items()]
    if sweep.budget is not None:
        cfg = _load(plan, sweep.baseline, over, "budget")
        counts, _, _ = count_params(cfg)
        over.append(_as_override("train.max_tokens", int(round(sweep.budget.tokens_per_param
                                                               * counts["non_embedding"]))))
    return over


def _load(plan: SweepPlan, variant: str, middle: list[str], name: str, seed: int = 0) -> RunConfig:
    """base + sweep overrides + `middle` + variant overrides + command line + what the sweep owns."""
    variant_over = [_as_override(k, parent_dir(plan, seed) if k in PARENT_KEYS and v == PARENT else v)
                    for k, v in flatten(plan.sweep.variants[variant].overrides).items()]
    return _load_run(plan, variant, middle + variant_over, name, seed, f"variant '{variant}'")


def _load_run(plan: SweepPlan, label: str, middle: list[str], name: str, seed: int, what: str) -> RunConfig:
    sweep = plan.sweep
    over = [_as_override(k, v) for k, v in flatten(sweep.overrides).items()] + middle
    over += [*plan.cli_overrides, _as_override("name", name), _as_override("train.seed", seed),
             _as_override("train.out_dir", str(plan.out_dir / name)), _as_override("wandb.group", sweep.name),
             _as_override("wandb.tags", [label, sweep.name])]
    try:
        return load_config(plan.base_path, over)
    except ConfigError as e:
        raise ConfigError(f"{plan.sweep_path}: {what}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Parent runs (a sweep's `parent:`)

def parent_dir(plan: SweepPlan, seed: int) -> str:
    """The run directory of a seed's parent, as the variants' configs name it (relative like train.out_dir)."""
    return str(plan.out_dir / f"{PARENT}-s{seed}")


def uses_parent(sweep: SweepConfig, variant: str) -> bool:
    return any(k in PARENT_KEYS and v == PARENT for k, v in flatten(sweep.variants[variant].overrides).items())


def _plan_parents(plan: SweepPlan, chosen: list[str]) -> list[PlannedRun]:
    """One parent per seed that a planned run may use (the tuning seed too), when a chosen variant starts from it."""
    sweep = plan.sweep
    if sweep.parent is None or not any(uses_parent(sweep, v) for v in chosen):
        return []
    over = flatten(sweep.parent.overrides)
    middle = [_as_override(k, v) for k, v in over.items()]
    if "train.max_steps" in over and "train.max_tokens" not in over:
        middle.append(_as_override("train.max_tokens", None))  # its steps, not the variants' token budget
    seeds = dict.fromkeys([*([sweep.tune_seed] if sweep.tune else []), *plan.seeds])
    return [PlannedRun(PARENT, s, _load_run(plan, PARENT, middle, f"{PARENT}-s{s}", s, "parent"), reported=False)
            for s in seeds]


def check_parents(plan: SweepPlan) -> None:
    """Refuse, before the parents train, a variant that could not start from its parent: init_from needs the same
    model config, upcycle_from an MoE that fits the parent's FFN (train/upcycle.py's rules)."""
    from train.upcycle import INIT_KEY, check_upcycle, model_differences
    parents = {parent_dir(plan, p.seed): p for p in plan.parents}
    for run in plan.runs:
        parent = parents.get(run.cfg.train.init_from)
        diff = ", ".join(model_differences(run.cfg.model, parent.cfg.model)) if parent is not None else ""
        if diff:
            raise ConfigError(f"{plan.sweep_path}: variant '{run.variant}': {INIT_KEY}={PARENT} needs the parent's "
                              f"model; it differs in {diff} (an MoE from the parent: model.ffn.upcycle_from)")
        parent = parents.get(run.cfg.model.ffn.upcycle_from)
        if parent is not None:
            try:
                check_upcycle(run.cfg.model, parent.cfg.model, Path(parent.cfg.out_dir))
            except ConfigError as e:
                raise ConfigError(f"{plan.sweep_path}: variant '{run.variant}': {e}") from None


def _planned(plan: SweepPlan, variant: str, size: Optional[str], size_over: list[str], point: dict,
             seed: int, level: dict) -> PlannedRun:
    name = run_name(variant, size, point, seed, level)
    over = size_over + [_as_override(k, v) for k, v in level.items()]
    point_over = [_as_override(k, v) for k, v in point.items()]
    if "train.lr" in point and "train.min_lr" not in point:
        # keep the base schedule's min_lr / lr ratio, so a smaller lr never ends below min_lr
        ref = _load(plan, variant, over, name, seed).train
        point_over.append(_as_override("train.min_lr", point["train.lr"] * ref.min_lr / ref.lr))
    return PlannedRun(variant, seed, _load(plan, variant, over + point_over, name, seed), size, dict(point),
                      level=dict(level))


def check_shared(plan: SweepPlan) -> None:
    """Belt and braces over the key filter: everything but the model, run mechanics and the tuned values must be
    equal across variants for each (size, factor level, seed)."""
    skip = set(ALLOWED_VARIANT_KEYS) | {"train.out_dir", "name"}
    if plan.sweep.tune:
        skip |= set(plan.sweep.tune.grid) | ({"train.min_lr"} if "train.lr" in plan.sweep.tune.grid else set())
    first: dict[tuple, tuple[str, dict]] = {}
    for run in plan.runs + plan.reference_runs:  # not the parents: their budget is their own
        d = flatten(run.cfg.to_dict())
        shared = {k: v for k, v in d.items() if (k.split(".")[0] in ("data", "train") or k in FORBIDDEN_MODEL_KEYS)
                  and k not in skip}
        other, ref = first.setdefault((run.size, run.level_name, run.seed), (run.variant, shared))
        diff = sorted(k for k in set(ref) | set(shared) if ref.get(k) != shared.get(k))
        if diff:
            raise ConfigError(f"{plan.sweep_path}: variants '{other}' and '{run.variant}' differ in shared settings "
                              f"({', '.join(diff)}); variants may only change the model")


def model_vocab(cfg: RunConfig) -> tuple[int, bool]:
    """The vocabulary size the model will get: model.vocab_size, else the tokenizer's target size (an estimate:
    a BPE trained on a small corpus can end up smaller; it changes only the embedding, equal for all variants)."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size, False
    return cfg.data.tokenizer.vocab_size, True


def count_params(cfg: RunConfig) -> tuple[dict, int, bool]:
    """(param_counts, flops_per_token, vocab_estimated) of the run's model, built on the meta device."""
    from model.counting import meta_counts
    vocab, estimated = model_vocab(cfg)
    counts, fpt = meta_counts(replace(cfg.model, vocab_size=vocab))
    return counts, fpt, estimated


def _variant_info(sweep: SweepConfig, name: str, cfg: RunConfig, size: Optional[str]) -> VariantInfo:
    from model.registry import ffn_class
    counts, fpt, estimated = count_params(cfg)
    matched = sweep.variant_matched(name)
    on = "active" if ffn_class(cfg.model.ffn.type).matched_on == "active" else sweep.match_on
    return VariantInfo(name, cfg, counts, fpt, matched, on if matched else "-", estimated, size=size)


def check_param_match(plan: SweepPlan, infos: dict[str, VariantInfo], size: Optional[str] = None,
                      refuse: bool = True) -> None:
    """Set each matched variant's relative difference to the baseline (on total or active params) and refuse when
    it, or the difference in FFN params (all of them when matched on total, the active ones when matched on active),
    is beyond the tolerance: FFN params are a fraction of the total, so a total within 2% can hide a FFN 4% off."""
    sweep = plan.sweep
    base = infos[sweep.baseline]
    bad = []
    for info in infos.values():
        if not info.matched:
            continue
        ffn_key = "ffn_active" if info.matched_on == "active" else "ffn"
        for key, label in ((info.matched_on, info.matched_on), (ffn_key, ffn_key.replace("_", " "))):
            ref = base.counts[key]
            if key != info.matched_on and not (ref and info.counts[key]):
                continue  # a block without FFN params (type none, matched by depth/width) matches on totals only
            rel = (info.counts[key] - ref) / ref
            if key == info.matched_on:
                info.rel_diff = rel
            if abs(rel) > sweep.param_tolerance + 1e-12:
                bad.append(f"'{info.name}' has {info.counts[key]:,} {label} params vs {ref:,} ({rel:+.1%})")
    if bad and refuse:
        at = f" at size '{size}'" if size else ""
        raise ConfigError(f"{plan.sweep_path}: parameter mismatch vs baseline '{sweep.baseline}'{at}: "
                          f"{'; '.join(bad)}; tolerance {sweep.param_tolerance:.0%} (param_tolerance); set "
                          f"model.ffn.d_ff to match, or `match: false` on the variant to opt out")


# ----------------------------------------------------------------------------------------------------------------
# Tuning: selection from tuning losses only

def choose(points: list[dict], tune_losses: list[Optional[float]]) -> tuple[Optional[int], list[str]]:
    """(index of the lowest tuning loss, tuned keys whose chosen value sits on the grid's edge). Unfinished points
    (None) are skipped; None when no point has a loss."""
    scored = [(loss, i) for i, loss in enumerate(tune_losses) if loss is not None and loss == loss]
    if not scored:
        return None, []
    best = min(scored)[1]
    edge = []
    for key in points[best]:
        values = sorted({p[key] for p in points})
        if len(values) > 1 and points[best][key] in (values[0], values[-1]):
            edge.append(key)
    return best, edge


def tune_loss_of(run: PlannedRun) -> Optional[float]:
    """The tuning loss of a finished tuning run: reads `tune_loss` from its final record and nothing else."""
    from train.optim import plan_budget
    final = read_final(run.cfg.out_dir)
    if final is None or final.get("step") != plan_budget(run.cfg.train, run.cfg.model.max_seq_len)[0]:
        return None
    return final.get("tune_loss")


def resolve_selection(plan: SweepPlan, failed: frozenset = frozenset()) -> None:
    """Choose a grid point for every (variant, size, factor level) whose tuning runs are all finished (or failed)
    and plan that point's runs for every seed (the tuning run itself is reused for the tuning seed)."""
    if plan.sweep.tune is None:
        return
    plan.pending = 0
    for target in (plan.runs, plan.reference_runs):
        for (variant, size, level_name), runs in _group_tuning(target).items():
            losses = [None if r.name in failed else tune_loss_of(r) for r in runs]
            sel = Selection(variant, size, level_name, [r.point for r in runs], losses)
            plan.selections[(variant, size, level_name)] = sel
            done = all(loss is not None or r.name in failed for loss, r in zip(losses, runs))
            sel.chosen, sel.on_edge = choose(sel.points, losses) if done else (None, [])
            if sel.chosen is None:
                plan.pending += len([s for s in plan.seeds if s != plan.sweep.tune_seed])
                continue
            best = runs[sel.chosen]
            size_over = _size_overrides(plan, size)
            for seed in plan.seeds:
                if seed == best.seed:
                    best.reported = True
                elif not any(r.variant == variant and r.size == size and r.level == best.level and r.seed == seed
                             and not r.tuning for r in target):
                    target.append(_planned(plan, variant, size, size_over, best.point, seed, best.level))


def _group_tuning(runs: list[PlannedRun]) -> dict[tuple, list[PlannedRun]]:
    groups: dict[tuple, list[PlannedRun]] = {}
    for r in runs:
        if r.tuning:
            groups.setdefault((r.variant, r.size, r.level_name), []).append(r)
    return groups


def run_finished(run: PlannedRun) -> bool:
    from train.optim import plan_budget
    if not is_finished(run.cfg.out_dir, plan_budget(run.cfg.train, run.cfg.model.max_seq_len)[0]):
        return False
    return not run.tuning or tune_loss_of(run) is not None
