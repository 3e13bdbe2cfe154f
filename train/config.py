"""Run configuration: the typed schema (pydantic sections `data`, `train`, `wandb`; `model` is model/config.py's
dataclass) that every run, sweep and tool reads. Loading YAML files and overrides into it: train/config_load.py.

Config values are data: every number must be finite (`allow_inf_nan=False`), and `RunConfig.to_yaml()` is what a
run directory keeps beside its checkpoints (`config.yaml`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, model_validator

from model.config import FFNConfig, MiniMindConfig
from model.registry import ffn_class


COMPILE_MODES = ("auto", "blocks", "model")  # train.compile besides true/false


class _Section(BaseModel):
    # allow_inf_nan=False: also refuses NaN/inf assigned in Python (validate_config checks loaded values first, with
    # one message for every section incl. the model's dataclasses)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TokenizerConfig(_Section):
    vocab_size: int = 4096
    path: Optional[str] = None  # an existing tokenizer.json; null = train a byte-level BPE on the training split
    special_tokens: list[str] = ["<|endoftext|>"]  # the first one is the end-of-document (EOS) token
    min_frequency: int = 2

    @model_validator(mode="after")
    def _check(self) -> "TokenizerConfig":
        if not self.special_tokens:
            raise ValueError("data.tokenizer.special_tokens needs at least the end-of-document token")
        if self.path is None and self.vocab_size < 256 + len(self.special_tokens):
            raise ValueError(f"data.tokenizer.vocab_size={self.vocab_size} is too small: a byte-level BPE needs at least "
                             f"256 byte tokens + {len(self.special_tokens)} special tokens")
        return self


class DataConfig(_Section):
    corpus: Literal["shakespeare", "hf", "local"] = "shakespeare"
    path: Optional[str] = None  # local: a file, a glob, or a `save_to_disk` directory
    val_path: Optional[str] = None  # local files: validation file(s); null = val_split or hold out val_fraction
    format: Literal["auto", "text", "json", "parquet", "disk"] = "auto"  # local: how to read `path`
    # local text files: one document per file, per blank-line-separated paragraph, or per line
    sample_by: Literal["document", "paragraph", "line"] = "document"
    hf_name: Optional[str] = None
    hf_config: Optional[str] = None
    split: str = "train"
    val_split: Optional[str] = None  # hf/local: a separate validation split; null = hold out val_fraction of docs
    val_fraction: float = 0.05
    val_plays: Optional[list[str]] = None  # shakespeare: held-out plays; null = the built-in choice
    text_column: str = "text"
    streaming: bool = False
    max_documents: Optional[int] = None
    max_bytes: Optional[int] = None
    cache_dir: str = "data"
    num_proc: Optional[int] = None  # tokenisation processes; null = automatic
    tokenizer: TokenizerConfig = TokenizerConfig()

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.corpus == "hf" and not self.hf_name:
            raise ValueError("data.hf_name is required when data.corpus is 'hf' (e.g. roneneldan/TinyStories)")
        if self.corpus == "local" and not self.path:
            raise ValueError("data.path is required when data.corpus is 'local' (a file, glob or save_to_disk dir)")
        if self.val_path is not None and self.val_split is not None:
            raise ValueError("set only one of data.val_path (local files) and data.val_split (a named split)")
        if not self.cache_dir:
            raise ValueError("data.cache_dir must be a directory path, got an empty string")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        for key in ("max_documents", "max_bytes", "num_proc"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"data.{key} must be a positive integer or null, got {value}")
        return self


class TrainConfig(_Section):
    out_dir: Optional[str] = None  # default runs/<name>
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # autocast precision (weights stay fp32). auto: bf16 on CUDA with bf16; fp32 on CPUs without native bf16 (bf16
    # matmuls are emulated and ~10x slower on AVX2-only CPUs); on CPUs with native bf16 (AVX512-BF16/AMX) a short
    # probe of this model's training step picks bf16 only if it is >= 10% faster than fp32, cached per machine and
    # shape in ~/.cache/minimind-ffn/dtype.json (train/dtype_probe.py). fp16 (with a GradScaler) is CUDA-only.
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    # torch.compile (train/compiler.py): false (eager), true or blocks (each transformer block, "regional"), model
    # (the whole step model), auto (default: blocks for runs of >= 2000 steps where a C++ compiler exists, else
    # eager; shorter runs lose more to compiling than it saves, README "Performance")
    compile: Union[bool, Literal["auto", "blocks", "model"]] = "auto"  # validated with COMPILE_MODES
    # Under torchrun: ddp (DistributedDataParallel, a whole model per rank) or fsdp (FSDP2: parameters, gradients and
    # optimizer state sharded across ranks; train/runtime.py). Same global batch and checkpoint files either way; a
    # single process ignores it.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    num_threads: Optional[int] = None  # CPU intra-op threads; null = torch's default
    micro_batch_size: int = 16
    grad_accum: int = 1
    max_steps: Optional[int] = 1000
    max_tokens: Optional[int] = None  # when set, takes precedence over max_steps
    lr: float = 3.0e-3
    min_lr: float = 3.0e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8
    # adamw: AdamW on everything. muon: torch's Muon on the hidden matrices (attention, FFN, expert stacks per
    # expert), AdamW on embeddings/LM head, norms, routers and vectors (train/optim.py). The muon_* keys only act there.
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: Optional[float] = None  # Muon's peak lr, same schedule; null = train.lr (match_rms_adamw: one scale)
    muon_momentum: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    log_interval: int = 10
    eval_interval: int = 100
    eval_tokens: Optional[int] = 131072  # null = the whole validation split
    ckpt_interval: int = 200
    keep_last: int = 2
    resume: Literal["auto", "true", "false"] = "auto"
    nan_policy: Literal["stop", "skip"] = "stop"
    # Stop after this step as if interrupted (checkpoint, exit 130), the schedule still following the full budget:
    # for time-boxed jobs (re-run to continue) and resume tests. null = run to the end.
    stop_at_step: Optional[int] = None
    sample_prompts: list[str] = ["ROMEO:", "To be, or not to be"]
    sample_max_new_tokens: int = 64
    sample_temperature: float = 0.8
    sample_top_k: Optional[int] = 50
    # FLOP/s that MFU is measured against; null = the cached best-of-k matmul peak of this machine (train/hardware.py)
    peak_flops: Optional[float] = None
    # Run directory of a finished run of the same model: a fresh run starts from its model.safetensors, with a fresh
    # optimizer and schedule (train/upcycle.py's init_from; a resumed run keeps its checkpoint). null = random init.
    init_from: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _bool_resume(cls, data: Any) -> Any:
        # YAML reads `resume: false` as a bool; the schema keeps the three-way choice as strings.
        if isinstance(data, dict) and isinstance(data.get("resume"), bool):
            data = {**data, "resume": "true" if data["resume"] else "false"}
        value = data.get("compile") if isinstance(data, dict) else None
        if value is not None and not isinstance(value, bool) and value not in COMPILE_MODES:
            raise ValueError(f"train.compile must be one of false, true, {', '.join(COMPILE_MODES)}; got {value!r}")
        return data

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        positive = ["micro_batch_size", "grad_accum", "log_interval", "eval_interval", "ckpt_interval", "keep_last",
                    "sample_max_new_tokens"]
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"train.{key} must be > 0, got {getattr(self, key)}")
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("set a budget: train.max_steps or train.max_tokens")
        for key in ("max_steps", "max_tokens", "eval_tokens", "num_threads", "sample_top_k", "peak_flops",
                    "stop_at_step"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"train.{key} must be > 0 or null, got {value}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= train.min_lr <= train.lr and train.lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.muon_lr is not None and self.muon_lr <= 0:
            raise ValueError(f"train.muon_lr must be > 0 or null (= train.lr), got {self.muon_lr}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ValueError(f"train.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if self.parallel == "fsdp" and self.dtype == "fp16":
            raise ValueError("train.parallel=fsdp does not take train.dtype=fp16 (the fp16 GradScaler path is not "
                             "built for sharded gradients here); use bf16 or fp32, or train.parallel=ddp")
        if self.sample_temperature < 0:
            raise ValueError(f"train.sample_temperature must be >= 0 (0 = greedy), got {self.sample_temperature}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("train.warmup_steps, train.weight_decay and train.grad_clip must be >= 0")
        if self.init_from is not None and not self.init_from.strip():
            raise ValueError("train.init_from must be the directory of a finished run, or null")
        return self


class WandbConfig(_Section):
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "minimind-ffn"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = []
    notes: Optional[str] = None
    name: Optional[str] = None  # wandb run name; null = the run name
    init_timeout: float = 30.0  # seconds wandb.init may take before the run falls back to offline logging

    @model_validator(mode="after")
    def _check(self) -> "WandbConfig":
        if self.init_timeout <= 0:
            raise ValueError(f"wandb.init_timeout must be > 0, got {self.init_timeout}")
        return self


class RunConfig(_Section):
    name: Optional[str] = None  # run name; default derived from the FFN variant and seed
    model: MiniMindConfig = MiniMindConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    wandb: WandbConfig = WandbConfig()

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.train.init_from and self.model.ffn.upcycle_from:
            raise ValueError("train.init_from and model.ffn.upcycle_from are both set; valid: one of them (init_from: "
                             "a finished run of the same model, upcycle_from: an MoE from a finished dense run)")
        return self

    @property
    def run_name(self) -> str:
        return self.name or f"{ffn_label(self.model.ffn)}-s{self.train.seed}"

    @property
    def out_dir(self) -> Path:
        return Path(self.train.out_dir) if self.train.out_dir else Path("runs") / self.run_name

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def ffn_label(ffn: FFNConfig) -> str:
    """Filesystem-safe name of the FFN variant (default run names): the block class's slug, e.g. glu-silu."""
    return ffn_class(ffn.type).slug(ffn)
