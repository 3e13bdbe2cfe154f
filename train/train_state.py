"""What a checkpoint holds besides its files' bookkeeping (train/checkpoint.py): the model's weights as safetensors
bytes, the optimizer's state and the RNG states, for one process or an FSDP2-sharded model.

A model sharded with FSDP2 (train.parallel=fsdp) saves the same as a single process: `model_state` gathers the full
fp32 weights onto rank 0's CPU (torch.distributed.checkpoint's get_model_state_dict, same names, a tied embedding
stored once) and `optimizer_state` the optimizer's own state_dict with every sharded moment made whole, so a
checkpoint loads in one process, exports to transformers and resumes under any world size. `load_weights` and
`load_optimizer_state` shard them again (set_model_state_dict; the moments cut like their parameters). Nothing here
unpickles: weights come from safetensors, and the RNG state is tensors and ints (weights_only-loadable).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from train.errors import CheckpointError
from train.fsutil import os_cause

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
        raise CheckpointError(f"cannot read weights {path}: {os_cause(e)}") from None
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
# What the trainer keeps beside them

def restore_moe_windows(model: torch.nn.Module, state: dict, rank: int) -> None:
    """Put each MoE layer's open logging window (load counts, routing-health counters) of this rank back, so that a
    resumed run's next train line matches the uninterrupted run's. Older checkpoints hold the load counts only (per
    rank, or rank 0's)."""
    windows = state.get("moe_windows_per_rank") or []
    if windows:
        for layer, window in zip(model.moe_layers(), windows[min(rank, len(windows) - 1)]):
            layer.load_window_state(window)
        return
    loads = state.get("expert_load_counts_per_rank") or []
    loads = loads[rank] if rank < len(loads) else state.get("expert_load_counts") or []
    for layer, counts in zip(model.moe_layers(), loads):
        layer.load_counts.copy_(counts)


def unsharded_copy(model: torch.nn.Module, model_config, rt) -> Optional[torch.nn.Module]:
    """The model rank 0 generates samples with: `model` itself, or under FSDP a plain copy built from the gathered
    full weights (a collective; None on the other ranks): generation runs on rank 0 alone, and a sharded model's
    forward would wait for the other ranks to join its all-gathers. `rt` is the run's train.runtime.Runtime."""
    from model.model_minimind import MiniMindForCausalLM

    if not rt.fsdp:
        return model
    tensors = model_state(model)
    if not rt.is_main:
        return None
    with torch.random.fork_rng(devices=[]):  # building it initialises weights: leave the run's RNG alone
        plain = MiniMindForCausalLM(model_config)
    plain.load_state_dict(tensors, strict=True)
    return plain.to(rt.device)
