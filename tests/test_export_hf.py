"""Export to transformers: Llama (GLU) and Mixtral (MoE) give our logits and our greedy tokens; variants without an
exact equivalent are refused with the reason; the CLI's directory loads with the Auto classes, no custom code."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers.activations import ACT2FN

from model.config import FFNConfig, MiniMindConfig
from model.ffn import ACTIVATIONS
from model.model_minimind import MiniMindForCausalLM
from train.train_state import weights_to_bytes
from train.config import DataConfig, RunConfig, TokenizerConfig
from train.data.tokenizer import train_tokenizer
from train.export_hf import HF_ACTIVATIONS, ExportError, export_run, hf_architecture, to_hf_model

ROOT = Path(__file__).resolve().parents[1]
VOCAB, EOS = 320, 0
TEXT = ("ROMEO: But, soft! what light through yonder window breaks? It is the east, and Juliet is the sun.\n"
        "JULIET: O Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name; héllo ✓\n")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_model(seed=0, tie=True, **ffn) -> MiniMindForCausalLM:
    # init_std 0.3: large enough that a random model writes varied tokens (0.02 repeats one token), so greedy
    # generation compares something
    cfg = MiniMindConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_seq_len=64, tie_word_embeddings=tie, init_std=0.3,
                         ffn=FFNConfig(**ffn))
    torch.manual_seed(seed)
    return MiniMindForCausalLM(cfg).eval()


SWIGLU = dict(type="glu", activation="silu")
GEGLU = dict(type="glu", activation="gelu")
MOE = dict(type="moe", n_experts=4, top_k=2, expert_type="glu", expert_activation="silu")


def random_ids(seed, shape):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("our_name", sorted(HF_ACTIVATIONS))  # activations without an HF twin are refused on export
def test_activation_table_is_exact(our_name):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4
    assert torch.equal(ACT2FN[HF_ACTIVATIONS[our_name]](x), ACTIVATIONS[our_name](x))


@pytest.mark.parametrize("name, ffn, tie, arch", [
    ("swiglu", SWIGLU, True, "LlamaForCausalLM"),
    ("geglu-untied", GEGLU, False, "LlamaForCausalLM"),
    ("gelu_tanh", dict(type="glu", activation="gelu_tanh"), True, "LlamaForCausalLM"),
    ("reglu", dict(type="glu", activation="relu"), True, "LlamaForCausalLM"),
    ("relu2", dict(type="glu", activation="relu2"), True, "LlamaForCausalLM"),
    ("glu-sigmoid", dict(type="glu", activation="sigmoid"), True, "LlamaForCausalLM"),
    ("bilinear", dict(type="glu", activation="identity"), False, "LlamaForCausalLM"),
    ("moe", MOE, True, "MixtralForCausalLM"),  # derived expert width 85: transformers' eager expert loop
    ("moe-aligned-untied", {**MOE, "d_ff": 32, "expert_activation": "gelu"}, False, "MixtralForCausalLM"),
])
def test_logits_match(name, ffn, tie, arch):
    ours = tiny_model(tie=tie, **ffn)
    hf = to_hf_model(ours, EOS, attn_implementation="sdpa")
    assert type(hf).__name__ == arch
    ids_BT = random_ids(1, (2, 48))
    with torch.no_grad():
        want, got = ours(ids_BT).logits, hf(ids_BT).logits
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4
    assert want.std() > 0.5  # not a degenerate near-zero model


@pytest.mark.parametrize("ffn", [SWIGLU, GEGLU, MOE], ids=["swiglu", "geglu", "moe"])
def test_greedy_generation_matches(ffn):
    ours = tiny_model(seed=1, tie=False, **ffn)
    hf = to_hf_model(ours, EOS, attn_implementation="eager")
    prompt_1T = random_ids(2, (1, 6))
    want = ours.generate(prompt_1T, max_new_tokens=32, greedy=True, eos_token_id=EOS)
    got = hf.generate(prompt_1T, max_new_tokens=32, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    assert got.tolist() == want.tolist()
    assert len(set(want[0, 6:].tolist())) >= 5  # a varied sequence, not one token repeated


@pytest.mark.parametrize("ffn, why", [
    (dict(type="dense", activation="gelu"), "dense .* gate"),
    (dict(type="none"), "ffn.type=none"),
    ({**MOE, "n_shared_experts": 1}, "no shared experts"),
    ({**MOE, "router_scoring": "sigmoid"}, "softmax"),
    ({**MOE, "top_k": 1}, "top_k=1.*renormalises"),
    ({**MOE, "norm_topk_prob": False}, "norm_topk_prob=false.*q/k RMSNorm"),
    ({**MOE, "expert_type": "dense", "expert_activation": "relu"}, "expert_type=dense"),
    ({**MOE, "capacity_factor": 1.25}, "dropped"),
])
def test_refuses_inexact_variants(ffn, why):
    with pytest.raises(ExportError, match=why):
        hf_architecture(tiny_model(**ffn))


def test_refuses_an_unknown_type_instead_of_guessing():
    model = tiny_model(**MOE)
    model.config.ffn.type = "nope"  # e.g. a run written by a newer version with a block this one does not know
    with pytest.raises(ExportError, match="model.ffn.type: invalid choice 'nope'; valid: 'none', 'dense'"):
        hf_architecture(model)


def test_refuses_nonzero_selection_bias():
    model = tiny_model(**{**MOE, "balancing": "aux_free"})
    assert hf_architecture(model) == "mixtral"  # an untouched (zero) bias routes exactly like Mixtral
    model.moe_layers()[1].router.selection_bias[2] = 0.01
    with pytest.raises(ExportError, match="selection bias .* changes which experts"):
        hf_architecture(model)


def make_run_dir(path: Path, model: MiniMindForCausalLM) -> Path:
    """A run-like directory as load_run reads it when there are no checkpoints: config, tokenizer, weights."""
    tok_cfg = TokenizerConfig(vocab_size=VOCAB)
    tokenizer = train_tokenizer([[TEXT] * 4], tok_cfg, progress=False)
    assert tokenizer.get_vocab_size() <= VOCAB and tokenizer.token_to_id("<|endoftext|>") == EOS
    path.mkdir(parents=True)
    (path / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    (path / "config.yaml").write_text(RunConfig(model=model.config, data=DataConfig(tokenizer=tok_cfg)).to_yaml())
    (path / "model.safetensors").write_bytes(weights_to_bytes(model))
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "export_hf.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_export_loads_with_auto_classes(tmp_path):
    ours = tiny_model(seed=3, **SWIGLU)
    run = make_run_dir(tmp_path / "run", ours)
    proc = run_cli("--run", run, "--out", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    assert "LlamaForCausalLM" in proc.stdout
    out = tmp_path / "hf"
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.tie_word_embeddings
    assert hf.config.rope_parameters["rope_theta"] == ours.config.rope_theta
    from tokenizers import Tokenizer
    ours_tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    assert hf_tok(TEXT)["input_ids"] == ours_tok.encode(TEXT).ids
    assert hf_tok.decode(ours_tok.encode(TEXT).ids) == TEXT
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == EOS == hf.generation_config.eos_token_id

    ids_1T = torch.tensor([hf_tok("JULIET: O Romeo")["input_ids"]])
    with torch.no_grad():
        assert (hf(ids_1T).logits - ours(ids_1T).logits).abs().max().item() < 1e-4
    want = ours.generate(ids_1T, max_new_tokens=30, greedy=True, eos_token_id=EOS)
    assert hf.generate(ids_1T, max_new_tokens=30, do_sample=False).tolist() == want.tolist()

    with pytest.raises(ExportError, match="already exists"):  # never overwrites
        export_run(run, out)


def test_export_run_moe_loads_as_mixtral(tmp_path):
    ours = tiny_model(seed=4, **MOE)
    run = make_run_dir(tmp_path / "run", ours)
    out, arch = export_run(run, tmp_path / "hf")
    assert arch == "MixtralForCausalLM"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.num_local_experts == 4 and hf.config.num_experts_per_tok == 2
    ids_BT = random_ids(5, (2, 40))
    with torch.no_grad():
        assert (hf(ids_BT).logits - ours(ids_BT).logits).abs().max().item() < 1e-4


def test_cli_refuses_dense_in_one_line(tmp_path):
    run = make_run_dir(tmp_path / "run", tiny_model(type="dense", activation="gelu"))
    proc = run_cli("--run", run, "--out", tmp_path / "hf")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert "model.ffn.type=dense" in lines[0] and "gate" in lines[0]
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp-*"))
