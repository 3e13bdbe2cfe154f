"""generate: KV-cache greedy decoding equals plain argmax decoding without the cache and is deterministic; the CLI
streams exactly that text; multi-byte characters split across tokens are never printed broken; one-line errors."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import FFNConfig, MiniMindConfig
from model.model_minimind import MiniMindForCausalLM
from train.checkpoint import load_run

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def load_generate_script():
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def argmax_without_cache(model, prompt_ids, max_new_tokens, eos_id=None):
    """The reference: run the whole sequence through model.forward for every new token, take the argmax."""
    ids, new = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits_V = model(torch.tensor([ids])).logits[0, -1]
            token = int(logits_V.argmax())
            ids.append(token)
            new.append(token)
            if token == eos_id:
                break
    return new


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("ffn", [dict(type="glu", activation="silu"), dict(type="dense", activation="relu"),
                                 dict(type="moe", n_experts=4, top_k=2)], ids=["swiglu", "dense", "moe"])
def test_kv_cache_greedy_equals_argmax_without_cache(ffn):
    # init_std 0.3 makes a random model write varied tokens (with 0.02 it repeats one), so the comparison bites
    cfg = MiniMindConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_seq_len=64, init_std=0.3, ffn=FFNConfig(**ffn))
    torch.manual_seed(0)
    model = MiniMindForCausalLM(cfg).eval()
    prompt = torch.randint(0, 300, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    want = argmax_without_cache(model, prompt, 50)
    got = model.generate(torch.tensor([prompt]), max_new_tokens=50, greedy=True)[0, len(prompt):].tolist()
    assert got == want
    assert list(model.generate_stream(torch.tensor(prompt), 50, greedy=True)) == want
    assert len(set(want)) >= 5


def test_greedy_on_a_trained_run_is_deterministic_and_stops_at_eos(tiny_run):
    model, tokenizer, cfg = load_run(tiny_run)
    eos = tokenizer.token_to_id("<|endoftext|>")
    for prompt in ("ROMEO:", "To be, or not to be"):
        ids = tokenizer.encode(prompt).ids
        want = argmax_without_cache(model, ids, 40, eos)
        x_1T = torch.tensor([ids])
        for _ in range(2):
            assert model.generate(x_1T, 40, greedy=True, eos_token_id=eos)[0, len(ids):].tolist() == want
    # generation stops right after EOS: make EOS the argmax everywhere
    class AlwaysEOS(torch.nn.Module):
        def forward(self, h_BTD):
            logits = torch.zeros(*h_BTD.shape[:-1], cfg.model.vocab_size)
            logits[..., eos] = 1.0
            return logits

    model.lm_head = AlwaysEOS()
    assert list(model.generate_stream(torch.tensor(ids), 10, greedy=True, eos_token_id=eos)) == [eos]


def test_cli_streams_greedy_text(tiny_run):
    model, tokenizer, cfg = load_run(tiny_run)
    prompt = "JULIET:"
    new_ids = argmax_without_cache(model, tokenizer.encode(prompt).ids, 24, tokenizer.token_to_id("<|endoftext|>"))
    completion = tokenizer.decode(new_ids)
    proc = run_cli("--run", tiny_run, "--prompt", prompt, "--max-new-tokens", 24, "--greedy")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == prompt + completion + ("" if completion.endswith("\n") else "\n")


def run_in_process(monkeypatch, capsys, *args):
    """(exit code, stdout, stderr) of scripts/generate.py run in this process (no interpreter start-up)."""
    generate = load_generate_script()
    monkeypatch.setattr(sys, "argv", ["generate.py", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        generate.run_main(generate.main)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_sampling_with_a_seed_is_reproducible(tiny_run, monkeypatch, capsys):
    model, tokenizer, cfg = load_run(tiny_run)
    ids = tokenizer.encode("ROMEO:").ids

    def sample(seed):
        return model.generate(torch.tensor([ids]), 30, temperature=1.0, top_k=50, top_p=0.9,
                              generator=torch.Generator().manual_seed(seed))[0, len(ids):].tolist()

    first = sample(7)
    assert sample(7) == first and sample(8) != first
    code, out, err = run_in_process(monkeypatch, capsys, "--run", tiny_run, "--prompt", "ROMEO:", "--max-new-tokens",
                                    30, "--temperature", 1.0, "--top-k", 50, "--top-p", 0.9, "--seed", 7)
    assert code == 0, err
    assert out.rstrip("\n") == ("ROMEO:" + tokenizer.decode(first)).rstrip("\n")


def test_stream_decoder_never_prints_half_characters(tiny_run):
    generate = load_generate_script()
    _, tokenizer, _ = load_run(tiny_run)
    text = "Ay, héllo wörld — ✓ 日本語 🎭 done"
    ids = tokenizer.encode(text).ids
    decoder = generate.StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert "" in pieces  # some token ended inside a character and was held back
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + decoder.flush() == text

    # a byte sequence that never completes is printed (as U+FFFD) when the stream ends
    decoder = generate.StreamDecoder(tokenizer)
    assert "".join(decoder.push(i) for i in tokenizer.encode("ok").ids) == "ok"
    assert decoder.push(tokenizer.token_to_id("â")) == ""  # the byte 0xE2 starts a 3-byte character
    assert decoder.flush() == "\ufffd"


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--prompt", "x", "--top-k", "abc"], "invalid int value"),
    (["--top-k", "5"], "--prompt"),
])
def test_cli_bad_flags(tiny_run, args, message):
    proc = run_cli("--run", tiny_run, *args)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_missing_run_or_checkpoint(tmp_path, monkeypatch, capsys):
    proc = run_cli("--run", tmp_path / "nope", "--prompt", "x")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"error: run directory not found: {tmp_path / 'nope'}"
    (tmp_path / "config.yaml").write_text("{}")
    code, out, err = run_in_process(monkeypatch, capsys, "--run", tmp_path, "--prompt", "x")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: {tmp_path} has no checkpoint and no model.safetensors"
