"""Byte-level BPE tokenizer: train one on the training split (deterministic for the same input), or load a given
tokenizer.json. The saved file loads with `tokenizers.Tokenizer.from_file` and transformers' `PreTrainedTokenizerFast`.

Byte-level means every text round-trips exactly: decode(encode(x)) == x, for any Unicode. The special tokens take the
first ids (the first one, `<|endoftext|>` by default, is the end-of-document token), then the 256 byte tokens.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from train.config import TokenizerConfig
from train.errors import DataError

TOKENIZER_RECIPE = 1  # bump when the training recipe below changes: part of the cache key


def load_tokenizer(path: str | Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file (DataError if missing or unreadable)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - a malformed file is user input
        raise DataError(f"cannot load tokenizer {path}: {' '.join(str(e).split())}") from None


def train_tokenizer(batches: Iterable[list[str]], cfg: TokenizerConfig, total_bytes: int | None = None,
                    progress: bool = True):
    """Train a byte-level BPE on batches of documents. Deterministic: same documents and config -> same file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tqdm.auto import tqdm

    if cfg.vocab_size < 256 + len(cfg.special_tokens):
        raise DataError(f"data.tokenizer.vocab_size={cfg.vocab_size} is too small: a byte-level BPE needs at least "
                        f"256 byte tokens + {len(cfg.special_tokens)} special tokens")
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False and no normalizer: the text is kept byte for byte, so decoding inverts encoding.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=list(cfg.special_tokens), show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # tqdm covers reading the text; the trainer's own bars (on a terminal) cover counting pairs and merging.
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizer: reading train text",
               disable=not progress, delay=1)

    def feed():
        for batch in batches:
            bar.update(sum(len(t.encode("utf-8")) for t in batch))
            yield batch

    try:
        tokenizer.train_from_iterator(feed(), trainer)
    finally:
        bar.close()
    return tokenizer


def special_token_id(tokenizer, token: str, source: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        specials = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
        raise DataError(f"{source} has no token '{token}' (data.tokenizer.special_tokens[0] is the end-of-document "
                        f"token); its special tokens: {', '.join(specials) or 'none'}")
    return token_id


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (the alphabet of byte-level BPE tokens)."""
    byte_values = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    char_codes = byte_values[:]  # printable bytes stand for themselves, the others for 256, 257, ...
    n_shifted = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            char_codes.append(256 + n_shifted)
            n_shifted += 1
    return {chr(c): b for b, c in zip(byte_values, char_codes)}


def token_byte_lengths(tokenizer) -> np.ndarray | None:
    """UTF-8 bytes each token id stands for (special tokens: 0), or None if the tokenizer is not byte-level.

    For a byte-level tokenizer the text behind any run of token ids has exactly sum(lengths[ids]) bytes, so the bytes
    behind evaluated targets can be counted without decoding (used for bits per byte)."""
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        return None
    byte_of = _byte_decoder()
    lengths = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    added = tokenizer.get_added_tokens_decoder()
    for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        if token_id in added:
            lengths[token_id] = 0 if added[token_id].special else len(added[token_id].content.encode("utf-8"))
        elif all(ch in byte_of for ch in token):
            lengths[token_id] = len(token)
        else:
            return None
    return lengths
