"""Print the resolved model of a config: per-module parameter table, total / active / non-embedding parameters,
training FLOPs per token and the FFN variant with its resolved width and share of parameters and FLOPs.

    python scripts/summary.py --config configs/base.yaml model.ffn.type=dense model.ffn.activation=gelu [--json]

The model is built on the meta device: no memory, no data preparation, instant even for large configs.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections import OrderedDict

from _cli import make_parser, run_main

import torch  # noqa: E402

from model.config import resolve_d_ff  # noqa: E402
from model.counting import meta_model  # noqa: E402
from model.registry import ffn_class  # noqa: E402
from train.config import ffn_label  # noqa: E402
from train.config_load import load_config  # noqa: E402


def resolve_vocab(cfg) -> tuple[int, str]:
    """The vocab size the model will get, and where it came from (without preparing any data)."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size, "model.vocab_size"
    return cfg.data.tokenizer.vocab_size, ("model.vocab_size is null: using data.tokenizer.vocab_size (the trained "
                                           "tokenizer may end up slightly smaller)")


def module_table(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(module path with layer indices collapsed to '*', parameters per instance, instances)."""
    per_name: OrderedDict[str, list[int]] = OrderedDict()
    for name, p in model.named_parameters():  # a tied LM head shares the embedding's tensor: listed once
        module = re.sub(r"\.\d+\.", ".*.", name.rsplit(".", 1)[0] if "." in name else name)
        per_name.setdefault(module, []).append(p.numel())
    rows = []
    layers = model.config.num_hidden_layers
    for module, sizes in per_name.items():
        instances = layers if ".*." in module else 1
        rows.append((module, sum(sizes) // instances, instances))
    return rows


def summarize(cfg) -> dict:
    vocab_size, vocab_source = resolve_vocab(cfg)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab_size)
    model = meta_model(model_cfg)
    counts = model.param_counts()
    share = model.ffn_share()
    ffn = model_cfg.ffn
    block = ffn_class(ffn.type)
    details = dict(block.describe(ffn))
    info = {
        "ffn_type": ffn.type,
        "ffn_label": ffn_label(ffn),
        "ffn_name": block.label(ffn),
        "ffn_activation": details.pop("activation", None),
        "ffn_d_ff": resolve_d_ff(ffn, model_cfg.hidden_size),
        "ffn_matched_on": block.matched_on,
        "total_params": counts["total"],
        "active_params": counts["active"],
        "non_embedding_params": counts["non_embedding"],
        "embedding_params": counts["embedding"],
        "attention_params": counts["attention"],
        "ffn_params": counts["ffn"],
        "ffn_active_params": counts["ffn_active"],
        "ffn_param_share": share["params"],
        "ffn_flop_share": share["flops"],
        "flops_per_token": model.flops_per_token(),
        "seq_len": model_cfg.max_seq_len,
        "vocab_size": vocab_size,
        "vocab_size_source": vocab_source,
        "hidden_size": model_cfg.hidden_size,
        "num_hidden_layers": model_cfg.num_hidden_layers,
        "tie_word_embeddings": model_cfg.tie_word_embeddings,
    }
    info.update(details)  # the block's own fields (MoE: n_experts, top_k, ...)
    info["modules"] = [dict(module=m, params=n, instances=k) for m, n, k in module_table(model)]
    return info


def print_human(info: dict) -> None:
    total = info["total_params"]
    print(f"{'module':<50} {'params':>12} {'x':>4} {'total':>12} {'share':>7}")
    for row in info["modules"]:
        all_params = row["params"] * row["instances"]
        name = row["module"] + (" (= lm_head, tied)" if row["module"] == "model.embed_tokens"
                                and info["tie_word_embeddings"] else "")
        print(f"{name:<50} {row['params']:>12,} {row['instances']:>4} {all_params:>12,} {all_params / total:>7.1%}")
    print()
    if info["vocab_size_source"] != "model.vocab_size":
        print(f"note: {info['vocab_size_source']} = {info['vocab_size']}")
    ffn = info["ffn_name"] + (f", d_ff={info['ffn_d_ff']}" + (" per expert" if "n_experts" in info else "")
                              if info["ffn_d_ff"] else "")
    lines = [
        ("FFN variant", ffn),
        ("parameter-matched on", f"{info['ffn_matched_on']} params"),
        ("total params", f"{total:,}"),
        ("active params / token", f"{info['active_params']:,}"),
        ("non-embedding params", f"{info['non_embedding_params']:,}"),
        ("embedding params", f"{info['embedding_params']:,}"),
        ("FFN params (active)", f"{info['ffn_params']:,} ({info['ffn_active_params']:,})"),
        ("FFN share of params", f"{info['ffn_param_share']:.1%}"),
        ("FFN share of FLOPs", f"{info['ffn_flop_share']:.1%}"),
        (f"training FLOPs / token (T={info['seq_len']})", f"{info['flops_per_token']:,}"),
    ]
    for key, value in lines:
        print(f"{key:<34} {value}")


def main() -> int:
    parser = make_parser("Print the resolved model: parameters, FLOPs per token, FFN variant.")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    info = summarize(cfg)
    if args.json:
        json.dump(info, sys.stdout)
        print()
    else:
        print_human(info)
    return 0


if __name__ == "__main__":
    run_main(main)
