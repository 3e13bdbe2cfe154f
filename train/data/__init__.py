"""Data: corpus sources, byte-level BPE tokenizer, cached token shards, batch loader.

    prepared = prepare_data(cfg.data)                  # builds data/<corpus-id>/ once, then reuses it
    batches = TrainBatches(prepared.train_path, prepared.dtype, seq_len, micro_batch_size, grad_accum, seed)
    x_BT, y_BT = batches.get(step, micro_step)
    val = val_batches(prepared, seq_len, batch_size, eval_tokens)
    bpb = bits_per_byte(mean_val_loss, prepared, val.n_tokens, val.n_bytes)

The loader needs torch (seconds to import), so its names are imported on first use: preparing or reusing a corpus
stays fast.
"""
from train.data.markdown import markdown_to_play_text
from train.data.shards import PreparedData, prepare_data
from train.data.sources import DEFAULT_VAL_PLAYS, play_files
from train.data.tokenizer import load_tokenizer, token_byte_lengths

_LOADER_NAMES = ("TrainBatches", "ValBatches", "val_batches", "bits_per_byte")

__all__ = ["PreparedData", "prepare_data", "load_tokenizer", "token_byte_lengths", "markdown_to_play_text",
           "play_files", "DEFAULT_VAL_PLAYS", *_LOADER_NAMES]


def __getattr__(name: str):
    if name in _LOADER_NAMES:
        from train.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'train.data' has no attribute '{name}'")
