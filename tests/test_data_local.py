"""Local corpora (text, JSONL, Parquet, save_to_disk), the hub path (mocked: tests never touch the network), and
every bad input -> one-line DataError."""
import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from train.config import DataConfig
from train.data import load_tokenizer, prepare_data
from train.data.sources import load_corpus
from train.errors import DataError

STORIES = [f"Story {i}: the {animal} sat on the {thing}. It was {mood}.\n"
           for i, (animal, thing, mood) in enumerate(
               [("cat", "mat", "happy"), ("dog", "log", "sleepy"), ("owl", "branch", "wise"), ("fox", "box", "sly"),
                ("hen", "fence", "loud"), ("bee", "tree", "busy"), ("ant", "plant", "small"), ("cow", "hill", "calm")])]


@pytest.fixture(autouse=True)
def offline_with_a_private_cache(tmp_path, monkeypatch):
    # Nothing here may reach the hub; datasets caches what its builders read: keep that out of ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def config(tmp_path, **fields) -> DataConfig:
    fields.setdefault("corpus", "local")
    return DataConfig(cache_dir=str(tmp_path / "data"), tokenizer={"vocab_size": 300, "min_frequency": 1}, **fields)


def decoded_documents(prepared) -> dict[str, list[str]]:
    tokenizer = load_tokenizer(prepared.tokenizer_path)
    out = {}
    for split in ("train", "val"):
        ids = np.fromfile(getattr(prepared, f"{split}_path"), dtype=prepared.dtype)
        docs = np.split(ids, np.flatnonzero(ids == prepared.eos_id) + 1)[:-1]
        out[split] = [tokenizer.decode(d.tolist()) for d in docs]
    return out


def one_line_error(cfg: DataConfig, match: str) -> str:
    with pytest.raises(DataError, match=match) as err:
        prepare_data(cfg, progress=False)
    assert "\n" not in str(err.value)
    return str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# Sources

def test_text_files_one_document_per_file(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    for i, story in enumerate(STORIES):
        (folder / f"{i}.txt").write_text(story + "\nThe end.\n")
    prepared = prepare_data(config(tmp_path, path=str(folder / "*.txt"), val_fraction=0.25), progress=False)
    docs = decoded_documents(prepared)
    assert sorted(docs["train"] + docs["val"]) == sorted(s + "\nThe end.\n" for s in STORIES)
    assert docs["train"] and docs["val"]
    assert prepared.dir.name.startswith("local-books-v300-")
    # the held-out documents are chosen by their text, so the split does not depend on the order of the files
    reloaded = load_corpus(config(tmp_path, path=str(folder / "*.txt"), val_fraction=0.25), progress=False)
    assert sorted(reloaded.val["text"]) == sorted(docs["val"])


def test_text_file_paragraphs_and_invalid_utf8(tmp_path, capsys):
    path = tmp_path / "stories.txt"
    path.write_bytes("\n\n".join(s.rstrip("\n") for s in STORIES).encode() + b"\nbad bytes: \xff\xfe end\n")
    prepared = prepare_data(config(tmp_path, path=str(path), sample_by="paragraph"), progress=False)
    meta = prepared.meta
    assert meta["train_documents"] + meta["val_documents"] == len(STORIES)
    assert meta["train_replaced_chars"] + meta["val_replaced_chars"] == 2
    docs = decoded_documents(prepared)
    assert any(d.endswith("bad bytes: \ufffd\ufffd end\n") for d in docs["train"] + docs["val"])
    assert "replaced by U+FFFD" in capsys.readouterr().err


def test_jsonl_with_invalid_utf8_is_replaced_not_fatal(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"".join(json.dumps({"text": s}).encode() + b"\n" for s in STORIES)
                     + b'{"text": "broken \xc3\x28 bytes"}\n')
    prepared = prepare_data(config(tmp_path, path=str(path)), progress=False)
    assert prepared.meta["train_replaced_chars"] + prepared.meta["val_replaced_chars"] == 1
    docs = decoded_documents(prepared)
    assert "broken \ufffd( bytes" in docs["train"] + docs["val"]


def test_jsonl_with_a_named_text_column_and_literal_eos(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"id": i, "body": s} for i, s in enumerate(STORIES)] + [{"id": 99, "body": "a literal <|endoftext|> here"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = prepare_data(config(tmp_path, path=str(path), text_column="body"), progress=False)
    docs = decoded_documents(prepared)
    # the literal string is text inside one document, not a document boundary
    assert sorted(docs["train"] + docs["val"]) == sorted([r["body"] for r in rows])


def test_parquet_glob_and_separate_val_file(tmp_path):
    for part in range(2):
        pq.write_table(pa.table({"text": STORIES[part * 3:(part + 1) * 3]}), tmp_path / f"train-{part}.parquet")
    pq.write_table(pa.table({"text": STORIES[6:]}), tmp_path / "valid.parquet")
    cfg = config(tmp_path, path=str(tmp_path / "train-*.parquet"), val_path=str(tmp_path / "valid.parquet"))
    docs = decoded_documents(prepare_data(cfg, progress=False))
    assert docs == {"train": STORIES[:6], "val": STORIES[6:]}


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": STORIES, "n": list(range(8))}).save_to_disk(str(single))
    prepared = prepare_data(config(tmp_path, path=str(single), val_fraction=0.3), progress=False)
    docs = decoded_documents(prepared)
    assert sorted(docs["train"] + docs["val"]) == sorted(STORIES)

    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": STORIES[:5]}),
                          "validation": datasets.Dataset.from_dict({"text": STORIES[5:]})}).save_to_disk(str(splits))
    docs = decoded_documents(prepare_data(config(tmp_path, path=str(splits), val_split="validation"), progress=False))
    assert docs == {"train": STORIES[:5], "val": STORIES[5:]}
    one_line_error(config(tmp_path, path=str(splits), val_split="test"), r"no split 'test'.*splits: train, validation")


def test_caps_keep_the_first_documents(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in STORIES))
    corpus = load_corpus(config(tmp_path, path=str(path), max_documents=5), progress=False)
    assert sorted(list(corpus.train["text"]) + list(corpus.val["text"])) == sorted(STORIES[:5])
    byte_cap = sum(len(s.encode()) for s in STORIES[:3]) + 1
    corpus = load_corpus(config(tmp_path, path=str(path), max_bytes=byte_cap), progress=False)
    assert sorted(list(corpus.train["text"]) + list(corpus.val["text"])) == sorted(STORIES[:3])


def test_hub_path_with_a_mocked_load_dataset(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(name, config_name=None, split=None, streaming=False):
        calls.append((name, config_name, split, streaming))
        texts = STORIES if split == "train" else ["held out story one.\n", "held out story two.\n"]
        return datasets.Dataset.from_dict({"story": texts, "label": [0] * len(texts)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = config(tmp_path, corpus="hf", hf_name="someone/stories", hf_config="small", val_split="validation",
                 text_column="story", max_documents=6)
    prepared = prepare_data(cfg, progress=False)
    assert calls == [("someone/stories", "small", "train", False), ("someone/stories", "small", "validation", False)]
    assert decoded_documents(prepared) == {"train": STORIES[:6], "val": ["held out story one.\n",
                                                                         "held out story two.\n"]}
    assert prepared.dir.name.startswith("stories-small-v300-")
    one_line_error(cfg.model_copy(update={"text_column": "txt"}), r"no text column 'txt'.*columns: story, label")


def test_hub_streaming_reads_only_up_to_the_cap(tmp_path, monkeypatch):
    read = []

    def fake_load_dataset(name, config_name=None, split=None, streaming=False):
        assert streaming
        def rows():
            for i, s in enumerate(STORIES * 100):
                read.append(i)
                yield {"text": s, "url": f"https://example.org/{i}"}
        return datasets.IterableDataset.from_generator(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = config(tmp_path, corpus="hf", hf_name="web/pages", hf_config="sample", streaming=True,
                 max_bytes=sum(len(s.encode()) for s in STORIES), val_fraction=0.2)
    corpus = load_corpus(cfg, progress=False)
    assert sorted(list(corpus.train["text"]) + list(corpus.val["text"])) == sorted(STORIES)
    assert len(read) <= len(STORIES) + 1  # stopped at the cap, not at the end of the stream


def test_hub_unreachable_says_how_to_use_local_files(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'roneneldan/TinyStories' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = one_line_error(config(tmp_path, corpus="hf", hf_name="roneneldan/TinyStories"), "cannot reach")
    assert "data.corpus=local data.path=" in message


# ---------------------------------------------------------------------------------------------------------------
# Bad input

def test_missing_files_and_folders(tmp_path):
    one_line_error(config(tmp_path, path=str(tmp_path / "nope.txt")), "data.path: file not found")
    one_line_error(config(tmp_path, path=str(tmp_path / "*.jsonl")), "data.path: no file matches")
    (tmp_path / "plain").mkdir()
    one_line_error(config(tmp_path, path=str(tmp_path / "plain")), "not one written by Dataset.save_to_disk")
    (tmp_path / "notes.xyz").write_text("hello")
    one_line_error(config(tmp_path, path=str(tmp_path / "notes.xyz")), "cannot tell the format")


def test_wrong_text_column_lists_the_columns(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"body": s, "id": i}) + "\n" for i, s in enumerate(STORIES)))
    one_line_error(config(tmp_path, path=str(path)), r"no text column 'text' \(data.text_column\); columns: body, id")
    path.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(4)))
    one_line_error(config(tmp_path, path=str(path)), "holds int64, not text")
    assert not list((tmp_path / "data").iterdir())  # a failed build leaves no half-made corpus folder


def test_empty_corpus_and_too_few_documents(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_line_error(config(tmp_path, path=str(empty)), "no non-empty documents")
    single = tmp_path / "single.txt"
    single.write_text("just one document\n")
    one_line_error(config(tmp_path, path=str(single)), "cannot hold out a validation split")
    blank_val = tmp_path / "blank.txt"
    blank_val.write_text("\n\n")
    (tmp_path / "train.txt").write_text("some text\n")
    one_line_error(config(tmp_path, path=str(tmp_path / "train.txt"), val_path=str(blank_val), sample_by="line"),
                   "validation.*no non-empty documents")


def test_binary_garbage(tmp_path):
    garbage = tmp_path / "corpus.parquet"
    garbage.write_bytes(bytes(range(256)) * 8)
    one_line_error(config(tmp_path, path=str(garbage)), "cannot read .* as parquet")
    as_text = tmp_path / "garbage.txt"
    as_text.write_bytes(bytes(range(256)) * 8 + b"\n\n" + bytes(range(255, -1, -1)) * 8)
    prepared = prepare_data(config(tmp_path, path=str(as_text), sample_by="paragraph"), progress=False)
    assert prepared.meta["train_replaced_chars"] + prepared.meta["val_replaced_chars"] == 2 * 8 * 128


def test_unwritable_cache_dir(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "c.txt").write_text("one\n\ntwo\n\nthree\n")
    cfg = config(tmp_path, path=str(tmp_path / "c.txt"), sample_by="paragraph")
    unwritable = cfg.model_copy(update={"cache_dir": str(tmp_path / "a-file" / "data")})
    one_line_error(unwritable, "data.cache_dir: cannot write")


def test_given_tokenizer_must_have_the_eos_token(tmp_path):
    (tmp_path / "c.txt").write_text("\n\n".join(STORIES))
    base = config(tmp_path, path=str(tmp_path / "c.txt"), sample_by="paragraph")
    first = prepare_data(base, progress=False)
    reused_tok = base.model_copy(update={"tokenizer": base.tokenizer.model_copy(
        update={"path": str(first.tokenizer_path)})})
    second = prepare_data(reused_tok, progress=False)
    assert (second.dir / "tokenizer.json").read_bytes() == first.tokenizer_path.read_bytes()
    assert decoded_documents(second) == decoded_documents(first)
    other_eos = reused_tok.model_copy(update={"tokenizer": reused_tok.tokenizer.model_copy(
        update={"special_tokens": ["</s>"]})})
    one_line_error(other_eos, r"has no token '</s>'.*special tokens: <\|endoftext\|>")
