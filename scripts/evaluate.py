"""Score a run's checkpoint: loss, perplexity and bits per byte on a validation split.

    python scripts/evaluate.py --run runs/shakespeare-glu-silu                 # the run's own validation set
    python scripts/evaluate.py --run runs/shakespeare-glu-silu --text my.txt   # all of your own text file
    python scripts/evaluate.py --run RUN --config configs/data/tinystories.yaml --json   # any corpus config
    python scripts/evaluate.py --run RUN data.corpus=local data.path='books/*.txt' data.sample_by=paragraph

Validation uses the same blocks as training (train.data.val_batches: consecutive max_seq_len blocks from the start
of the validation split, train.eval_tokens of them, null = the whole split; a last partial block is not scored) and
the run's precision (train.dtype autocast), so the run's own validation set gives the trainer's numbers exactly.
Text is always tokenized with the run's tokenizer.json. --text FILE is short for data.corpus=local data.path=FILE
data.val_path=FILE train.eval_tokens=null (the whole file, as one document). Without --config, data.* overrides
apply to the run's own data section, except that naming another corpus (data.corpus, data.path, data.hf_name)
starts from the default data settings (keeping data.cache_dir); with --config FILE they apply to FILE's data
section. Other overrides: train.eval_tokens, train.micro_batch_size (the evaluation batch), train.device,
train.dtype, train.num_threads.
"""
from __future__ import annotations

import sys
from pathlib import Path

from _cli import make_parser, run_main

EVAL_TRAIN_KEYS = ("eval_tokens", "micro_batch_size", "device", "dtype", "num_threads")
NEW_CORPUS = ("corpus", "path", "hf_name")  # changing one of these starts the data section from the defaults


def parse_args():
    parser = make_parser(__doc__.splitlines()[0], config_required=False)
    parser.add_argument("--run", required=True, help="run directory (runs/<name>) with a checkpoint")
    parser.add_argument("--text", help="score all of this text file (UTF-8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()
    if args.text is not None and args.config is not None:
        parser.error("use either --text FILE or --config FILE, not both")
    if args.text is not None and not Path(args.text).is_file():
        parser.error(f"--text: file not found: {args.text}")
    return args


def parse_overrides(overrides: list[str], text_file: str | None) -> tuple[list[tuple[str, object]], list[str]]:
    """(key, value) pairs to apply (data.* and the allowed train.*), and the data.* ones as given (for --config).
    Anything else is refused."""
    from train.config import parse_override
    from train.errors import ConfigError

    pairs, data_texts = [], []
    if text_file is not None:
        pairs = [("data.corpus", "local"), ("data.path", text_file), ("data.val_path", text_file),
                 ("data.format", "text"), ("data.sample_by", "document"), ("train.eval_tokens", None)]
    allowed = ", ".join(f"train.{k}" for k in EVAL_TRAIN_KEYS)
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("data.tokenizer"):
            raise ConfigError(f"override '{text}': evaluation always uses the run's tokenizer.json (the model only "
                              f"knows its token ids); data.tokenizer.* cannot be changed")
        if not key.startswith("data.") and key not in {f"train.{k}" for k in EVAL_TRAIN_KEYS}:
            raise ConfigError(f"override '{text}': evaluate.py takes data.* overrides and {allowed}; "
                              f"the model and training settings come from the run")
        pairs.append((key, value))
        if key.startswith("data."):
            data_texts.append(text)
    return pairs, data_texts


def eval_config(run_cfg, config_file, pairs: list[tuple[str, object]], data_texts: list[str]):
    """The RunConfig to evaluate with: the run's model and train settings, the chosen data, the run's tokenizer."""
    from omegaconf import OmegaConf

    from train.config import load_config, validate_config
    from train.errors import ConfigError

    base = run_cfg.to_dict()
    if config_file is not None:
        base["data"] = load_config(config_file, data_texts).to_dict()["data"]
        pairs = [(k, v) for k, v in pairs if not k.startswith("data.")]
    elif any(k == f"data.{name}" and v != getattr(run_cfg.data, name) for k, v in pairs for name in NEW_CORPUS):
        # another corpus: the run's splits, paths and caps described its own corpus, not this one
        base["data"] = {"cache_dir": run_cfg.data.cache_dir, "num_proc": run_cfg.data.num_proc}
    base["data"]["tokenizer"] = run_cfg.data.tokenizer.model_dump(mode="json")
    merged = OmegaConf.create(base)
    for key, value in pairs:
        OmegaConf.update(merged, key, value, merge=True, force_add=True)
    cfg = validate_config(OmegaConf.to_container(merged), source=str(config_file or "the run config"),
                          override_keys=[k for k, _ in pairs])
    for key, corpus in (("path", "local"), ("hf_name", "hf")):
        if any(k == f"data.{key}" for k, _ in pairs) and cfg.data.corpus != corpus:
            raise ConfigError(f"data.{key} is only read when data.corpus={corpus} (it is {cfg.data.corpus}); "
                              f"add data.corpus={corpus}")
    return cfg


def prepare_with_run_tokenizer(data_cfg, run_dir):
    """Tokenized data for `data_cfg` in the run's token ids. Reuses a cache built with the run's tokenizer settings
    when its tokenizer.json is byte-identical to the run's (e.g. the run's own data); else tokenizes with
    data.tokenizer.path = the run's tokenizer.json (a cache of its own: the key covers the file's sha256)."""
    import json

    from train.data import prepare_data
    from train.data.shards import cache_dir_for
    from train.data.tokenizer import file_sha256
    from train.errors import UserError

    tok_path = Path(run_dir) / "tokenizer.json"
    run_sha = file_sha256(tok_path)
    progress = sys.stderr.isatty()
    try:
        folder, _ = cache_dir_for(data_cfg)
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        complete = all((folder / name).is_file() and (folder / name).stat().st_size == info["bytes"]
                       for name, info in meta.get("files", {}).items())
        if complete and meta.get("tokenizer_sha256") == run_sha:
            prepared = prepare_data(data_cfg, progress=progress)
            if prepared.meta.get("tokenizer_sha256") == run_sha:
                return prepared
    except (UserError, OSError, ValueError, KeyError):
        pass  # no usable cache with these settings: tokenize with the run's file below
    tokenizer = data_cfg.tokenizer.model_copy(update={"path": str(tok_path.resolve())})
    return prepare_data(data_cfg.model_copy(update={"tokenizer": tokenizer}), progress=progress)


def main() -> int:
    args = parse_args()
    import json
    import os
    from contextlib import redirect_stdout

    from train.errors import CheckpointError, ConfigError, DataError

    pairs, data_texts = parse_overrides(args.overrides, args.text)  # before the slow imports: fast errors
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")

    from train import checkpoint as ck
    from train.data import val_batches
    from train.evaluate import evaluate
    from train.runtime import setup_runtime

    with redirect_stdout(sys.stderr):  # checkpoint warnings must not mix with the results
        model, tokenizer, run_cfg = ck.load_run(run_dir)
        ckpt = ck.find_resumable(run_dir, say=lambda msg: None)
    step = ck.read_manifest(ckpt).get("step") if ckpt is not None else None
    cfg = eval_config(run_cfg, args.config, pairs, data_texts)
    t = cfg.train
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("evaluate.py runs in one process; run it without torchrun")
    rt = setup_runtime(t.device, t.dtype, t.num_threads)
    with redirect_stdout(sys.stderr):
        prepared = prepare_with_run_tokenizer(cfg.data, run_dir)
    if prepared.vocab_size > cfg.model.vocab_size:
        raise DataError(f"{prepared.dir} has {prepared.vocab_size} token ids, the model only "
                        f"{cfg.model.vocab_size}: not tokenized with the run's tokenizer")
    val = val_batches(prepared, cfg.model.max_seq_len, t.micro_batch_size, t.eval_tokens)
    metrics = evaluate(model.to(rt.device), val, prepared, rt.device, rt.autocast)
    result = {"run": str(run_dir), "step": step, "data": prepared.dir.name, "loss": metrics["val_loss"],
              "ppl": metrics["val_ppl"], "bpb": metrics["val_bpb"], "tokens": metrics["val_tokens"],
              "bytes": val.n_bytes, "split_tokens": int(prepared.meta["val_tokens"]), "dtype": rt.dtype,
              "seq_len": cfg.model.max_seq_len}
    if args.json:
        print(json.dumps(result))
    else:
        where = f"step {step}" if step is not None else "model.safetensors"
        print(f"run {run_dir} ({where}) on {result['data']}: validation blocks of {result['seq_len']} tokens, "
              f"{result['tokens']:,} of {result['split_tokens']:,} tokens, {rt.dtype}")
        print(f"loss {result['loss']:.4f}  ppl {result['ppl']:.2f}  bpb {result['bpb']:.4f}")
    return 0


if __name__ == "__main__":
    run_main(main)
