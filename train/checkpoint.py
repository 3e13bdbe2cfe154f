"""Checkpoints: atomic save, verified safe load, `load_run`.

Layout of a run directory:
    config.yaml, tokenizer.json, metrics.jsonl, samples.json, samples.md
    model.safetensors, state.pt        hard links to (or copies of) the latest checkpoint's files, for tools
    checkpoints/step_000200/           one complete checkpoint:
        model.safetensors              fp32 weights (tied weights stored once, aliases in the metadata)
        state.pt                       training state: tensors and primitive containers only (weights_only-loadable)
        manifest.json                  step, resolved config, size + sha256 of the two files above
    .lock                              fcntl lock held by the training process (train/rundir.py)

A checkpoint is written into `checkpoints/.tmp-...`, fsynced, its manifest written last, then renamed into place, so
a directory named `step_*` is always complete; a kill at any moment leaves at worst a stale temp directory. Loading
verifies sizes and hashes and falls back to the previous checkpoint when one is damaged. Nothing here unpickles
arbitrary objects: weights come from safetensors, state from `torch.load(weights_only=True)`.

The weights, optimizer and RNG state inside (also for FSDP2-sharded models): train/train_state.py.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from train import fsutil
from train.errors import CheckpointError
from train.train_state import load_weights, weights_to_bytes

CKPT_SUBDIR = "checkpoints"
WEIGHTS, STATE, MANIFEST = "model.safetensors", "state.pt", "manifest.json"
_STEP_RE = re.compile(r"^step_(\d+)$")


# ----------------------------------------------------------------------------------------------------------------
# Small file helpers (train/fsutil.py). `_write_bytes` and `_fsync_dir` are module names here, looked up at each
# call, so that tests (tests/faultkit.py, tests/test_checkpoint.py) can cut a checkpoint write short.

_write_bytes = fsutil.write_fsynced
_fsync_dir = fsutil.fsync_dir
error_cause = fsutil.os_cause


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a whole run file via temp + rename (`train.fsutil.write_atomic`); on failure the old file is intact and
    CheckpointError names the path."""
    fsutil.write_atomic(path, data, error=fsutil.write_error(CheckpointError), write=_write_bytes)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Save

def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_SUBDIR / f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Directories named step_N under run_dir/checkpoints, oldest first (completeness is checked by `verify`)."""
    root = Path(run_dir) / CKPT_SUBDIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict, config: dict,
                    keep_last: int, tensors: Optional[dict] = None) -> Path:
    """Write checkpoint `step` atomically, point the top-level files at it, keep the newest `keep_last`. `tensors`:
    the state dict to write instead of `model.state_dict()` (`model_state`'s, gathered from an FSDP2 model).

    Any failure to write leaves every existing checkpoint untouched and raises CheckpointError(path, cause).
    """
    run_dir = Path(run_dir)
    root = run_dir / CKPT_SUBDIR
    final = checkpoint_path(run_dir, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if final.is_dir() and _verifies(final):
        # The same step again (e.g. stopped right after resuming): same weights and state, keep the intact copy
        # rather than open a window in which no complete checkpoint of this step exists.
        return _finish_save(run_dir, final, step, keep_last)
    try:
        weights = weights_to_bytes(model, {"step": step}, tensors)
        buf = io.BytesIO()
        torch.save(state, buf)
        state_bytes = buf.getvalue()
        manifest = {"format": 1, "step": step, "created": time.time(), "config": config,
                    "files": {WEIGHTS: {"size": len(weights), "sha256": _sha256(weights)},
                              STATE: {"size": len(state_bytes), "sha256": _sha256(state_bytes)}}}
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_bytes(tmp / WEIGHTS, weights)
        _write_bytes(tmp / STATE, state_bytes)
        _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())  # last: marks the files complete
        _fsync_dir(tmp)
        old = None
        if final.exists():  # a damaged checkpoint of this step (resume passed over it): move it aside, then replace
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {error_cause(e)}") from None
    return _finish_save(run_dir, final, step, keep_last)


def _finish_save(run_dir: Path, final: Path, step: int, keep_last: int) -> Path:
    for name in (WEIGHTS, STATE):
        _publish(final / name, run_dir / name)
    _prune(run_dir, step, keep_last)
    return final


def _verifies(ckpt: Path) -> bool:
    try:
        verify_checkpoint(ckpt)
        return True
    except CheckpointError:
        return False


def _publish(src: Path, dst: Path) -> None:
    """Atomically make `dst` a hard link to (or, where links fail, a copy of) `src`."""
    tmp = fsutil.temp_path(dst)
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {dst}: {error_cause(e)}") from None


def _prune(run_dir: Path, newest: int, keep_last: int) -> None:
    """Keep the `keep_last` newest checkpoints up to `newest`. Ones above `newest` were passed over as unusable
    when this run resumed, so they go too. Stale temp directories (from killed writers) are removed."""
    root = Path(run_dir) / CKPT_SUBDIR
    ckpts = list_checkpoints(run_dir)
    older = [p for s, p in ckpts if s <= newest]
    doomed = older[:-keep_last] + [p for s, p in ckpts if s > newest]
    doomed += [p for p in root.iterdir() if p.name.startswith((".tmp-", ".old-", ".trash-"))]
    for path in doomed:
        trash = path
        if not path.name.startswith("."):  # rename first: a kill mid-delete must not leave a half `step_*`
            trash = root / f".trash-{path.name}-{os.getpid()}"
            try:
                os.replace(path, trash)
            except OSError:
                continue
        shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Load

def read_manifest(ckpt: Path) -> dict:
    path = Path(ckpt) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} is incomplete: no {MANIFEST}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {error_cause(e)}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path} is not a checkpoint manifest")
    return manifest


def verify_checkpoint(ckpt: Path) -> dict:
    """Check every file against the sizes and hashes recorded at write time; returns the manifest."""
    manifest = read_manifest(ckpt)
    for name in (WEIGHTS, STATE):
        info = manifest["files"].get(name)
        path = Path(ckpt) / name
        if info is None:
            raise CheckpointError(f"{Path(ckpt) / MANIFEST} does not list {name}")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{path} has {size} bytes, {info['size']} were written (truncated or replaced)")
        if _sha256_file(path) != info["sha256"]:
            raise CheckpointError(f"{path} does not match its recorded sha256 (damaged)")
    return manifest


def find_resumable(run_dir: Path, say: Callable[[str], None] = print) -> Optional[Path]:
    """The newest checkpoint that verifies, saying which damaged ones were passed over; None when there are none.
    Raises CheckpointError when checkpoints exist but none is usable."""
    ckpts = list_checkpoints(run_dir)
    problems = []
    for _, path in reversed(ckpts):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            say(f"warning: checkpoint {path.name} is unusable: {e}")
            continue
        if problems:
            say(f"falling back to the previous good checkpoint {path}")
        return path
    if problems:
        raise CheckpointError(f"no usable checkpoint in {Path(run_dir) / CKPT_SUBDIR}: {problems[0]}")
    return None


def load_state(ckpt: Path) -> dict:
    """The training state of a checkpoint; refuses anything but tensors and primitive containers."""
    path = Path(ckpt) / STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        reason = error_cause(e).split(". ")[0][:200]
        raise CheckpointError(f"refusing to load {path}: not a plain tensor/primitive state file ({reason})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a training state file (no 'step')")
    return state


# ----------------------------------------------------------------------------------------------------------------
# For other scripts

def load_run(run_dir: str | Path, device: str = "cpu"):
    """(model in eval mode, tokenizer, RunConfig) of a run directory: the newest verified checkpoint's weights, or
    the top-level model.safetensors when the directory has no checkpoints (e.g. an exported run)."""
    from model.model_minimind import MiniMindForCausalLM
    from train.config_load import read_yaml, validate_config
    from train.data import load_tokenizer

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    ckpt = find_resumable(run_dir, say=lambda msg: print(msg))
    if ckpt is not None:
        cfg = validate_config(read_manifest(ckpt)["config"], source=str(ckpt / MANIFEST))
        weights = ckpt / WEIGHTS
    else:
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.is_file():
            raise CheckpointError(f"{run_dir} is not a run directory: no config.yaml")
        cfg = validate_config(read_yaml(cfg_path), source=str(cfg_path))
        weights = run_dir / WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{run_dir} has no checkpoint and no {WEIGHTS}")
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{run_dir} has no tokenizer.json")
    tokenizer = load_tokenizer(tok_path)
    if cfg.model.vocab_size is None:
        raise CheckpointError(f"{run_dir}: config has no model.vocab_size")
    model = MiniMindForCausalLM(cfg.model)
    load_weights(model, weights)
    return model.to(device).eval(), tokenizer, cfg
