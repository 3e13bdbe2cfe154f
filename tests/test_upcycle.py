"""Upcycling a finished dense run into an MoE (train/upcycle.py): what is copied, when the step-0 logits are the
parent's, and what is refused."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model.config import FFNConfig
from model.model_minimind import MiniMindForCausalLM
from train import checkpoint as ck
from train import train_state
from train.config_load import load_config
from train.errors import ConfigError
from train.upcycle import upcycle

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
F_PARENT = 48  # d_ff of the parent: 48 = 2·24 = 3·16 = 4·12 (copies or 2, 3, 4 segments)


def finished_run(run_dir: Path, *overrides: str) -> Path:
    """A finished run directory as the trainer leaves it (config.yaml, model.safetensors, a final metrics record,
    tokenizer.json), with random weights large enough that a wrong copy shows in the logits."""
    cfg = load_config(TINY, ["model.vocab_size=256", f"model.ffn.d_ff={F_PARENT}", f"train.out_dir={run_dir}",
                             *overrides])
    torch.manual_seed(0)
    model = MiniMindForCausalLM(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    run_dir.mkdir(parents=True)
    ck.write_atomic(run_dir / "config.yaml", cfg.to_yaml())
    ck.write_atomic(run_dir / ck.WEIGHTS, train_state.weights_to_bytes(model))
    ck.write_atomic(run_dir / "metrics.jsonl", json.dumps({"type": "final", "step": 1, "val_loss": 5.0}) + "\n")
    ck.write_atomic(run_dir / "tokenizer.json", '{"tokenizer": "parent"}')
    return run_dir


@pytest.fixture(scope="module")
def glu_parent(tmp_path_factory):
    return finished_run(tmp_path_factory.mktemp("upcycle") / "glu")


def child(parent: Path, **ffn):
    """(parent model, upcycled child model) on the same token ids -> their logits."""
    parent_cfg = load_config(parent / "config.yaml")
    parent_ffn = parent_cfg.model.ffn
    ffn = {"type": "moe", "expert_type": parent_ffn.type, "expert_activation": parent_ffn.activation,
           "upcycle_from": str(parent), **ffn}
    model_cfg = replace(parent_cfg.model, ffn=FFNConfig(**ffn))
    torch.manual_seed(1)
    model = MiniMindForCausalLM(model_cfg)
    info = upcycle(model, model_cfg, tokenizer_path=parent / "tokenizer.json", say=lambda msg: None)
    return model, info


def logits(model, seed=0):
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x).logits


def parent_model(parent: Path):
    model = MiniMindForCausalLM(load_config(parent / "config.yaml").model)
    train_state.load_weights(model, parent / ck.WEIGHTS)
    return model


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_copies_with_renormalised_top_k_give_the_parents_logits(glu_parent, scoring):
    """Every expert a copy, any router: Σ_k w_k·FFN(x) = FFN(x) because the renormalised gates sum to 1 (up to fp32
    rounding of that sum and of the weighted adds)."""
    model, info = child(glu_parent, n_experts=4, top_k=2, d_ff=F_PARENT, router_scoring=scoring)
    assert info["segments"] == 1 and info["copies_per_segment"] == 4
    want = logits(parent_model(glu_parent))
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)
    assert model.moe_layers()[0].router.gate.weight.abs().sum() > 0  # the router keeps its fresh initialisation


def test_everything_but_the_ffn_is_the_parents_and_experts_are_segments(glu_parent):
    parent = parent_model(glu_parent)
    model, _ = child(glu_parent, n_experts=6, top_k=2, d_ff=16)  # G = 3 segments, 2 copies each
    parent_sd = parent.state_dict()
    for name, t in model.state_dict().items():
        if ".ffn." not in name:
            assert torch.equal(t, parent_sd[name]), name
    dense, moe = parent.model.layers[1].ffn, model.model.layers[1].ffn
    gate, up = dense.gate_up_proj.weight.chunk(2)
    for e in range(6):
        seg = slice(e % 3 * 16, e % 3 * 16 + 16)
        assert torch.equal(moe.experts.w_up[e], torch.cat([gate[seg], up[seg]]))
        assert torch.equal(moe.experts.w_down[e], dense.down_proj.weight[:, seg] * 3)
    assert moe.router.gate.weight.abs().sum() > 0  # top_k < n_experts: the router is not reset
    assert not torch.allclose(logits(model), logits(parent), atol=1e-3)  # a different function at step 0


@pytest.mark.parametrize("segments", [2, 3, 4])
def test_segments_all_chosen_under_the_uniform_router_give_the_parents_logits(glu_parent, segments):
    """n_experts = top_k = G: every token takes every segment with gate 1/G, and each down-projection is × G."""
    model, info = child(glu_parent, n_experts=segments, top_k=segments, d_ff=F_PARENT // segments)
    assert info["segments"] == segments
    assert all(moe.router.gate.weight.abs().sum() == 0 for moe in model.moe_layers())
    torch.testing.assert_close(logits(model), logits(parent_model(glu_parent)), rtol=1e-5, atol=1e-5)


def test_top1_copies_are_scaled_by_the_router_probability(glu_parent):
    """top_k = 1 keeps the gate p < 1 (the router needs the LM loss's gradient): p·FFN(x) is not the parent."""
    model, _ = child(glu_parent, n_experts=4, top_k=1, d_ff=F_PARENT)
    assert not torch.allclose(logits(model), logits(parent_model(glu_parent)), atol=1e-3)


def test_a_dense_parent_upcycles_into_dense_experts(tmp_path):
    parent = finished_run(tmp_path / "relu2", "model.ffn.type=dense", "model.ffn.activation=relu2")
    model, _ = child(parent, n_experts=2, top_k=2, d_ff=24)
    torch.testing.assert_close(logits(model), logits(parent_model(parent)), rtol=1e-5, atol=1e-5)


def test_weights_are_read_with_safetensors_only(glu_parent, monkeypatch):
    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load (pickle) must not read the parent's weights")
    monkeypatch.setattr(torch, "load", no_pickle)
    child(glu_parent, n_experts=4, top_k=2, d_ff=F_PARENT)


@pytest.mark.parametrize("ffn, message", [
    (dict(n_experts=4, top_k=2, d_ff=20), "must divide the parent's FFN width 48"),
    (dict(n_experts=4, top_k=2, d_ff=16), "multiple of G"),  # 3 segments do not spread over 4 experts
    (dict(n_experts=4, top_k=2, d_ff=24, n_shared_experts=1), "shared and null experts"),
    (dict(n_experts=4, top_k=2, d_ff=24, n_null_experts=2), "shared and null experts"),
    (dict(n_experts=4, top_k=2, d_ff=24, expert_activation="gelu"), "expert_activation=silu"),
])
def test_refusals_name_the_reason(glu_parent, ffn, message):
    with pytest.raises(ConfigError, match=message):
        child(glu_parent, **ffn)


def test_refuses_unfinished_runs_other_shapes_and_other_tokenizers(glu_parent, tmp_path):
    unfinished = finished_run(tmp_path / "unfinished")
    (unfinished / "metrics.jsonl").write_text('{"type": "train", "step": 1}\n')
    with pytest.raises(ConfigError, match="not a finished run"):
        child(unfinished, n_experts=4, top_k=2, d_ff=F_PARENT)
    nowhere = load_config(glu_parent / "config.yaml", ["model.ffn.type=moe", f"model.ffn.upcycle_from={tmp_path}",
                                                       "model.ffn.d_ff=48"])
    with pytest.raises(ConfigError, match="not a run directory"):
        upcycle(MiniMindForCausalLM(nowhere.model), nowhere.model, say=lambda msg: None)
    wider = load_config(glu_parent / "config.yaml", ["model.hidden_size=128", "model.ffn.type=moe",
                                                      f"model.ffn.upcycle_from={glu_parent}", "model.ffn.d_ff=48"])
    with pytest.raises(ConfigError, match="model.hidden_size is 128 here and 64"):
        upcycle(MiniMindForCausalLM(wider.model), wider.model, say=lambda msg: None)
    other_tokenizer = tmp_path / "tokenizer.json"
    other_tokenizer.write_text('{"tokenizer": "another"}')
    cfg = load_config(glu_parent / "config.yaml", ["model.ffn.type=moe", f"model.ffn.upcycle_from={glu_parent}",
                                                    "model.ffn.d_ff=48"])
    with pytest.raises(ConfigError, match="differs from this run's tokenizer"):
        upcycle(MiniMindForCausalLM(cfg.model), cfg.model, tokenizer_path=other_tokenizer, say=lambda msg: None)
