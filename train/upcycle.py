"""Upcycling (`model.ffn.upcycle_from: <run dir>`): an MoE run starts from a finished dense run's weights.

Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): attention, embeddings, norms and the LM head are the
parent's; every expert starts as a copy of its layer's parent FFN; the router keeps its fresh initialisation.
Granular upcycling (finer experts, d_ff = F_parent / G with G > 1; "Upcycling Large Language Models into Mixture of
Experts", He et al. 2024, arXiv 2410.07524; DeepSeekMoE's fine-grained segmentation): the parent's inner dimension is
cut into G consecutive segments, expert e holds segment e mod G (n_experts a multiple of G) with its down-projection
scaled by G, so a token whose renormalised gates are equal over its k chosen segments gets, in expectation over which
segments it chose, the parent's output.

When the step-0 model is the parent's function (tests/test_upcycle.py):
- copies (G = 1): whenever a token's gates sum to 1, i.e. norm_topk_prob with top_k >= 2 (or a single expert):
  Σ_k w_k·FFN(x) = FFN(x) whatever the router says. top_k = 1 keeps the router probability as the gate (p·FFN(x)),
  norm_topk_prob=false leaves Σ w_k < 1: not equal.
- segments (G > 1): only when every token takes all G segments with gate 1/G each: n_experts = top_k = G,
  norm_topk_prob, and a uniform router. Upcycling zeroes the router weights in exactly that case (every expert is
  chosen, so a uniform router's ties do not matter). With top_k < n_experts the step-0 model is another function:
  the router learns which segments to combine.
Equal means up to fp32 rounding: the MoE adds gate-weighted partial outputs where the parent runs one matmul.

Refused, with the reason: a parent that is not a finished dense or GLU run, another model shape, expert type or
activation, a width that does not divide the parent's, shared or null experts (no parent counterpart), another
tokenizer. Weights are read from the parent's model.safetensors only (safetensors, never pickle).

Continuing (`train.init_from: <run dir>`): a fresh run of the *same* model starts from a finished run's weights, with
a fresh optimizer and schedule: the "train the dense model on" control that an upcycled MoE is compared against at
equal extra tokens (configs/compare/upcycle.yaml). Refused: a parent that is not a finished run, one whose model.*
config differs from this run's (the keys are listed), another tokenizer, and combining it with upcycle_from.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import torch

from train.checkpoint import WEIGHTS
from train.train_state import load_weights
from train.config import RunConfig
from train.config_load import read_yaml, validate_config
from train.errors import ConfigError
from train.runs import read_final
from train.sweep import flatten

# model.* keys that must equal the parent's for its weights to mean the same thing
SAME_MODEL_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "tie_word_embeddings", "rope_theta", "rms_norm_eps")
KEY = "model.ffn.upcycle_from"
INIT_KEY = "train.init_from"
# model.* keys that say where the weights came from, not what the model is: a continued upcycled MoE keeps its own
PROVENANCE_KEYS = ("model.ffn.upcycle_from",)


def upcycle(model: torch.nn.Module, model_cfg, tokenizer_path: Optional[str | Path] = None,
            say: Callable[[str], None] = print) -> dict:
    """Fill `model` (a freshly built MiniMindForCausalLM of `model_cfg`, an MoE) from model_cfg.ffn.upcycle_from.
    Call before the optimizer and any parallel wrapping/sharding. Returns {parent, segments, copies_per_segment}."""
    from model.config import resolve_d_ff
    from model.model_minimind import MiniMindForCausalLM

    parent_dir = Path(model_cfg.ffn.upcycle_from)
    parent_cfg = _parent_config(parent_dir)
    segments = check_upcycle(model_cfg, parent_cfg.model, parent_dir)
    _check_tokenizer(parent_dir, tokenizer_path, KEY)
    pm, ffn = parent_cfg.model, model_cfg.ffn
    width = resolve_d_ff(ffn, model_cfg.hidden_size)
    parent = MiniMindForCausalLM(pm)
    load_weights(parent, parent_dir / WEIGHTS)
    _copy(parent, model, segments, width, pm.ffn.type == "glu")
    info = {"parent": str(parent_dir), "segments": segments, "copies_per_segment": ffn.n_experts // segments}
    what = "copies of the parent FFN" if segments == 1 else f"{segments} segments of the parent FFN (down × {segments})"
    say(f"upcycled from {parent_dir}: {ffn.n_experts} experts = {what}")
    return info


def check_upcycle(model_cfg, pm, parent_dir: Path) -> int:
    """Refuse an MoE `model_cfg` that cannot start from a parent of model config `pm` (read from its run directory,
    or planned by a sweep before the parent exists); returns G, the parent FFN segments per expert."""
    from model.config import resolve_d_ff

    ffn = model_cfg.ffn
    if ffn.type != "moe":
        raise ConfigError(f"{KEY} needs model.ffn.type=moe (this run's type is {ffn.type})")
    if pm.ffn.type not in ("glu", "dense"):
        raise ConfigError(f"{KEY}={parent_dir}: the parent's model.ffn.type is {pm.ffn.type}; only a dense or glu "
                          f"FFN can be upcycled")
    if (ffn.expert_type, ffn.expert_activation) != (pm.ffn.type, pm.ffn.activation):
        raise ConfigError(f"{KEY}: the parent's FFN is {pm.ffn.type} {pm.ffn.activation}; set model.ffn.expert_type="
                          f"{pm.ffn.type} and model.ffn.expert_activation={pm.ffn.activation} (experts are its copies)")
    if ffn.n_shared_experts or ffn.n_null_experts:
        raise ConfigError(f"{KEY}: shared and null experts have no counterpart in the dense parent; set "
                          f"model.ffn.n_shared_experts=0 and model.ffn.n_null_experts=0")
    for key in SAME_MODEL_KEYS:
        if getattr(model_cfg, key) != getattr(pm, key):
            raise ConfigError(f"{KEY}: model.{key} is {getattr(model_cfg, key)} here and {getattr(pm, key)} in the "
                              f"parent {parent_dir}")
    f_parent, width = resolve_d_ff(pm.ffn, pm.hidden_size), resolve_d_ff(ffn, model_cfg.hidden_size)
    if f_parent % width or ffn.n_experts % (f_parent // width):
        raise ConfigError(f"{KEY}: model.ffn.d_ff={width} must divide the parent's FFN width {f_parent} into G "
                          f"segments with n_experts={ffn.n_experts} a multiple of G (copies: d_ff={f_parent})")
    return f_parent // width


def init_from(model: torch.nn.Module, cfg: RunConfig, tokenizer_path: Optional[str | Path] = None,
              say: Callable[[str], None] = print) -> dict:
    """Load train.init_from's model.safetensors into `model` (freshly built from cfg.model, vocabulary resolved).
    Call before the optimizer and any parallel wrapping/sharding, and only for a fresh run (a resumed run has its
    own checkpoint). Returns {parent}."""
    parent_dir = Path(cfg.train.init_from)
    if cfg.model.ffn.upcycle_from:  # the config schema refuses this too; a config built in Python may not be checked
        raise ConfigError(f"{INIT_KEY} and {KEY} are both set; set one (init_from: the same model, upcycle_from: an "
                          f"MoE from a dense parent)")
    parent_cfg = _parent_config(parent_dir, INIT_KEY)
    diff = model_differences(cfg.model, parent_cfg.model)
    if diff:
        raise ConfigError(f"{INIT_KEY}={parent_dir}: the parent's model differs in {', '.join(diff)}; init_from "
                          f"needs the same model.* config (an MoE from a dense parent: {KEY})")
    _check_tokenizer(parent_dir, tokenizer_path, INIT_KEY)
    load_weights(model, parent_dir / WEIGHTS)
    say(f"initialised from {parent_dir}: its weights, a fresh optimizer and schedule")
    return {"parent": str(parent_dir)}


def model_differences(model_cfg, parent_model_cfg) -> list[str]:
    """The model.* keys (dotted) whose values differ between two model configs, provenance keys aside."""
    mine = flatten({"model": dataclasses.asdict(model_cfg)})
    theirs = flatten({"model": dataclasses.asdict(parent_model_cfg)})
    return sorted(k for k in set(mine) | set(theirs)
                  if k not in PROVENANCE_KEYS and mine.get(k) != theirs.get(k))


def _check_tokenizer(parent_dir: Path, tokenizer_path: Optional[str | Path], key: str) -> None:
    if tokenizer_path is not None and (parent_dir / "tokenizer.json").read_bytes() != Path(tokenizer_path).read_bytes():
        raise ConfigError(f"{key}: {parent_dir / 'tokenizer.json'} differs from this run's tokenizer; the parent's "
                          f"embeddings belong to its own tokenizer")


def _parent_config(parent_dir: Path, key: str = KEY) -> RunConfig:
    if not (parent_dir / "config.yaml").is_file():
        raise ConfigError(f"{key}={parent_dir}: not a run directory (no config.yaml)")
    if read_final(parent_dir) is None or not (parent_dir / WEIGHTS).is_file():
        raise ConfigError(f"{key}={parent_dir}: not a finished run (no final record in metrics.jsonl or no {WEIGHTS})")
    return validate_config(read_yaml(parent_dir / "config.yaml"), source=str(parent_dir / "config.yaml"))


@torch.no_grad()
def _copy(parent: torch.nn.Module, model: torch.nn.Module, segments: int, width: int, glu: bool) -> None:
    parent_sd = parent.state_dict()
    for name, t in model.state_dict().items():  # state_dict tensors share the parameters' storage
        if ".ffn." in name:
            continue
        src = parent_sd.get(name)
        if src is None or src.shape != t.shape:
            raise ConfigError(f"{KEY}: the parent has no weight {name} of shape {tuple(t.shape)}")
        t.copy_(src)
    for parent_layer, layer in zip(parent.model.layers, model.model.layers):
        dense, moe = parent_layer.ffn, layer.ffn
        if glu:
            gate_FD, up_FD = dense.gate_up_proj.weight.chunk(2, dim=0)
        else:
            gate_FD, up_FD = None, dense.up_proj.weight
        down_DF = dense.down_proj.weight
        for e in range(moe.n_experts):
            seg = slice(e % segments * width, (e % segments + 1) * width)
            moe.experts.w_up[e].copy_(torch.cat([gate_FD[seg], up_FD[seg]]) if glu else up_FD[seg])
            moe.experts.w_down[e].copy_(down_DF[:, seg] * segments)
        moe.router.selection_bias.zero_()
        if segments > 1 and moe.top_k == moe.n_experts:  # all chosen: a uniform router makes every gate 1/G
            moe.router.gate.weight.zero_()
