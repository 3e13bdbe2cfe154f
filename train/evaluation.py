"""Scoring a finished run's checkpoint on a validation split (scripts/evaluate.py): which data, in which settings.

`evaluate_run(run_dir, config_file, overrides, text_file)` -> a dict with loss, ppl, bpb and what they were measured
on. The model and its training settings come from the run; the data comes from the run's own data section, a data
config file, or a text file; text is always tokenized with the run's tokenizer.json (a cache built with it is reused,
else the corpus is tokenized into a cache of its own). The metrics themselves are train/evaluate.py's, the
trainer's, so the run's own validation set gives the trainer's numbers exactly.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Optional

from train.config_load import parse_override
from train.errors import CheckpointError, ConfigError, DataError, UserError

EVAL_TRAIN_KEYS = ("eval_tokens", "micro_batch_size", "device", "dtype", "num_threads")
NEW_CORPUS = ("corpus", "path", "hf_name")  # changing one of these starts the data section from the defaults


def parse_overrides(overrides: list[str], text_file: Optional[str]) -> tuple[list[tuple[str, object]], list[str]]:
    """(key, value) pairs to apply (data.* and the allowed train.*), and the data.* ones as given (for --config).
    Anything else is refused."""
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

    from train.config_load import load_config, validate_config

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
    from train.data import prepare_data
    from train.data.shards import cache_dir_for
    from train.data.tokenizer import file_sha256

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


def evaluate_run(run_dir: str | Path, config_file: Optional[str] = None, overrides: list[str] = (),
                 text_file: Optional[str] = None) -> dict:
    """Score the run's latest usable checkpoint (else its model.safetensors) on the chosen validation split.
    -> run, step, data (the cache folder's name), loss, ppl, bpb, tokens (scored), bytes, split_tokens, dtype,
    seq_len. Messages from loading and data preparation go to stderr, never stdout."""
    pairs, data_texts = parse_overrides(list(overrides), text_file)  # before the slow imports: fast errors
    run_dir = Path(run_dir)
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
    cfg = eval_config(run_cfg, config_file, pairs, data_texts)
    t = cfg.train
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("evaluate.py runs in one process; run it without torchrun")
    rt = setup_runtime(t.device, t.dtype, t.num_threads)
    with redirect_stdout(sys.stderr):
        prepared = prepare_with_run_tokenizer(cfg.data, run_dir)
    if prepared.vocab_size > cfg.model.vocab_size:
        raise DataError(f"{prepared.dir} has {prepared.vocab_size} token ids, the model only "
                        f"{cfg.model.vocab_size}: not tokenized with the run's tokenizer")
    # the run's own data: its reporting blocks (what training logged as val_loss); other data: the whole split
    other_data = config_file is not None or any(key.startswith("data.") for key, _ in pairs)
    val = val_batches(prepared, cfg.model.max_seq_len, t.micro_batch_size, t.eval_tokens,
                      part="all" if other_data else "report")
    metrics = evaluate(model.to(rt.device), val, prepared, rt.device, rt.autocast)
    return {"run": str(run_dir), "step": step, "data": prepared.dir.name, "loss": metrics["val_loss"],
            "ppl": metrics["val_ppl"], "bpb": metrics["val_bpb"], "tokens": metrics["val_tokens"],
            "bytes": val.n_bytes, "split_tokens": int(prepared.meta["val_tokens"]), "dtype": rt.dtype,
            "seq_len": cfg.model.max_seq_len}


def format_result(result: dict) -> str:
    """The two-line text report of `evaluate_run`'s result."""
    where = f"step {result['step']}" if result["step"] is not None else "model.safetensors"
    return (f"run {result['run']} ({where}) on {result['data']}: validation blocks of {result['seq_len']} tokens, "
            f"{result['tokens']:,} of {result['split_tokens']:,} tokens, {result['dtype']}\n"
            f"loss {result['loss']:.4f}  ppl {result['ppl']:.2f}  bpb {result['bpb']:.4f}")
