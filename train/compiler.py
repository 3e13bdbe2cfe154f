"""torch.compile for training (`train.compile`): off, per block ("regional"), or the whole model.

- `blocks`: every transformer block is compiled in place (`nn.Module.compile`); blocks of one class share their
  compiled code (parameters are graph inputs), so a model compiles one block's graph whatever its depth. The
  embedding, the chunked LM-head loss (model/loss.py: a Python loop with its own backward) and the optimizer stay
  eager. Parameter names, checkpoints and DDP/FSDP wrapping are unchanged.
- `model`: `torch.compile` of the whole step model (the wrapper the training step calls); the model itself stays
  eager.
- `true` means `blocks`; `false` is eager; `auto` (the default) compiles the blocks when the run is long enough for
  the compile time to pay (`AUTO_MIN_STEPS`) and a C++ compiler is present (inductor needs one on CPU), else stays
  eager.

Evaluation and sampling run eager (`eager()`): they use other shapes and no autograd, which would compile again.
"""
from __future__ import annotations

import shutil
from contextlib import nullcontext
from typing import Union

import torch

CompileSetting = Union[bool, str]
# auto (the default): compile only runs of at least this many optimizer steps. Measured on the 2-core Xeon with AMX
# (README "Performance"): compiled blocks save 6-11% of a MiniMind2-small bf16 step and ~20% of a d=128 fp32 step
# (the main job's shape), but a cold compile (empty inductor cache) takes 54-84 s at d=128, which pays back only
# after ~1,150-1,400 steps there; short runs (the sweeps' 90-300 steps, the tests) would lose time to it.
AUTO_MIN_STEPS = 2000


def has_cxx_compiler() -> bool:
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


def resolve_compile(setting: CompileSetting, max_steps: int) -> str:
    """train.compile -> "off" | "blocks" | "model"."""
    if setting is True or setting == "blocks":
        return "blocks"
    if setting is False or setting == "off":
        return "off"
    if setting == "model":
        return "model"
    if setting == "auto":
        return "blocks" if max_steps >= AUTO_MIN_STEPS and has_cxx_compiler() else "off"
    raise ValueError(f"train.compile={setting!r}; valid: false, true, auto, blocks, model")


def compile_for_training(model: torch.nn.Module, step_model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Compile per `mode` (resolve_compile) -> the module a training step calls. `model` is the MiniMind model,
    `step_model` what wraps it for the step (DDP, or the model itself)."""
    if mode == "blocks":
        for block in model.model.layers:
            block.compile()
        return step_model
    if mode == "model":
        return torch.compile(step_model)
    return step_model


def eager(mode: str):
    """Context in which compiled blocks run eager (evaluation, sampling); nothing to do for the other modes."""
    if mode == "blocks":
        return torch.compiler.set_stance("force_eager")
    return nullcontext()
