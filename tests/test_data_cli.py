"""scripts/prepare_data.py end to end: a local corpus is built then reused; bad input exits 2 with one line on
stderr and no traceback. The hub case runs with the hub switched off (HF_HUB_OFFLINE), never the network."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def prepare(tmp_path, *overrides, config="configs/base.yaml"):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    return subprocess.run([sys.executable, "scripts/prepare_data.py", "--config", config,
                           f"data.cache_dir={tmp_path / 'data'}", "data.tokenizer.vocab_size=300", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_local_corpus_is_built_then_reused(tmp_path):
    corpus = tmp_path / "stories.txt"
    corpus.write_text("\n\n".join(f"Story number {i}. The end." for i in range(40)) + "\n")
    args = ("data.corpus=local", f"data.path={corpus}", "data.sample_by=paragraph")
    first = prepare(tmp_path, *args, config="configs/data/local-text.yaml")
    assert first.returncode == 0, first.stderr
    assert "built in" in first.stdout and "local-stories-v300-" in first.stdout
    train_line = next(line for line in first.stdout.splitlines() if line.startswith("train"))
    val_line = next(line for line in first.stdout.splitlines() if line.startswith("val "))
    assert int(train_line.split()[1]) + int(val_line.split()[1]) == 40  # documents per split
    second = prepare(tmp_path, *args, config="configs/data/local-text.yaml")
    assert second.returncode == 0 and "reused in" in second.stdout


@pytest.mark.parametrize("overrides, message", [
    (("data.corpus=hf", "data.hf_name=roneneldan/TinyStories"), "cannot reach the Hugging Face hub"),
    (("data.corpus=local", "data.path=/nonexistent/corpus.txt"), "data.path: file not found"),
    (("data.val_plays=[hamlett]",), "unknown play 'hamlett'"),
    (("data.corpus=gutenberg",), "data.corpus: invalid choice"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, overrides, message):
    result = prepare(tmp_path, *overrides)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
