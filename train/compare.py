"""FFN comparison sweeps: the sweep file schema, planning (one RunConfig per variant × seed), fairness checks
(shared data/budget/optimizer, parameter matching) and running the trainer over the plan.

A sweep file (configs/compare/*.yaml):

    name: shakespeare-ffn          # runs go to runs/<name>/<variant>-s<seed>
    base: ../shakespeare.yaml      # training config, relative to the sweep file
    overrides: {train.max_steps: 400}   # optional, applied to every run
    seeds: [0]
    baseline: gelu                 # deltas and the parameter match are against this variant
    match_on: total                # total | active; MoE variants are always matched on active params
    param_tolerance: 0.02          # max relative difference to the baseline's count
    variants:
      gelu:   {model.ffn.type: dense, model.ffn.activation: gelu}
      noffn:  {model.ffn.type: none, match: false}    # opts out of the parameter match

Optional: description, out_dir, match (sweep-wide), sample_count, and per variant family/description (see the
schema below); `extends: other-sweep.yaml` reuses a sweep file, the keys given here replacing the parent's. Per run: base + sweep overrides + variant overrides + command-line overrides + seed/name/out_dir/wandb group+tags.
Variant overrides may only touch the model (and harmless run mechanics, ALLOWED_VARIANT_KEYS) so that every variant
sees the same tokenizer, data order per seed, validation blocks, token budget, optimizer and schedule.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from train.config import RunConfig, load_config, parse_override, read_yaml
from train.errors import ConfigError, UserError

# Keys (besides model.*) a variant may change: they do not change what the model sees or how it is optimised.
ALLOWED_VARIANT_KEYS = ("train.compile", "train.num_threads", "train.log_interval", "train.ckpt_interval",
                        "train.keep_last")
# model.* keys a variant may not change: they decide the tokenizer size and the tokens per sequence.
FORBIDDEN_MODEL_KEYS = ("model.vocab_size", "model.max_seq_len")
# Set by the sweep itself for every run; a sweep or command-line override of these is refused.
SWEEP_OWNED_KEYS = ("name", "train.seed", "train.out_dir", "wandb.group")


class VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    overrides: dict[str, Any] = {}
    match: Optional[bool] = None  # None: the sweep's `match`; False: excluded from the parameter-match check
    family: Optional[str] = None  # optional line label for the "final loss vs size" plots (e.g. gelu, swiglu)
    description: Optional[str] = None


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    base: str
    description: Optional[str] = None
    overrides: dict[str, Any] = {}
    seeds: list[int] = [0]
    baseline: str
    match: bool = True  # parameter-match every variant (unless it opts out) against the baseline
    match_on: Literal["total", "active"] = "total"
    param_tolerance: float = 0.02
    out_dir: Optional[str] = None  # default runs/<name>
    sample_count: int = 2  # sample generations per variant shown in report.md
    variants: dict[str, VariantSpec]

    @field_validator("variants", mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        # Keys that are not VariantSpec fields are overrides: `gelu: {model.ffn.type: dense}` is short for
        # `gelu: {overrides: {model.ffn.type: dense}}`, and `{model.ffn.type: none, match: false}` mixes both.
        if not isinstance(value, dict):
            return value
        out = {}
        for name, spec in value.items():
            spec = {} if spec is None else spec
            if isinstance(spec, dict):
                rest = {k: v for k, v in spec.items() if k not in VariantSpec.model_fields}
                spec = {k: v for k, v in spec.items() if k in VariantSpec.model_fields}
                if rest:
                    over = spec.get("overrides") if isinstance(spec.get("overrides"), dict) else {}
                    spec["overrides"] = {**over, **rest}
            out[name] = spec
        return out

    @model_validator(mode="after")
    def _check(self) -> "SweepConfig":
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name must be a plain directory name, got {self.name!r}")
        if not self.variants:
            raise ValueError("variants: at least one variant is needed")
        for name in self.variants:
            if not name or "/" in name or name.startswith(".") or " " in name:
                raise ValueError(f"variant name {name!r} must be a plain name (no '/', spaces or leading '.')")
        if self.baseline not in self.variants:
            raise ValueError(f"baseline '{self.baseline}' is not a variant; variants: {', '.join(self.variants)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be a non-empty list of distinct non-negative integers, got {self.seeds}")
        if not 0 <= self.param_tolerance < 1:
            raise ValueError(f"param_tolerance must be in [0, 1), got {self.param_tolerance}")
        if self.sample_count < 0:
            raise ValueError(f"sample_count must be >= 0, got {self.sample_count}")
        return self

    def variant_matched(self, name: str) -> bool:
        spec = self.variants[name]
        return self.match if spec.match is None else spec.match


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'model': {'ffn': {'type': 'moe'}}} -> {'model.ffn.type': 'moe'} (lists and scalars are leaves)."""
    out = {}
    for key, value in d.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out


def load_sweep(path: str | Path) -> tuple[SweepConfig, Path]:
    """Parse and validate a sweep file; returns it and the resolved path of its base training config."""
    path = Path(path)
    data = _read_sweep_chain(path, ())
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = " ".join(first["msg"].removeprefix("Value error, ").split())
        if first["type"] == "extra_forbidden":
            msg = f"unknown key (valid: {', '.join(SweepConfig.model_fields)})"
        raise ConfigError(f"{path}: {loc + ': ' if loc else ''}{msg}") from None
    base = (path.parent / sweep.base).resolve()
    if not base.exists():
        raise ConfigError(f"{path}: base training config not found: {base}")
    for key in flatten(sweep.overrides):
        _check_sweep_key(key, f"{path}: overrides")
    for name, spec in sweep.variants.items():
        for key in flatten(spec.overrides):
            _check_variant_key(key, f"{path}: variant '{name}'")
    return sweep, base


def _read_sweep_chain(path: Path, seen: tuple) -> dict:
    """A sweep file may `extends: other.yaml` (relative): its top-level keys replace the parent's."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"'extends' cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    data = read_yaml(path)
    if isinstance(data.get("base"), str):
        data["base"] = str((path.parent / data["base"]).resolve())  # relative to the file that names it
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not (path.parent / parent).is_file():
        raise ConfigError(f"{path}: extends: sweep file not found: {path.parent / str(parent)}")
    return {**_read_sweep_chain(path.parent / parent, (*seen, path)), **data}


def _check_variant_key(key: str, where: str) -> None:
    if key in FORBIDDEN_MODEL_KEYS or not (key.startswith("model.") or key in ALLOWED_VARIANT_KEYS):
        raise ConfigError(f"{where}: may not override '{key}' (variants share data, budget, optimizer, schedule and "
                          f"seed); allowed: model.* except {', '.join(FORBIDDEN_MODEL_KEYS)}, "
                          f"{', '.join(ALLOWED_VARIANT_KEYS)}")


def _check_sweep_key(key: str, where: str) -> None:
    if key in SWEEP_OWNED_KEYS or key == "wandb.tags":
        raise ConfigError(f"{where}: '{key}' is set by the sweep for each run (use seeds:/--seeds for the seed)")


# ----------------------------------------------------------------------------------------------------------------
# Planning

@dataclass
class PlannedRun:
    variant: str
    seed: int
    cfg: RunConfig

    @property
    def name(self) -> str:
        return f"{self.variant}-s{self.seed}"


@dataclass
class VariantInfo:
    name: str
    cfg: RunConfig  # the config of its first seed (model + budget are the same for every seed)
    counts: dict  # param_counts() of the model built on the meta device
    flops_per_token: int
    matched: bool
    matched_on: str  # total | active | "-" (opted out)
    vocab_estimated: bool
    rel_diff: Optional[float] = None  # vs the baseline, on matched_on


@dataclass
class SweepPlan:
    sweep: SweepConfig
    sweep_path: Path
    base_path: Path
    out_dir: Path
    runs: list[PlannedRun]
    variants: dict[str, VariantInfo] = field(default_factory=dict)
    cli_overrides: list[str] = field(default_factory=list)
    reference_runs: list[PlannedRun] = field(default_factory=list)  # the baseline's, when --variants leaves it out


def _as_override(key: str, value: Any) -> str:
    # JSON is valid YAML, so the value round-trips through load_config's YAML scalar parsing unchanged.
    return f"{key}={json.dumps(value)}"


def plan_sweep(sweep_path: str | Path, cli_overrides: list[str] = (), variants: Optional[list[str]] = None,
               seeds: Optional[list[int]] = None, out_dir: Optional[str] = None) -> SweepPlan:
    """Resolve every (variant, seed) run config and the per-variant parameter counts; trains nothing."""
    sweep, base = load_sweep(sweep_path)
    for text in cli_overrides:
        key, _ = parse_override(text)
        _check_sweep_key(key, "command line")
    chosen = list(sweep.variants)
    if variants:
        unknown = [v for v in variants if v not in sweep.variants]
        if unknown:
            raise ConfigError(f"--variants: unknown {', '.join(unknown)}; valid: {', '.join(sweep.variants)}")
        chosen = [v for v in chosen if v in variants]
    run_seeds = list(sweep.seeds)
    if seeds:
        run_seeds = list(dict.fromkeys(seeds))
        if min(run_seeds) < 0:
            raise ConfigError(f"--seeds must be non-negative integers, got {seeds}")
    out_dir = Path(out_dir or sweep.out_dir or Path("runs") / sweep.name)
    runs = [PlannedRun(v, seed, _run_config(sweep, Path(sweep_path), base, v, seed, out_dir, cli_overrides))
            for v in chosen for seed in run_seeds]
    plan = SweepPlan(sweep, Path(sweep_path), base, out_dir, runs, cli_overrides=list(cli_overrides))
    _check_shared(plan)
    # The baseline is always counted so that a restricted sweep (--variants) is still checked against it.
    if sweep.baseline not in chosen:  # read from disk when present, never trained by this invocation
        plan.reference_runs = [PlannedRun(sweep.baseline, seed, _run_config(sweep, plan.sweep_path, base,
                               sweep.baseline, seed, out_dir, cli_overrides)) for seed in run_seeds]
    for name in dict.fromkeys([sweep.baseline, *chosen]):
        run = next(r for r in runs + plan.reference_runs if r.variant == name)
        plan.variants[name] = _variant_info(sweep, name, run.cfg)
    check_param_match(plan)
    return plan


def _run_config(sweep: SweepConfig, sweep_path: Path, base: Path, variant: str, seed: int, out_dir: Path,
                cli_overrides: list[str]) -> RunConfig:
    """base + sweep overrides + variant overrides + command-line overrides + what the sweep owns."""
    run_name = f"{variant}-s{seed}"
    over = [_as_override(k, v) for k, v in flatten(sweep.overrides).items()]
    over += [_as_override(k, v) for k, v in flatten(sweep.variants[variant].overrides).items()]
    over += [*cli_overrides, _as_override("name", run_name), _as_override("train.seed", seed),
             _as_override("train.out_dir", str(out_dir / run_name)), _as_override("wandb.group", sweep.name),
             _as_override("wandb.tags", [variant, sweep.name])]
    try:
        return load_config(base, over)
    except ConfigError as e:
        raise ConfigError(f"{sweep_path}: variant '{variant}': {e}") from None


def _check_shared(plan: SweepPlan) -> None:
    """Belt and braces over the key filter: everything but the model and run mechanics must be equal per seed."""
    first: dict[int, tuple[str, dict]] = {}
    for run in plan.runs:
        d = flatten(run.cfg.to_dict())
        shared = {k: v for k, v in d.items() if k.split(".")[0] in ("data", "train") or k in FORBIDDEN_MODEL_KEYS}
        shared = {k: v for k, v in shared.items() if k not in ALLOWED_VARIANT_KEYS and k != "train.out_dir"}
        other, ref = first.setdefault(run.seed, (run.variant, shared))
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
    """(param_counts, flops_per_token, vocab_estimated) of the model built on the meta device (no memory, no data)."""
    import torch

    from model.model_minimind import MiniMindForCausalLM
    vocab, estimated = model_vocab(cfg)
    mcfg = replace(cfg.model, vocab_size=vocab)
    with torch.device("meta"):
        model = MiniMindForCausalLM(mcfg)
    return dict(model.param_counts()), int(model.flops_per_token(mcfg.max_seq_len)), estimated


def _variant_info(sweep: SweepConfig, name: str, cfg: RunConfig) -> VariantInfo:
    counts, fpt, estimated = count_params(cfg)
    matched = sweep.variant_matched(name)
    on = "active" if cfg.model.ffn.type == "moe" else sweep.match_on
    return VariantInfo(name, cfg, counts, fpt, matched, on if matched else "-", estimated)


def check_param_match(plan: SweepPlan, refuse: bool = True) -> None:
    """Set each matched variant's relative difference to the baseline (on total or active params) and refuse when
    one is beyond the tolerance."""
    sweep = plan.sweep
    base = plan.variants[sweep.baseline]
    bad = []
    for info in plan.variants.values():
        if not info.matched:
            continue
        ref = base.counts[info.matched_on]
        info.rel_diff = (info.counts[info.matched_on] - ref) / ref
        if abs(info.rel_diff) > sweep.param_tolerance + 1e-12:
            bad.append(f"'{info.name}' has {info.counts[info.matched_on]:,} {info.matched_on} params vs "
                       f"{ref:,} ({info.rel_diff:+.1%})")
    if bad and refuse:
        raise ConfigError(f"{plan.sweep_path}: parameter mismatch vs baseline '{sweep.baseline}': {'; '.join(bad)}; "
                          f"tolerance {sweep.param_tolerance:.0%} (param_tolerance); set model.ffn.d_ff to match, "
                          f"or `match: false` on the variant to opt out")


# ----------------------------------------------------------------------------------------------------------------
# Running

# Run settings that may differ between a run directory's config.yaml and the plan without changing its result.
IGNORED_ON_RESUME = {"train.resume", "train.num_threads", "train.compile", "train.log_interval", "train.ckpt_interval",
                     "train.keep_last", "train.peak_flops", "train.device"}


def read_final(run_dir: Path) -> Optional[dict]:
    """The last `final` record of run_dir/metrics.jsonl (None when absent); tolerates a line cut short by a kill."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    final = None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("type") == "final":
            final = rec
    return final


def is_finished(run: PlannedRun) -> bool:
    from train.optim import plan_budget
    max_steps, _ = plan_budget(run.cfg.train, run.cfg.model.max_seq_len)
    final = read_final(run.cfg.out_dir)
    return final is not None and final.get("step") == max_steps and final.get("val_loss") is not None


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


def run_sweep(plan: SweepPlan, command: str = "", report_only: bool = False) -> dict:
    """Train every planned run that has no final metrics yet (resuming interrupted ones), then write the report."""
    from train.report import build_report
    from train.trainer import TrainingDiverged
    for run in plan.runs + plan.reference_runs:
        check_existing_run(run)
    failed = []
    if not report_only:
        total = len(plan.runs)
        for i, run in enumerate(plan.runs, 1):
            if is_finished(run):
                print(f"[{i}/{total}] {run.name}: finished earlier, skipped ({run.cfg.out_dir})", flush=True)
                continue
            print(f"[{i}/{total}] {run.name}: training -> {run.cfg.out_dir}", flush=True)
            try:
                train_run(run.cfg)
            except TrainingDiverged as e:  # other errors (config, data, checkpoint) would hit every run: stop
                print(f"warning: {run.name} diverged, the sweep goes on without it: {e}", file=sys.stderr)
                failed.append(run.name)
    doc = build_report(plan, command)
    if failed:
        raise UserError(f"{len(failed)} run(s) diverged ({', '.join(failed)}); the report lists them as missing")
    return doc
