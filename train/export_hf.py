"""Export a MiniMind model to a Hugging Face transformers directory that loads without custom code.

Only exact equivalents are written; everything else is refused with the reason (`ExportError`). Which FFN maps to
what is asked of the block class (`hf_export(ffn)`: the architecture and activation, or ValueError with the reason;
`hf_weights()` on each layer's block: its weights under transformers' names, or ValueError when its state has no
equivalent). An unknown type is refused, never routed to another type's mapping. Today:
- GLU -> `LlamaForCausalLM`: our block is LLaMA's (pre-norm RMSNorm, rotate-half RoPE, GQA, no biases) and LlamaMLP
  computes down(act(gate(x)) * up(x)) exactly like our GLUFFN.
- MoE with GLU experts, softmax routing, top_k >= 2, renormalised top-k weights, no shared experts, no token dropping
  and a zero selection bias -> `MixtralForCausalLM` (see model/moe.py MoEFFN.hf_export for why the rest is refused).
- dense (ungated) and none: no LLaMA-family equivalent (LlamaMLP always multiplies by a gate).

transformers is a development/optional dependency: it is imported inside the functions that need it.
Shape suffixes: D hidden, F FFN (expert) width, E experts, H/G query/key-value heads, C head dim.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from model.config import resolve_d_ff
from model.registry import ffn_class
from train.errors import UserError

# Our activation name -> transformers ACT2FN name computing exactly the same function (checked in the tests).
HF_ACTIVATIONS = {
    "silu": "silu",  # F.silu
    "gelu": "gelu",  # F.gelu (erf)
    "gelu_tanh": "gelu_pytorch_tanh",  # F.gelu(approximate="tanh")
    "relu": "relu",
    "relu2": "relu2",  # relu(x)²
    "sigmoid": "sigmoid",
    "identity": "linear",  # the bilinear GLU
}


class ExportError(UserError):
    """The model has no exact transformers equivalent (the message says why)."""


# architecture (the block class picks it) -> transformers config class, model class, and the config values that
# say the rest of our block is theirs (no biases anywhere; full attention)
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=False, mlp_bias=False)),
              "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(sliding_window=None))}


def hf_mapping(model) -> dict:
    """The FFN block's transformers mapping ({"architecture", "activation", "config"}); ExportError naming the
    reason when there is none (the block class's own words)."""
    ffn = model.config.ffn
    try:
        mapping = dict(ffn_class(ffn.type).hf_export(ffn))
        for layer in model.model.layers:  # state the config cannot show (e.g. a nonzero MoE selection bias)
            if layer.ffn is None or not hasattr(layer.ffn, "hf_weights"):
                raise ValueError(f"model.ffn.type={ffn.type}: the block has no transformers weight mapping")
            layer.ffn.hf_weights()
    except ValueError as e:
        raise ExportError(str(e)) from None
    if mapping.get("architecture") not in HF_CLASSES:
        raise ExportError(f"model.ffn.type={ffn.type} maps to transformers architecture "
                          f"{mapping.get('architecture')!r}, which this exporter does not write; "
                          f"known: {', '.join(HF_CLASSES)}")
    if mapping.get("activation") not in HF_ACTIVATIONS:
        raise ExportError(f"activation '{mapping.get('activation')}' has no identical transformers activation; "
                          f"exportable: {', '.join(HF_ACTIVATIONS)}")
    return mapping


def hf_architecture(model) -> str:
    """'llama' or 'mixtral' for a model that maps exactly; ExportError naming the reason otherwise."""
    return hf_mapping(model)["architecture"]


def hf_config(model, eos_id: int):
    """The transformers config (LlamaConfig or MixtralConfig) equivalent to `model`'s."""
    import transformers

    cfg = model.config
    mapping = hf_mapping(model)
    config_name, _, arch_config = HF_CLASSES[mapping["architecture"]]
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.init_std, attention_dropout=0.0,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, use_cache=True,
        intermediate_size=resolve_d_ff(cfg.ffn, cfg.hidden_size), hidden_act=HF_ACTIVATIONS[mapping["activation"]])
    return getattr(transformers, config_name)(**common, **arch_config, **mapping.get("config", {}))


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights under transformers' (Llama/Mixtral, v5 in-memory) names."""
    cfg = model.config
    hf_mapping(model)
    H, G, C = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out = {"model.embed_tokens.weight": model.model.embed_tokens.weight,
           "model.norm.weight": model.model.norm.weight}
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.attn.qkv_proj.weight.split([H * C, G * C, G * C], dim=0)
        out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                    p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": layer.attn.o_proj.weight,
                    p + "input_layernorm.weight": layer.attn_norm.weight,
                    p + "post_attention_layernorm.weight": layer.ffn_norm.weight})
        out.update({p + "mlp." + name: t for name, t in layer.ffn.hf_weights().items()})
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    return {name: t.detach().to("cpu", torch.float32).contiguous().clone() for name, t in out.items()}


def needs_eager_experts(config) -> bool:
    """transformers' default MoE kernel (grouped_mm) needs 16-byte-aligned rows: widths that are multiples of 8 work
    in every dtype; other shapes must use its per-expert loop ("eager"), or the forward fails."""
    return config.model_type == "mixtral" and bool(config.intermediate_size % 8 or config.hidden_size % 8)


def to_hf_model(model, eos_id: int, attn_implementation: str = "sdpa"):
    """A transformers model (fp32, eval mode) holding exactly `model`'s weights."""
    import transformers

    config = hf_config(model, eos_id)
    config._attn_implementation = attn_implementation
    if needs_eager_experts(config):
        config._experts_implementation = "eager"
    cls = getattr(transformers, HF_CLASSES[config.model_type][1])
    hf = cls(config).to(torch.float32)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    if config.tie_word_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
        hf.tie_weights()
    if missing or unexpected:  # a bug in the name mapping, not a user error
        raise RuntimeError(f"transformers {config.model_type} weights do not match: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if config.tie_word_embeddings and hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("transformers did not tie lm_head to embed_tokens")
    hf.generation_config.bos_token_id = hf.generation_config.eos_token_id = eos_id
    hf.generation_config.pad_token_id = eos_id
    return hf.eval()


def hf_tokenizer(tokenizer_path: Path, eos_token: str, max_seq_len: int):
    from transformers import PreTrainedTokenizerFast

    # One special token marks document boundaries in our data, so it serves as bos, eos and pad.
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path), eos_token=eos_token, bos_token=eos_token,
                                   pad_token=eos_token, model_max_length=max_seq_len)


def export_run(run_dir: str | Path, out_dir: str | Path) -> tuple[Path, str]:
    """Write run_dir's checkpoint as a transformers directory at out_dir (which must not exist or be empty);
    returns (out_dir, the transformers class written)."""
    from train.checkpoint import load_run

    run_dir, out_dir = Path(run_dir), Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"--out {out_dir} already exists and is not an empty directory; choose a new path "
                          f"(nothing is overwritten)")
    model, tokenizer, cfg = load_run(run_dir)
    hf_architecture(model)  # refuse before writing anything
    eos_token = cfg.data.tokenizer.special_tokens[0]
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
        raise ExportError(f"{run_dir / 'tokenizer.json'} has no end-of-document token '{eos_token}'")
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ExportError("export needs the transformers package: pip install -r requirements-dev.txt") from None
    if int(transformers.__version__.split(".")[0]) < 5:  # v5 names (rope_parameters, fused expert tensors)
        raise ExportError(f"export needs transformers>=5 (found {transformers.__version__}): pip install -U "
                          f"'transformers>=5,<6'")
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    hf = to_hf_model(model, eos_id)
    hf_tok = hf_tokenizer(run_dir / "tokenizer.json", eos_token, cfg.model.max_seq_len)

    # Write next to the target and rename at the end, so a failure never leaves a half-written export.
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        hf.save_pretrained(tmp, safe_serialization=True)
        hf_tok.save_pretrained(tmp)
        # rope_theta at the top level as well: transformers 4.x reads it there (5.x from rope_parameters)
        extra = {"rope_theta": float(cfg.model.rope_theta)}
        if needs_eager_experts(hf.config):  # from_pretrained reads this key back
            extra["experts_implementation"] = "eager"
        _update_json(tmp / "config.json", extra)
        # the generic class name also loads with transformers 4.x (5.x maps it to its tokenizers backend)
        _update_json(tmp / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"})
        umask = os.umask(0)
        os.umask(umask)
        for path in tmp.iterdir():  # save_pretrained writes the weights owner-only (0600): use the usual mode
            os.chmod(path, 0o666 & ~umask)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"cannot write {out_dir}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir, type(hf).__name__


def _update_json(path: Path, values: dict) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(values)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
