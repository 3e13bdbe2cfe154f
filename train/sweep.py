"""The sweep file: its schema, `extends`, and the fairness rules on which keys a variant, a size or a tuning grid
may change. Planning and running live in train/compare.py.

A sweep file (configs/compare/*.yaml):

    name: shakespeare-ffn          # runs go to runs/<name>/<variant>[-<size>][-<tuned value>]-s<seed>
    base: ../shakespeare.yaml      # training config, relative to the sweep file
    overrides: {train.max_steps: 400}   # optional, applied to every run
    seeds: [0, 1, 2]
    baseline: gelu                 # deltas, verdicts and the parameter match are against this variant
    match_on: total                # total | active; a block class may insist on active (MoE)
    param_tolerance: 0.02          # max relative difference to the baseline's count
    variants:
      gelu:   {model.ffn.type: dense, model.ffn.activation: gelu}
      noffn:  {model.ffn.type: none, match: false}    # opts out of the parameter match
    tune:                          # optional: per-variant tuning grid, chosen on the *tuning* validation blocks
      train.lr: [1.0e-3, 2.0e-3, 4.0e-3]
    sizes:                         # optional: a scaling ladder (model shapes; every variant at every size)
      xs: {model.hidden_size: 64, model.num_hidden_layers: 2}
      s:  {model.hidden_size: 96, model.num_hidden_layers: 3}
    budget: {tokens_per_param: 20} # optional with sizes: train.max_tokens = r × the baseline's non-embedding params
    factors:                       # optional: a second factor crossed with the variants (every level is a sub-sweep:
      train.optimizer: [adamw, muon]   # variants are ranked, tuned and judged within each level)
    parent:                        # optional: a run trained first, once per seed, that variants start from
      overrides: {model.ffn.type: glu, train.max_steps: 200}

Optional: description, out_dir, match (sweep-wide), sample_count, and per variant family/description; `extends:
other-sweep.yaml` reuses a sweep file, the keys given here replacing the parent's. Variant overrides may only touch
the model (and harmless run mechanics, ALLOWED_VARIANT_KEYS), so every variant sees the same tokenizer, data order per
seed, validation blocks, token budget, optimizer and schedule — except the values of the tuning grid, which each
variant gets to choose for itself by the same rule.

`parent:` (continued training vs upcycling at equal extra tokens, configs/compare/upcycle.yaml): one run per seed,
`parent-s<seed>` in the sweep directory, trained before every other run (train/compare.py) and not reported. Its
config is base + sweep overrides + parent.overrides (+ command line); those may set what a variant may, plus the
parent's own budget and schedule (PARENT_TRAIN_KEYS: it is shared by every variant, so they stay fair); a parent
budget in steps clears a sweep-wide train.max_tokens. A variant starts from its seed's parent with the value `parent`
for train.init_from (the same model, trained on) or model.ffn.upcycle_from (an MoE whose experts copy its FFN),
replaced by `<out_dir>/parent-s<seed>` when planned. The variants' own budget (the sweep's) is then the *extra*
tokens, equal for all; a variant from scratch sees fewer tokens in total. Not with `sizes:` (one parent shape); with
`factors:`, every level continues from the same parent.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from train.config_load import read_yaml
from train.errors import ConfigError

# Keys (besides model.*) a variant may change: they do not change what the model sees or how it is optimised
# (train.init_from: which weights it starts from, like model.ffn.upcycle_from).
ALLOWED_VARIANT_KEYS = ("train.compile", "train.num_threads", "train.log_interval", "train.ckpt_interval",
                        "train.keep_last", "train.init_from")
# model.* keys a variant may not change: they decide the tokenizer size and the tokens per sequence.
FORBIDDEN_MODEL_KEYS = ("model.vocab_size", "model.max_seq_len")
# Set by the sweep itself for every run; a sweep or command-line override of these is refused.
SWEEP_OWNED_KEYS = ("name", "train.seed", "train.out_dir", "wandb.group")
# Optimisation hyperparameters a tuning grid may search: each variant picks its own value by tuning loss.
TUNABLE_KEYS = ("train.lr", "train.min_lr", "train.warmup_steps", "train.weight_decay", "train.beta1", "train.beta2",
                "train.eps", "train.grad_clip")
# Variant keys whose value `parent` means "this seed's parent run" (sweep `parent:`), and that value.
PARENT_KEYS = ("train.init_from", "model.ffn.upcycle_from")
PARENT = "parent"
# What the parent's overrides may set besides the variant keys: its own budget and schedule (not init keys).
PARENT_TRAIN_KEYS = ("train.max_steps", "train.max_tokens", "train.lr", "train.min_lr", "train.warmup_steps",
                     "train.eval_interval")
# What a ladder size may set (the same for every variant at that size): the model's shape and the token budget.
SIZE_KEYS = ("model.hidden_size", "model.num_hidden_layers", "model.num_attention_heads", "model.num_key_value_heads",
             "train.max_steps", "train.max_tokens", "train.micro_batch_size", "train.grad_accum",
             "train.warmup_steps", "train.eval_interval", "train.ckpt_interval")


class VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    overrides: dict[str, Any] = {}
    match: Optional[bool] = None  # None: the sweep's `match`; False: excluded from the parameter-match check
    family: Optional[str] = None  # optional line label for the "final loss vs size" plots (e.g. gelu, swiglu)
    description: Optional[str] = None


class ParentSpec(BaseModel):
    """The parent run of every seed (see the module docstring); `parent: {model.ffn.type: glu}` is short for
    `parent: {overrides: {model.ffn.type: glu}}`."""
    model_config = ConfigDict(extra="forbid")
    overrides: dict[str, Any] = {}
    description: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if isinstance(value, dict) and not set(value) <= set(cls.model_fields):
            rest = {k: v for k, v in value.items() if k not in cls.model_fields}
            value = {**{k: v for k, v in value.items() if k in cls.model_fields},
                     "overrides": {**(value.get("overrides") or {}), **rest}}
        return value


class TuneSpec(BaseModel):
    """grid: key -> candidate values (their cross product is tried); seed: the seed of the tuning runs (default the
    sweep's first seed, so the tuning run at the chosen value is reused as that seed's run)."""
    model_config = ConfigDict(extra="forbid")
    grid: dict[str, list[Any]]
    seed: Optional[int] = None

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        # `tune: {train.lr: [..]}` is short for `tune: {grid: {train.lr: [..]}}`
        if isinstance(value, dict) and "grid" not in value:
            value = {"grid": {k: v for k, v in value.items() if k != "seed"}, "seed": value.get("seed")}
        return value

    @model_validator(mode="after")
    def _check(self) -> "TuneSpec":
        if not self.grid:
            raise ValueError("tune: name at least one key, e.g. tune: {train.lr: [1.0e-3, 2.0e-3, 4.0e-3]}")
        for key, values in self.grid.items():
            if key not in TUNABLE_KEYS:
                raise ValueError(f"tune: '{key}' cannot be tuned; tunable: {', '.join(TUNABLE_KEYS)}")
            if len(values) < 2 or len(set(map(str, values))) != len(values):
                raise ValueError(f"tune: {key} needs at least 2 distinct values, got {values}")
        return self


# train.* keys a factor may not vary: what the sweep sets per run, and the data a comparison must share.
FACTOR_FORBIDDEN = ("train.seed", "train.out_dir", "train.resume", "train.stop_at_step")


class BudgetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens_per_param: float  # train.max_tokens = tokens_per_param × the baseline's non-embedding params per size

    @model_validator(mode="after")
    def _check(self) -> "BudgetSpec":
        if not 0 < self.tokens_per_param < 1e6:
            raise ValueError(f"budget.tokens_per_param must be > 0, got {self.tokens_per_param}")
        return self


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
    tune: Optional[TuneSpec] = None
    sizes: Optional[dict[str, dict[str, Any]]] = None  # ladder, smallest first
    budget: Optional[BudgetSpec] = None
    factors: Optional[dict[str, list[Any]]] = None  # key -> levels; their cross product, each level a sub-sweep
    # {slurm: {partition, time, cpus_per_run, gpus_per_run, mem, account, qos, array_parallelism}}: the options of
    # `scripts/compare.py --launcher slurm`, validated by train/launch_slurm.py (they never change a run's result)
    launcher: Optional[dict[str, Any]] = None
    parent: Optional[ParentSpec] = None  # a run per seed, trained first, that variants start from

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
        for name in [*self.variants, *(self.sizes or {})]:
            if not name or "/" in name or name.startswith(".") or " " in name:
                raise ValueError(f"variant/size name {name!r} must be a plain name (no '/', spaces or leading '.')")
        if self.baseline not in self.variants:
            raise ValueError(f"baseline '{self.baseline}' is not a variant; variants: {', '.join(self.variants)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be a non-empty list of distinct non-negative integers, got {self.seeds}")
        if not 0 <= self.param_tolerance < 1:
            raise ValueError(f"param_tolerance must be in [0, 1), got {self.param_tolerance}")
        if self.sample_count < 0:
            raise ValueError(f"sample_count must be >= 0, got {self.sample_count}")
        if self.sizes is not None and not self.sizes:
            raise ValueError("sizes: list at least one size, or leave the key out")
        if self.budget is not None and not self.sizes:
            raise ValueError("budget: only applies to a ladder (sizes:)")
        if self.tune is not None and self.tune.seed is not None and self.tune.seed < 0:
            raise ValueError(f"tune.seed must be >= 0, got {self.tune.seed}")
        for key, levels in (self.factors or {}).items():
            if not key.startswith("train.") or key in FACTOR_FORBIDDEN:
                raise ValueError(f"factors: '{key}' cannot be a factor; use a train.* key other than "
                                 f"{', '.join(FACTOR_FORBIDDEN)}")
            if self.tune is not None and key in self.tune.grid:
                raise ValueError(f"factors: '{key}' is also tuned (tune:); it can be one or the other")
            if len(levels) < 2 or len(set(map(str, levels))) != len(levels):
                raise ValueError(f"factors: {key} needs at least 2 distinct levels, got {levels}")
        if self.parent is not None and self.sizes:
            raise ValueError("parent: does not go with sizes: (one parent shape per seed); drop one of them")
        if self.parent is not None and PARENT in self.variants:
            raise ValueError(f"variant name '{PARENT}' is taken by the parent runs (parent-s<seed>); rename it")
        return self

    def variant_matched(self, name: str) -> bool:
        spec = self.variants[name]
        return self.match if spec.match is None else spec.match

    @property
    def size_names(self) -> list[Optional[str]]:
        return list(self.sizes) if self.sizes else [None]

    @property
    def levels(self) -> list[dict]:
        """The factor levels (their cross product), [{}] without factors."""
        if not self.factors:
            return [{}]
        keys = list(self.factors)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.factors[k] for k in keys))]

    @property
    def tune_seed(self) -> Optional[int]:
        if self.tune is None:
            return None
        return self.seeds[0] if self.tune.seed is None else self.tune.seed


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
    for key, value in flatten(sweep.overrides).items():
        check_sweep_key(key, f"{path}: overrides")
        check_parent_value(key, value, f"{path}: overrides")
    for name, spec in sweep.variants.items():
        for key, value in flatten(spec.overrides).items():
            _check_variant_key(key, f"{path}: variant '{name}'")
            if value == PARENT and key in PARENT_KEYS and sweep.parent is None:
                raise ConfigError(f"{path}: variant '{name}': {key}: {PARENT} needs a `parent:` section (the run it "
                                  f"names); valid: a run directory, or add parent: {{overrides: {{...}}}}")
    for key in flatten(sweep.parent.overrides if sweep.parent else {}):
        _check_parent_key(key, f"{path}: parent")
    for name, over in (sweep.sizes or {}).items():
        for key in flatten(over or {}):
            if key not in SIZE_KEYS:
                raise ConfigError(f"{path}: size '{name}' may not set '{key}'; allowed: {', '.join(SIZE_KEYS)}")
        if sweep.budget is not None and {"train.max_steps", "train.max_tokens"} & set(flatten(over or {})):
            raise ConfigError(f"{path}: size '{name}' sets its own budget and budget.tokens_per_param is given; "
                              "use one or the other")
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


def _check_parent_key(key: str, where: str) -> None:
    mechanics = [k for k in ALLOWED_VARIANT_KEYS if k not in PARENT_KEYS]
    not_model = [*FORBIDDEN_MODEL_KEYS, *(k for k in PARENT_KEYS if k.startswith("model."))]
    model_key = key.startswith("model.") and key not in not_model
    if not (model_key or key in mechanics or key in PARENT_TRAIN_KEYS):
        raise ConfigError(f"{where}: may not set '{key}' (the parent shares data, optimizer and seed with the "
                          f"variants, and starts from scratch); allowed: model.* except {', '.join(not_model)}, "
                          f"{', '.join((*mechanics, *PARENT_TRAIN_KEYS))}")


def check_parent_value(key: str, value: Any, where: str) -> None:
    """The value `parent` is replaced in variant overrides only; anywhere else (sweep-wide or command-line overrides,
    which the parent run gets too) it would name a directory called 'parent'."""
    if key in PARENT_KEYS and value == PARENT:
        raise ConfigError(f"{where}: {key}={PARENT} is for variant overrides only (the parent run gets these "
                          f"overrides too); set it on each variant that starts from the parent")


def check_sweep_key(key: str, where: str) -> None:
    if key in SWEEP_OWNED_KEYS or key == "wandb.tags":
        raise ConfigError(f"{where}: '{key}' is set by the sweep for each run (use seeds:/--seeds for the seed)")
