"""evaluate: the run's own validation set gives exactly the last validation loss the trainer logged (same blocks,
same bf16 autocast); another corpus (a local text file) is tokenized with the run's tokenizer and scored like an
independent re-computation; only data.* and a few evaluation settings may be overridden."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.checkpoint import load_run
from train.runs import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("ROMEO: But, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
        "Arise, fair sun, and kill the envious moon, who is already sick and pale with grief — ✓ ünïcödé\n"
        "JULIET: O Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;\n"
        "Or, if thou wilt not, be but sworn my love, and I'll no longer be a Capulet.\n") * 2


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # evaluate sets the run's train.num_threads (1) in this process


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_in_process(monkeypatch, capsys, *args):
    """(exit code, stdout, stderr) of scripts/evaluate.py run in this process (no interpreter start-up)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        module.run_main(module.main)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def reference_metrics(model, tokens, seq_len, n_blocks, target_bytes):
    """Mean next-token loss over the first n_blocks consecutive blocks of `tokens`, in fp32, written out plainly."""
    nll = 0.0
    with torch.no_grad():
        for i in range(n_blocks):
            block = torch.tensor(tokens[i * seq_len: (i + 1) * seq_len + 1], dtype=torch.long)
            logits = model(block[None, :-1]).logits[0]
            nll += F.cross_entropy(logits.float(), block[1:], reduction="sum").item()
    loss = nll / (n_blocks * seq_len)
    return loss, loss / math.log(2) * n_blocks * seq_len / target_bytes


def test_own_validation_set_matches_the_trainers_last_eval(tiny_run, tiny_data_cache):
    last_eval = [r for r in read_metrics(tiny_run / "metrics.jsonl") if r["type"] == "eval"][-1]
    caches_before = sorted(p.name for p in tiny_data_cache.iterdir())
    proc = run_cli("--run", tiny_run, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["step"] == last_eval["step"] == 20 and result["dtype"] == "bf16"
    assert result["loss"] == last_eval["val_loss"]  # bit-exact: same blocks, batches, autocast and threads
    assert result["bpb"] == last_eval["val_bpb"] and result["tokens"] == last_eval["val_tokens"] == 4096
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert sorted(p.name for p in tiny_data_cache.iterdir()) == caches_before  # reused the run's own cache


def test_overridden_precision_and_blocks_match_an_independent_computation(tiny_run, monkeypatch, capsys):
    model, tokenizer, cfg = load_run(tiny_run)
    code, out, err = run_in_process(monkeypatch, capsys, "--run", tiny_run, "--json", "train.dtype=fp32",
                                    "train.eval_tokens=640", "train.micro_batch_size=3")
    assert code == 0, err
    result = json.loads(out)
    cache = Path(cfg.data.cache_dir) / result["data"]
    val = np.fromfile(cache / "val.bin", dtype=np.uint16).astype(np.int64)
    targets = val[1: 10 * 64 + 1]
    n_bytes = len(tokenizer.decode(targets.tolist(), skip_special_tokens=True).encode("utf-8"))
    loss, bpb = reference_metrics(model, val, 64, 10, n_bytes)
    assert result["dtype"] == "fp32" and result["tokens"] == 640 and result["bytes"] == n_bytes
    assert result["loss"] == pytest.approx(loss, abs=1e-5) and result["bpb"] == pytest.approx(bpb, abs=1e-5)


def test_own_text_file(tiny_run, tmp_path, monkeypatch, capsys):
    model, tokenizer, cfg = load_run(tiny_run)
    text_file = tmp_path / "my_text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    code, out, err = run_in_process(monkeypatch, capsys, "--run", tiny_run, "--json", "--text", text_file,
                                    "train.dtype=fp32", f"data.cache_dir={tmp_path / 'cache'}")  # not the shared one
    assert code == 0, err
    result = json.loads(out)
    assert result["data"].startswith("local-my_text-v512-") and (tmp_path / "cache" / result["data"]).is_dir()

    # the file is one document: its tokens (the run's tokenizer) then the end-of-document token
    tokens = tokenizer.encode(TEXT).ids + [tokenizer.token_to_id("<|endoftext|>")]
    n_blocks = (len(tokens) - 1) // 64
    assert n_blocks >= 3 and result["tokens"] == n_blocks * 64 and result["split_tokens"] == len(tokens)
    targets = tokens[1: n_blocks * 64 + 1]
    n_bytes = len(tokenizer.decode(targets, skip_special_tokens=True).encode("utf-8"))
    loss, bpb = reference_metrics(model, tokens, 64, n_blocks, n_bytes)
    assert result["loss"] == pytest.approx(loss, abs=1e-5) and result["bpb"] == pytest.approx(bpb, abs=1e-5)

    # the same corpus spelled out as overrides, or as a data config file, gives the same numbers
    spelled = [f"data.path={text_file}", f"data.val_path={text_file}", "train.eval_tokens=null", "train.dtype=fp32"]
    code, out, err = run_in_process(monkeypatch, capsys, "--run", tiny_run, "--json", "data.corpus=local", *spelled)
    assert code == 0, err
    assert json.loads(out) == result
    code, out, err = run_in_process(monkeypatch, capsys, "--run", tiny_run, "--json", "--config",
                                    ROOT / "configs" / "data" / "local-text.yaml", *spelled, "data.sample_by=document",
                                    f"data.cache_dir={cfg.data.cache_dir}")
    assert code == 0, err
    assert json.loads(out) == result


@pytest.mark.parametrize("override, message", [
    ("model.hidden_size=32", "evaluate.py takes data.* overrides and train.eval_tokens"),
    ("train.lr=0.1", "the model and training settings come from the run"),
    ("data.tokenizer.vocab_size=300", "always uses the run's tokenizer.json"),
])
def test_refused_overrides(tiny_run, override, message):
    proc = run_cli("--run", tiny_run, override)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_missing_run_and_bad_data(tiny_run, tmp_path, monkeypatch, capsys):
    proc = run_cli("--run", tmp_path / "nope")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: run directory not found: {tmp_path / 'nope'}"
    for args, message in [
        (["data.corpus=local", f"data.path={tmp_path / 'missing.txt'}"],
         f"error: data.path: file not found: {tmp_path / 'missing.txt'}"),
        (["--text", tmp_path / "missing.txt"],
         f"error: --text: file not found: {tmp_path / 'missing.txt'} (see --help)"),
        ([f"data.path={tmp_path}"], "error: data.path is only read when data.corpus=local (it is shakespeare); "
                                    "add data.corpus=local"),
    ]:
        code, out, err = run_in_process(monkeypatch, capsys, "--run", tiny_run, *args)
        assert code == 2 and out == "" and err.strip() == message
