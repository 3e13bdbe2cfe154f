"""Prepared corpora: tokenizer + flat token shards + meta.json, cached under data.cache_dir/<corpus-id>/.

<corpus-id> = <readable name>-v<vocab>-<hash8>, where the hash covers the corpus spec (which documents go in which
split), the tokenizer spec (training recipe, or the sha256 of a given tokenizer.json) and the shard format version.
The folder holds:
    tokenizer.json
    train.bin, val.bin   documents joined by the end-of-document token (each document is followed by one EOS), as a
                         flat uint16 array (uint32 when the vocabulary exceeds 65536 tokens)
    meta.json            written last: its presence means the folder is complete

Every file is written to a temporary name and renamed into place, and a rebuild deletes meta.json first, so an
interrupted preparation never leaves a folder that looks finished. Reuse checks the spec, the format version and the
file sizes (not checksums: that would cost seconds on big corpora; meta.json records sha256s for manual checks).

Byte counts (`train_bytes`, `val_bytes`) are the UTF-8 bytes of the documents' text (EOS tokens add none); with the
token counts they give bits per byte (see loader.bits_per_byte).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from train.config import DataConfig
from train.data.sources import corpus_name, corpus_spec, datasets_progress, load_corpus
from train.data.tokenizer import (TOKENIZER_RECIPE, file_sha256, load_tokenizer, special_token_id,
                                  token_byte_lengths, train_tokenizer)
from train.errors import DataError
from train.fsutil import fsync_dir, temp_path, write_atomic

FORMAT_VERSION = 1
TOKENIZE_BATCH = 256  # documents per datasets.map batch (encode_batch parallelises across them)
MULTIPROCESS_BYTES = 256 << 20  # tokenise with several processes above this many bytes per split (num_proc=null)


@dataclass
class PreparedData:
    dir: Path
    tokenizer_path: Path
    train_path: Path
    val_path: Path
    meta: dict
    vocab_size: int
    eos_id: int
    dtype: np.dtype
    reused: bool = False  # True when an existing cache folder was used as is
    seconds: float = 0.0  # time prepare_data took
    _byte_lengths: object = field(default=None, repr=False)

    def token_byte_lengths(self) -> np.ndarray | None:
        """UTF-8 bytes behind each token id (None for a non-byte-level tokenizer); computed once."""
        if self._byte_lengths is None:
            lengths = token_byte_lengths(load_tokenizer(self.tokenizer_path))
            self._byte_lengths = lengths if lengths is not None else False
        return self._byte_lengths if self._byte_lengths is not False else None


def _say(message: str) -> None:
    print(f"data: {message}", file=sys.stderr, flush=True)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def tokenizer_spec(cfg: DataConfig) -> tuple[dict, int]:
    """(spec, vocab size) of the tokenizer the config asks for, without training anything."""
    tok = cfg.tokenizer
    if tok.path is None:
        return {"recipe": TOKENIZER_RECIPE, "kind": "byte-level-bpe", "vocab_size": tok.vocab_size,
                "special_tokens": list(tok.special_tokens), "min_frequency": tok.min_frequency}, tok.vocab_size
    tokenizer = load_tokenizer(tok.path)
    special_token_id(tokenizer, tok.special_tokens[0], f"data.tokenizer.path {tok.path}")
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    return {"sha256": file_sha256(tok.path), "eos_token": tok.special_tokens[0]}, vocab


def cache_dir_for(cfg: DataConfig) -> tuple[Path, dict]:
    """(folder, spec) for a data config: data.cache_dir/<name>-v<vocab>-<hash8>."""
    tok_spec, vocab = tokenizer_spec(cfg)
    spec = {"format_version": FORMAT_VERSION, "corpus": corpus_spec(cfg), "tokenizer": tok_spec}
    return Path(cfg.cache_dir) / f"{corpus_name(cfg)}-v{vocab}-{_digest(spec)[:8]}", spec


def prepare_data(data_cfg: DataConfig, progress: bool = True) -> PreparedData:
    """Reuse the cached corpus folder when it is complete, else build it. Bad input raises DataError."""
    start = time.perf_counter()
    out, spec = cache_dir_for(data_cfg)
    prepared = _reuse(out, spec)
    if prepared is None:
        prepared = _build(data_cfg, out, spec, progress)
    prepared.seconds = time.perf_counter() - start
    return prepared


def _prepared(out: Path, meta: dict, reused: bool) -> PreparedData:
    return PreparedData(dir=out, tokenizer_path=out / "tokenizer.json", train_path=out / "train.bin",
                        val_path=out / "val.bin", meta=meta, vocab_size=meta["vocab_size"], eos_id=meta["eos_id"],
                        dtype=np.dtype(meta["dtype"]), reused=reused)


def _reuse(out: Path, spec: dict) -> PreparedData | None:
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        _say(f"{meta_path} is unreadable; rebuilding {out}")
        return None
    if meta.get("format_version") != FORMAT_VERSION or _digest(meta.get("spec")) != _digest(spec):
        _say(f"{meta_path} was written for another spec or format; rebuilding {out}")
        return None
    for name, expected in meta.get("files", {}).items():
        path = out / name
        size = path.stat().st_size if path.is_file() else None
        if size != expected["bytes"]:
            found = "is missing" if size is None else f"has {size} bytes"
            _say(f"{path} {found} but meta.json says {expected['bytes']}; rebuilding {out}")
            return None
    return _prepared(out, meta, reused=True)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise DataError(f"data.cache_dir: cannot write to {out} ({e.strerror or type(e).__name__}); "
                        f"set data.cache_dir to a writable folder") from None


def _write_error(path: Path, e: OSError) -> DataError:
    """A failed cache write (disk full, file-size limit, read-only folder) as a one-line error naming the file."""
    return DataError(f"cannot write {path}: {e.strerror or type(e).__name__} (free some space or set data.cache_dir "
                     f"to another folder)")


def _remove_stale_temp_files(out: Path) -> None:
    """Temp files (`.<name>.tmp-<pid>...`) of a build whose process is gone (killed): nothing else removes them."""
    for path in out.glob(".*.tmp-*"):
        match = re.search(r"\.tmp-(\d+)", path.name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except OSError:
            pass  # alive (another user's process): leave it


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """tokenizer.json and meta.json: temp + fsync + rename (`train.fsutil.write_atomic`, same `.tmp-<pid>` names
    as `_remove_stale_temp_files` expects), a failure as a one-line DataError naming the file."""
    write_atomic(path, data, error=_write_error)


def _build(cfg: DataConfig, out: Path, spec: dict, progress: bool) -> PreparedData:
    start = time.perf_counter()
    created = not out.exists()
    _check_writable(out)
    (out / "meta.json").unlink(missing_ok=True)  # from here on the folder does not look finished
    _remove_stale_temp_files(out)
    try:
        return _build_into(cfg, out, spec, progress, start)
    except BaseException:
        if created and not any(out.iterdir()):  # bad input found before anything was written: leave no trace
            out.rmdir()
        raise


def _build_into(cfg: DataConfig, out: Path, spec: dict, progress: bool, start: float) -> PreparedData:
    corpus = load_corpus(cfg, progress)

    tok_path = out / "tokenizer.json"
    if cfg.tokenizer.path is None:
        batches = (b["text"].to_pylist() for b in corpus.train.with_format("arrow").iter(batch_size=TOKENIZE_BATCH))
        tokenizer = train_tokenizer(batches, cfg.tokenizer, total_bytes=_text_bytes(corpus.train), progress=progress)
        _atomic_write_bytes(tok_path, tokenizer.to_str(pretty=True).encode("utf-8"))
    else:
        _atomic_write_bytes(tok_path, Path(cfg.tokenizer.path).read_bytes())
    tokenizer = load_tokenizer(tok_path)  # exactly what later runs load
    eos_token = cfg.tokenizer.special_tokens[0]
    eos_id = special_token_id(tokenizer, eos_token, str(tok_path))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)

    files = {"tokenizer.json": {"bytes": tok_path.stat().st_size, "sha256": file_sha256(tok_path)}}
    stats = {}
    for split, ds in (("train", corpus.train), ("val", corpus.val)):
        path = out / f"{split}.bin"
        stats[split] = _write_split(ds, tokenizer, eos_id, dtype, path, split, cfg.num_proc, progress)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": stats[split].pop("sha256")}

    replaced = stats["train"]["replaced_chars"] + stats["val"]["replaced_chars"]
    if replaced:
        _say(f"{replaced} invalid UTF-8 sequences were replaced by U+FFFD (or the text already held U+FFFD)")
    meta = {
        "format_version": FORMAT_VERSION, "corpus_id": out.name, "spec": spec, "vocab_size": vocab_size,
        "dtype": dtype.name, "eos_token": eos_token, "eos_id": eos_id,
        "tokenizer_sha256": files["tokenizer.json"]["sha256"],
        **{f"{split}_{k}": v for split, s in stats.items() for k, v in s.items()},
        "info": corpus.info, "files": files, "build_seconds": round(time.perf_counter() - start, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions(),
    }
    _atomic_write_bytes(out / "meta.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return _prepared(out, meta, reused=False)


def _versions() -> dict:
    import importlib.metadata

    return {name: importlib.metadata.version(name) for name in ("datasets", "tokenizers")}


def _text_bytes(ds) -> int:
    import pyarrow.compute as pc

    return sum(pc.sum(pc.binary_length(b["text"])).as_py() or 0 for b in ds.with_format("arrow").iter(batch_size=65536))


def _encode(batch: dict, tokenizer, eos_id: int) -> dict:
    # Literal "<|endoftext|>" inside a document is text, not a document boundary: only we insert EOS ids.
    tokenizer.encode_special_tokens = True
    texts = batch["text"]
    return {"ids": [enc.ids + [eos_id] for enc in tokenizer.encode_batch_fast(texts)],
            "n_bytes": [len(t.encode("utf-8")) for t in texts],
            "n_replaced": [t.count("\ufffd") for t in texts]}


def _write_split(ds, tokenizer, eos_id: int, dtype: np.dtype, path: Path, split: str, num_proc: int | None,
                 progress: bool) -> dict:
    """Tokenise a split (batched datasets.map) and write its ids as one flat array; returns the split's statistics."""
    import datasets
    import pyarrow.compute as pc

    if num_proc is None and _text_bytes(ds) > MULTIPROCESS_BYTES:
        num_proc = min(os.cpu_count() or 1, 8)
    num_proc = min(num_proc or 1, len(ds))
    if num_proc > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process; avoids the fork warning
    else:
        num_proc = None
    features = datasets.Features({"ids": datasets.List(datasets.Value(dtype.name)),
                                  "n_bytes": datasets.Value("int64"), "n_replaced": datasets.Value("int64")})
    tmp_arrow = path.with_name(f".{split}-tokens.tmp-{os.getpid()}.arrow")
    tmp_bin = temp_path(path)  # `.<name>.tmp-<pid>`, as write_atomic names its temp files
    digest, totals = hashlib.sha256(), {"documents": 0, "tokens": 0, "bytes": 0, "replaced_chars": 0}
    try:
        with datasets_progress(progress):
            tokens = ds.map(_encode, batched=True, batch_size=TOKENIZE_BATCH, remove_columns=ds.column_names,
                            fn_kwargs={"tokenizer": tokenizer, "eos_id": eos_id}, features=features,
                            num_proc=num_proc, desc=f"tokenizing {split}", new_fingerprint=f"tokens-{os.getpid()}",
                            cache_file_name=str(tmp_arrow) if ds.cache_files else None)
        with open(tmp_bin, "wb") as f:
            for batch in tokens.with_format("arrow").iter(batch_size=1024):
                ids = np.ascontiguousarray(pc.list_flatten(batch["ids"]).to_numpy(), dtype=dtype)
                f.write(ids.data)
                digest.update(ids.data)
                totals["documents"] += batch.num_rows
                totals["tokens"] += len(ids)
                totals["bytes"] += pc.sum(batch["n_bytes"]).as_py()
                totals["replaced_chars"] += pc.sum(batch["n_replaced"]).as_py()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_bin, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    finally:
        tmp_bin.unlink(missing_ok=True)
        for leftover in path.parent.glob(f".{split}-tokens.tmp-{os.getpid()}*"):
            leftover.unlink(missing_ok=True)
    return {**totals, "sha256": digest.hexdigest()}
