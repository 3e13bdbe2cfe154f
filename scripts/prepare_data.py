"""Prepare (or reuse) a corpus: tokenizer + token shards under data.cache_dir, then print a summary.

    python scripts/prepare_data.py --config configs/base.yaml
    python scripts/prepare_data.py --config configs/data/local-text.yaml data.path='my/books/*.txt'
"""
from __future__ import annotations

from _cli import make_parser, run_main

from train.config_load import load_config
from train.data import prepare_data


def summary(prepared) -> str:
    meta = prepared.meta
    rows = [f"{'split':<6}{'documents':>12}{'bytes':>16}{'tokens':>14}{'bytes/token':>13}"]
    for split in ("train", "val"):
        docs, n_bytes, tokens = meta[f"{split}_documents"], meta[f"{split}_bytes"], meta[f"{split}_tokens"]
        rows.append(f"{split:<6}{docs:>12,}{n_bytes:>16,}{tokens:>14,}{n_bytes / tokens:>13.3f}")
    how = "reused" if prepared.reused else "built"
    lines = [f"corpus  {meta['corpus_id']} ({meta['spec']['corpus']['corpus']})", *rows,
             f"vocab   {prepared.vocab_size} tokens, eos id {prepared.eos_id} ({meta['eos_token']}), "
             f"shards {prepared.dtype.name}",
             f"cache   {prepared.dir} ({how} in {prepared.seconds:.2f} s)"]
    info = meta.get("info", {})
    if "val_plays" in info:
        lines.insert(4, f"val     held-out plays: {', '.join(info['val_plays'])}")
    replaced = meta["train_replaced_chars"] + meta["val_replaced_chars"]
    if replaced:
        lines.append(f"note    {replaced} U+FFFD replacement characters in the text (invalid UTF-8 in the input)")
    return "\n".join(lines)


def main() -> int:
    args = make_parser("Prepare (or reuse) the tokenizer and token shards of a data config.").parse_args()
    cfg = load_config(args.config, args.overrides)
    print(summary(prepare_data(cfg.data, progress=True)))
    return 0


if __name__ == "__main__":
    run_main(main)
