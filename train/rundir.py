"""Run-directory rules: the lock, what may be resumed, and what a resumed run may change.

- train.resume=false refuses a non-empty directory; train.resume=true needs a checkpoint; auto resumes the newest
  checkpoint that verifies, or starts fresh in an empty directory (or one holding only a run's own files).
- One process per directory: an exclusive fcntl lock on `.lock`, released by the OS when its holder dies.
- A resumed run's resolved model section must equal the checkpoint's (except keys that leave the weights' shapes and
  meaning alone), and the error names the first key that differs.
- Resume never silently changes a run: its train section must equal the checkpoint's except the mechanics in
  RESUMABLE_TRAIN_KEYS, and the budget may only grow; otherwise one error names every differing key, both values.
- The files a run writes beside its checkpoints when it starts: config.yaml, tokenizer.json, metrics.jsonl.
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from train import checkpoint as ck
from train.checkpoint import error_cause
from train.config import RunConfig, TrainConfig
from train.errors import CheckpointError, ConfigError
from train.optim import plan_budget
from train.runs import read_metrics
from train.tracking import MetricsLog, warn

# What a run directory may hold; other files in a directory without a checkpoint mean it is not ours to reuse.
# launch.log: stdout/stderr of a run started by `compare.py --jobs` / Slurm (train/launch.py), opened before the run
# starts, so it never makes a directory "not empty" either
LAUNCH_LOG = "launch.log"
RUN_FILES = {"config.yaml", "tokenizer.json", "metrics.jsonl", "samples.json", "samples.md", ck.WEIGHTS, ck.STATE,
             ck.CKPT_SUBDIR, "wandb", ".lock", LAUNCH_LOG}
# Model keys that may change on resume: they change neither the shapes nor the meaning of the weights.
RESUMABLE_MODEL_KEYS = {"dropout", "init_std"}
# train.* keys a resumed run may change. They decide where and how fast the same computation runs, when it is logged,
# evaluated, checkpointed or stopped, and the end-of-run samples and MFU denominator (outputs only) — never which
# batches are drawn, how the weights are updated, in what precision, or what a validation number measures. Every other
# train key (seed, micro_batch_size, grad_accum, lr, min_lr, warmup_steps, weight_decay, decay_embeddings, beta1,
# beta2, eps, grad_clip, dtype, eval_tokens, and any key added later) must equal the checkpoint's. nan_policy only acts
# at a non-finite step, which is reported either way (an error, or a warning and a `skipped` count in the metrics),
# so a run stopped by a NaN may be continued with train.nan_policy=skip.
RESUMABLE_TRAIN_KEYS = {
    "out_dir", "device", "compile", "num_threads",  # where and how fast (bitwise resume still needs the same machine)
    "parallel",  # ddp and fsdp write the same checkpoint files
    "resume", "log_interval", "eval_interval", "ckpt_interval", "keep_last", "stop_at_step",  # bookkeeping
    "nan_policy",
    "sample_prompts", "sample_max_new_tokens", "sample_temperature", "sample_top_k", "peak_flops",  # outputs only
}
# The budget (max_tokens wins over max_steps) may grow: training longer stretches the cosine schedule to the new end.
# A smaller one is refused: it would change the schedule of the steps already taken.
BUDGET_KEYS = ("max_steps", "max_tokens")


class RunLock:
    """An exclusive fcntl lock on run_dir/.lock. The OS drops it when the holder dies, so a stale lock left by a
    killed run never blocks the next one."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointError(f"cannot create lock file {self.path}: {error_cause(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CheckpointError(f"run directory {self.path.parent} is in use by another training process "
                                  f"(pid {holder}); wait for it to finish or choose another train.out_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()



def open_run_dir(cfg: RunConfig) -> tuple[RunLock, Optional[Path]]:
    """Apply the resume rules to cfg.out_dir, lock it, and return the checkpoint to resume from (None: fresh)."""
    run_dir, mode = cfg.out_dir, cfg.train.resume
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.out_dir {run_dir} is a file, not a directory")
    ours = (".lock", LAUNCH_LOG)
    contents = sorted(p.name for p in run_dir.iterdir() if p.name not in ours) if run_dir.is_dir() else []
    if mode == "false" and contents:
        raise ConfigError(f"run directory {run_dir} is not empty and train.resume=false: choose another "
                          f"train.out_dir (or name), or use train.resume=auto to continue it")
    if mode == "true" and not ck.list_checkpoints(run_dir):
        raise CheckpointError(f"train.resume=true but {run_dir} has no checkpoint to resume from")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create run directory {run_dir}: {e.strerror or e}") from None
    lock = RunLock(run_dir).acquire()
    try:
        found = ck.find_resumable(run_dir, say=print)
        foreign = [name for name in contents if name not in RUN_FILES]
        if found is None and foreign:
            raise ConfigError(f"run directory {run_dir} holds other files ({', '.join(foreign[:3])}) and no "
                              f"checkpoint; choose another train.out_dir")
        if found is not None:
            check_same_training(found, cfg)  # before anything is read into or written to the run
    except BaseException:
        lock.release()
        raise
    return lock, found


def _first_difference(old: dict, new: dict, prefix: str) -> Optional[tuple[str, object, object]]:
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}.{key}")
            if found:
                return found
        elif a != b and key not in RESUMABLE_MODEL_KEYS:
            return f"{prefix}.{key}", a, b
    return None


def check_same_model(ckpt: Path, cfg: RunConfig) -> None:
    """Refuse to resume a checkpoint whose resolved model section differs from `cfg`'s, naming the first key."""
    old = ck.read_manifest(ckpt).get("config", {}).get("model", {})
    diff = _first_difference(old, cfg.to_dict()["model"], "model")
    if diff:
        key, was, now = diff
        raise ConfigError(f"{key}={now!r} differs from the checkpoint in {ckpt.parent.parent} ({key}={was!r}); a "
                          f"run's model cannot change on resume: use its settings or a new train.out_dir")


def _budget_steps(train: dict, seq_len: object) -> Optional[int]:
    try:
        steps, _ = plan_budget(SimpleNamespace(**{k: train.get(k) for k in ("micro_batch_size", "grad_accum",
                                                                          *BUDGET_KEYS)}), int(seq_len))
        return int(steps)
    except (TypeError, ValueError):  # an unreadable old config: compare the keys themselves
        return None


def check_same_training(ckpt: Path, cfg: RunConfig) -> None:
    """Refuse to resume `ckpt` with train settings other than the ones it was trained with (see
    RESUMABLE_TRAIN_KEYS, BUDGET_KEYS), naming every differing key with both values. Keys an older checkpoint did not
    record count as their defaults; keys the schema no longer has are ignored."""
    saved = ck.read_manifest(ckpt).get("config", {})
    old = {**TrainConfig().model_dump(mode="json"), **(saved.get("train") or {})}
    new = cfg.to_dict()["train"]
    diffs = [k for k in new if k not in RESUMABLE_TRAIN_KEYS and k not in BUDGET_KEYS and old.get(k) != new[k]]
    old_steps = _budget_steps(old, (saved.get("model") or {}).get("max_seq_len"))
    new_steps = _budget_steps(new, cfg.model.max_seq_len)
    if old_steps is None or new_steps is None or new_steps < old_steps:
        diffs += [k for k in BUDGET_KEYS if old.get(k) != new.get(k)]
    if diffs:
        shown = ", ".join(f"train.{k}={new[k]!r} (checkpoint: {old.get(k)!r})" for k in diffs)
        raise ConfigError(f"resuming {ckpt.parent.parent} would change the run: {shown}; a resume keeps the "
                          f"checkpoint's train settings (the budget may only grow): use them, or a new train.out_dir")


def resolve_vocab(cfg: RunConfig, vocab_size: int) -> RunConfig:
    if cfg.model.vocab_size is None:
        return cfg.model_copy(update={"model": dataclasses.replace(cfg.model, vocab_size=vocab_size)})
    if cfg.model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({vocab_size}); set it to >= {vocab_size} or null")
    return cfg


def final_record(metrics_path: Path, step: int) -> Optional[dict]:
    """The run's `final` metrics record if the last one was written at `step` (a finished run), else None."""
    try:
        finals = [r for r in read_metrics(metrics_path) if r.get("type") == "final"]
    except (OSError, ValueError):
        return None
    return finals[-1] if finals and finals[-1].get("step") == step else None


def write_run_files(run_dir: Path, cfg: RunConfig, tokenizer_path: str | Path, step: int,
                    max_steps: int) -> MetricsLog:
    """Write the run directory's config.yaml and tokenizer.json (a resumed run keeps its tokenizer and warns when
    the data cache's differs) and open metrics.jsonl: emptied for a fresh run; for a resumed one cut after `step`
    unless the run is finished there (its final record stays)."""
    ck.write_atomic(run_dir / "config.yaml", cfg.to_yaml())
    tokenizer = Path(tokenizer_path).read_bytes()
    run_tokenizer = run_dir / "tokenizer.json"
    if step > 0 and run_tokenizer.exists():
        if run_tokenizer.read_bytes() != tokenizer:
            warn(f"the data cache's tokenizer differs from {run_tokenizer} (kept); was the data rebuilt?")
    else:
        ck.write_atomic(run_tokenizer, tokenizer)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    if step == 0:
        metrics.reset()
    elif step < max_steps or not final_record(metrics.path, step):
        metrics.truncate_after(step)
    return metrics
