"""Checkpoints: atomic save, verified safe load, exact-resume state, `load_run`.

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

A model sharded with FSDP2 (train.parallel=fsdp) writes the same files as a single process: `model_state` gathers
the full fp32 weights onto rank 0's CPU (torch.distributed.checkpoint's get_model_state_dict, same names, a tied
embedding stored once) and `optimizer_state` the optimizer's own state_dict with every sharded moment made whole, so
a checkpoint loads in one process, exports to transformers and resumes under any world size. `load_weights` and
`load_optimizer_state` shard them again (set_model_state_dict; the moments cut like their parameters).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from train import fsutil
from train.errors import CheckpointError

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
# Weights

def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` was sharded with FSDP2's fully_shard (its parameters are DTensor shards). Imports nothing:
    a process that never loaded torch.distributed.fsdp has no sharded model."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def model_state(model: torch.nn.Module) -> dict:
    """The full state dict with the single-process names: `model.state_dict()`, or for an FSDP2 model the full fp32
    tensors gathered onto rank 0's CPU ({} on the other ranks; a collective: every rank must call it, in step).
    The gathered copies of a tied parameter (embedding / LM head) are made one tensor again, so `weights_to_bytes`
    stores it once under the same name as a single process does."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    tensors = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        target = first.setdefault(id(p), name)
        if target != name and target in tensors and name in tensors:
            tensors[name] = tensors[target]
    return tensors


def weights_to_bytes(model: torch.nn.Module, metadata: Optional[dict] = None,
                     state_dict: Optional[dict] = None) -> bytes:
    """The model's state dict (or `state_dict`, e.g. `model_state`'s gathered one) as safetensors bytes (fp32 params
    as they are). Tied tensors are stored once; the metadata key `aliases` (JSON) maps each dropped name to the stored
    one."""
    from safetensors.torch import save

    tensors, aliases, seen = {}, {}, {}
    for name, t in (model.state_dict() if state_dict is None else state_dict).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    meta = {"format": "pt", "aliases": json.dumps(aliases)}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    return save(tensors, metadata=meta)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a safetensors file written by `weights_to_bytes` (or any file with the model's names) into `model`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        aliases = json.loads(meta.get("aliases", "{}"))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"cannot read weights {path}: {error_cause(e)}") from None
    for name, target in aliases.items():
        if target in tensors:
            tensors[name] = tensors[target]
    try:
        if is_sharded(model):  # every rank holds the full tensors and keeps its own shard (a collective)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=True))
        else:
            model.load_state_dict(tensors, strict=True)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"weights in {path} do not fit the model: {' '.join(first[:2])[:300]}") from None


# ----------------------------------------------------------------------------------------------------------------
# Optimizer state of a sharded model

def _torch_optimizers(optimizer) -> list:
    """The torch optimizers behind `optimizer`: itself, or those a combined optimizer holds as attributes."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    return [v for v in vars(optimizer).values() if isinstance(v, torch.optim.Optimizer)]


def optimizer_state(optimizer, model: torch.nn.Module) -> dict:
    """`optimizer.state_dict()`, the format a single process saves and loads (parameters by index). For an FSDP2
    model every DTensor in it (the moments of sharded parameters) is gathered whole onto rank 0's CPU, one tensor at
    a time; the other ranks get the same structure with None in those places (a collective: every rank calls it)."""
    state = optimizer.state_dict()
    if not is_sharded(model):
        return state
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    keep = dist.get_rank() == 0

    def full(obj):
        if isinstance(obj, DTensor):
            t = obj.full_tensor()
            return t.cpu() if keep else None
        if isinstance(obj, dict):
            return {k: full(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(full(v) for v in obj)
        return obj

    return full(state)


def load_optimizer_state(optimizer, state: dict, model: torch.nn.Module) -> None:
    """`optimizer.load_state_dict(state)` for a state from `optimizer_state` (or any single-process checkpoint); for
    an FSDP2 model each loaded tensor shaped like its DTensor parameter is then cut into that parameter's shard
    (every rank holds the full state; no communication)."""
    optimizer.load_state_dict(state)
    if not is_sharded(model):
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    for opt in _torch_optimizers(optimizer):
        for param, values in opt.state.items():
            if not isinstance(param, DTensor):
                continue
            for key, value in values.items():
                if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.shape:
                    values[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                                    src_data_rank=None)


# ----------------------------------------------------------------------------------------------------------------
# RNG state (as tensors and ints so that state.pt stays weights_only-loadable)

def capture_rng() -> dict:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    from train.config import read_yaml, validate_config
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
