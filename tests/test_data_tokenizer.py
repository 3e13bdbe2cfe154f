"""Byte-level BPE: exact round trips (any Unicode), determinism, loadable by transformers, bad vocab sizes."""
import pytest

from train.config import TokenizerConfig
from train.config_load import load_config
from train.data import load_tokenizer, token_byte_lengths
from train.data.tokenizer import train_tokenizer
from train.errors import ConfigError, DataError

CORPUS = [
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n",
    "Ce n'est qu'un début, continuons le combat. Déjà vu, naïve façade.\n",
    "To be, or not to be, that is the question:\n\tWhether 'tis nobler in the mind to suffer\n",
] * 20

HARD_TEXTS = [
    "plain ASCII, with  double  spaces and a trailing space ",
    "Ünïcödé — “quotes”, em dash, 世界, 🎭🦉, Ελληνικά, עברית",  # scripts never seen in training
    "\r\nwindows line\r\n\n\n\ttabs\x00nul\x7f and a lone \ufffd",
    " leading space and ' apostrophes'll",
    "",
]


def train(vocab_size=300):
    return train_tokenizer([CORPUS], TokenizerConfig(vocab_size=vocab_size, min_frequency=2), progress=False)


def test_round_trip_is_exact_for_any_text(tmp_path):
    tokenizer = train()
    for text in HARD_TEXTS + CORPUS[:3]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    loaded = load_tokenizer(path)
    for text in HARD_TEXTS:
        assert loaded.decode(loaded.encode(text).ids) == text


def test_layout_and_determinism():
    a, b = train(), train()
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 300
    assert a.token_to_id("<|endoftext|>") == 0  # special tokens first, then the 256 bytes
    lengths = token_byte_lengths(a)
    text = HARD_TEXTS[1]
    assert lengths[0] == 0 and int(lengths[a.encode(text).ids].sum()) == len(text.encode("utf-8"))


def test_transformers_loads_the_file(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tokenizer = train()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>")
    text = HARD_TEXTS[1]
    assert fast.encode(text) == tokenizer.encode(text).ids
    assert fast.decode(fast.encode(text)) == text
    assert fast.eos_token_id == 0


def test_vocab_too_small_for_the_special_tokens():
    with pytest.raises(ConfigError, match="vocab_size=200 is too small") as err:
        load_config(None, ["data.tokenizer.vocab_size=200"])
    assert "\n" not in str(err.value)
    # A config that skipped validation still gets a DataError rather than a broken tokenizer.
    unchecked = TokenizerConfig.model_construct(vocab_size=257, special_tokens=["<|endoftext|>", "<|pad|>"],
                                                min_frequency=2, path=None)
    with pytest.raises(DataError, match="too small"):
        train_tokenizer([CORPUS], unchecked, progress=False)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="cannot load tokenizer"):
        load_tokenizer(bad)
