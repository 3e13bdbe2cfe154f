"""Export a MiniMind model to a Hugging Face transformers directory that loads without custom code.

Only exact equivalents are written; everything else is refused with the reason (`ExportError`):
- dense GLU FFN -> `LlamaForCausalLM`: our block is LLaMA's (pre-norm RMSNorm, rotate-half RoPE, GQA, no biases) and
  LlamaMLP computes down(act(gate(x)) * up(x)) exactly like our GLUFFN (gate = the first half of gate_up_proj).
- MoE with GLU experts, softmax routing, top_k >= 2 and renormalised top-k weights -> `MixtralForCausalLM`, whose
  router is softmax over all experts -> top-k -> divide by the top-k sum, and whose experts store their weights as
  3-D tensors laid out like ours (gate_up_proj (E, 2F, D) with gate first, down_proj (E, D, F)).
Why the rest is refused: an ungated FFN, or no FFN, has no LLaMA-family equivalent (LlamaMLP always multiplies by a
gate); Mixtral has no shared experts, no sigmoid scoring, no selection bias and always renormalises the top-k weights
(so top_k=1 would give weight 1 where ours gives the router probability); Qwen3-MoE has the norm_topk_prob flag but
adds per-head q/k RMSNorm to attention, which our model does not have; token dropping (capacity_factor) has no
equivalent at all.

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


def hf_architecture(model) -> str:
    """'llama' or 'mixtral' for a model that maps exactly; ExportError naming the reason otherwise."""
    cfg = model.config
    ffn = cfg.ffn
    if ffn.type == "none":
        raise ExportError("model.ffn.type=none (attention-only blocks) has no transformers equivalent: every "
                          "LLaMA-family block has an MLP; only GLU and MoE variants can be exported")
    if ffn.type == "dense":
        raise ExportError(f"model.ffn.type=dense (ungated W_down·{ffn.activation}(W_up·x)) has no exact transformers "
                          f"equivalent: LlamaMLP always multiplies by a gate (act(gate·x)·(up·x)), and the ungated "
                          f"families (GPT-2, GPT-NeoX, ...) use LayerNorm/biases; only GLU and MoE variants export")
    activation = ffn.activation if ffn.type == "glu" else ffn.expert_activation
    if activation not in HF_ACTIVATIONS:
        raise ExportError(f"activation '{activation}' has no identical transformers activation; "
                          f"exportable: {', '.join(HF_ACTIVATIONS)}")
    if ffn.type == "glu":
        return "llama"
    # moe -> Mixtral, only where its routing is ours exactly
    why = None
    if ffn.expert_type != "glu":
        why = (f"model.ffn.expert_type={ffn.expert_type}: Mixtral experts are gated (act(gate·x)·(up·x)); "
               f"ungated experts have no equivalent")
    elif ffn.n_shared_experts:
        why = (f"model.ffn.n_shared_experts={ffn.n_shared_experts}: Mixtral has no shared experts (Qwen2-MoE's shared "
               f"expert has an extra sigmoid gate and attention biases, so it is not an exact match either)")
    elif ffn.router_scoring != "softmax":
        why = (f"model.ffn.router_scoring={ffn.router_scoring}: Mixtral scores experts with a softmax over all "
               f"router logits")
    elif ffn.top_k == 1:
        why = ("model.ffn.top_k=1: our top-1 gate weight is the router probability, Mixtral renormalises the top-k "
               "weights (giving 1); Qwen3-MoE could keep the probability but adds per-head q/k RMSNorm to attention")
    elif not ffn.norm_topk_prob:
        why = ("model.ffn.norm_topk_prob=false: Mixtral always renormalises the top-k weights; Qwen3-MoE has the flag "
               "but adds per-head q/k RMSNorm to attention, which our model does not have")
    elif ffn.capacity_factor is not None:
        why = (f"model.ffn.capacity_factor={ffn.capacity_factor}: tokens over an expert's capacity are dropped, "
               f"transformers' MoE models never drop tokens")
    elif any(bool(moe.router.selection_bias.any()) for moe in model.moe_layers()):
        why = ("the router's selection bias (aux-loss-free balancing, model.ffn.balancing=aux_free) is nonzero: it "
               "changes which experts are picked, and Mixtral's router has no such bias")
    if why:
        raise ExportError(f"cannot export this MoE as Mixtral: {why}")
    return "mixtral"


def hf_config(model, eos_id: int):
    """The transformers config (LlamaConfig or MixtralConfig) equivalent to `model`'s."""
    import transformers

    cfg, ffn = model.config, model.config.ffn
    arch = hf_architecture(model)
    first = model.model.layers[0].ffn
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.init_std, attention_dropout=0.0,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, use_cache=True)
    if arch == "llama":
        return transformers.LlamaConfig(**common, intermediate_size=first.down_proj.weight.shape[1],
                                        hidden_act=HF_ACTIVATIONS[ffn.activation], attention_bias=False,
                                        mlp_bias=False)
    return transformers.MixtralConfig(**common, intermediate_size=first.experts.d_ff,
                                      hidden_act=HF_ACTIVATIONS[ffn.expert_activation],
                                      num_local_experts=ffn.n_experts, num_experts_per_tok=ffn.top_k,
                                      router_jitter_noise=0.0, sliding_window=None,
                                      router_aux_loss_coef=ffn.aux_loss_coef)


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights under transformers' (Llama/Mixtral, v5 in-memory) names."""
    cfg = model.config
    arch = hf_architecture(model)
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
        if arch == "llama":
            gate_FD, up_FD = layer.ffn.gate_up_proj.weight.chunk(2, dim=0)
            out.update({p + "mlp.gate_proj.weight": gate_FD, p + "mlp.up_proj.weight": up_FD,
                        p + "mlp.down_proj.weight": layer.ffn.down_proj.weight})
        else:
            out.update({p + "mlp.gate.weight": layer.ffn.router.gate.weight,
                        p + "mlp.experts.gate_up_proj": layer.ffn.experts.w_up,
                        p + "mlp.experts.down_proj": layer.ffn.experts.w_down})
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
    cls = transformers.LlamaForCausalLM if config.model_type == "llama" else transformers.MixtralForCausalLM
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
