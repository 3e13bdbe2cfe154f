"""train.optimizer: AdamW groups (unchanged), Muon groups on dense / GLU / MoE models, the per-expert Muon update,
the lr rule, the config error, and a short Muon training run (CPU, tiny)."""
import dataclasses
import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.model_minimind import MiniMindForCausalLM
from train.config import TrainConfig
from train.config_load import load_config
from train.optim import CombinedOptimizer, MuonStacks, build_optimizer, lr_at, set_lr
from train.runs import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
FFNS = {"dense": ["model.ffn.type=dense", "model.ffn.activation=gelu"], "glu": ["model.ffn.type=glu"],
        "moe": ["model.ffn.type=moe"]}
# parameter-name endings of the hidden matrices (Muon) in these models; everything else is AdamW's
MUON_NAMES = ("attn.qkv_proj.weight", "attn.o_proj.weight", "ffn.up_proj.weight", "ffn.gate_up_proj.weight",
              "ffn.down_proj.weight", "ffn.experts.w_up", "ffn.experts.w_down")


def tiny_model(ffn: str, *overrides: str):
    cfg = load_config(TINY, [*FFNS[ffn], *overrides])
    torch.manual_seed(0)
    return MiniMindForCausalLM(dataclasses.replace(cfg.model, vocab_size=512)), cfg.train


def names_of(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("ffn", list(FFNS))
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(ffn):
    model, t = tiny_model(ffn, "train.optimizer=muon")
    opt = build_optimizer(model, t)
    assert isinstance(opt, CombinedOptimizer)
    every = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())  # each parameter in exactly one group
    muon = names_of(model, [p for g in opt.muon.param_groups for p in g["params"]])
    assert muon == {n for n, _ in model.named_parameters() if n.endswith(MUON_NAMES)}
    assert muon and all(p.ndim in (2, 3) for n, p in model.named_parameters() if n in muon)
    adamw = names_of(model, [p for g in opt.adamw.param_groups for p in g["params"]])
    assert "model.embed_tokens.weight" in adamw and "model.norm.weight" in adamw  # the tied LM head is this one
    assert all(p.ndim == 1 for n, p in model.named_parameters() if n in adamw and n != "model.embed_tokens.weight"
               and "router" not in n)
    if ffn == "moe":
        assert {n for n in adamw if "router" in n} == {f"model.layers.{i}.ffn.router.gate.weight" for i in (0, 1)}
        assert {p.ndim for n, p in model.named_parameters() if "experts" in n} == {3}
    decay, no_decay = opt.adamw.param_groups  # AdamW's decay rule on what it holds: the router decays
    assert names_of(model, decay["params"]) == {n for n in adamw if "router" in n}
    assert decay["weight_decay"] == t.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(g["weight_decay"] == t.weight_decay and g["adjust_lr_fn"] == "match_rms_adamw"
               for g in opt.muon.param_groups)


@pytest.mark.parametrize("ffn", list(FFNS))
def test_adamw_path_is_unchanged(ffn):
    model, t = tiny_model(ffn)
    assert t.optimizer == "adamw"
    opt = build_optimizer(model, t)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"]
    decay, no_decay = opt.param_groups
    # the rule before train.optimizer existed: every matrix except the embedding decays, all in model order
    assert [id(p) for p in decay["params"]] == [id(p) for n, p in model.named_parameters()
                                                if p.ndim >= 2 and n != "model.embed_tokens.weight"]
    assert [id(p) for p in no_decay["params"]] == [id(p) for n, p in model.named_parameters()
                                                   if p.ndim < 2 or n == "model.embed_tokens.weight"]
    assert set(decay) == set(no_decay) and "lr_scale" not in decay  # the state dict keeps its old format
    set_lr(opt, 1.2345e-3)
    assert all(g["lr"] == 1.2345e-3 for g in opt.param_groups)


def test_muon_lr_follows_the_shared_schedule():
    model, t = tiny_model("moe", "train.optimizer=muon")
    opt = build_optimizer(model, t)
    assert all(g["lr"] == t.lr for g in opt.param_groups)  # muon_lr null: the same peak
    model, t = tiny_model("moe", "train.optimizer=muon", "train.muon_lr=0.02")
    opt = build_optimizer(model, t)
    for step in (0, 3, 17, 29):
        lr = lr_at(step, t, 30)
        set_lr(opt, lr)
        assert all(g["lr"] == lr for g in opt.adamw.param_groups)
        assert all(g["lr"] == pytest.approx(0.02 * lr / t.lr, rel=1e-12) for g in opt.muon.param_groups)


def test_muon_stacks_equal_muon_on_each_expert_matrix():
    """MuonStacks on an (E, out, in) stack == torch's Muon on E separate matrices, bit for bit, over several steps
    (both orientations: out > in and out < in, as in w_up / w_down); and its state survives a weights_only reload."""
    gen = torch.Generator().manual_seed(0)
    stacks = [torch.nn.Parameter(torch.randn(3, 12, 5, generator=gen)),
              torch.nn.Parameter(torch.randn(3, 5, 9, generator=gen))]
    flat = torch.nn.Parameter(torch.randn(6, 4, generator=gen))
    experts = [torch.nn.Parameter(s.detach()[e].clone()) for s in stacks for e in range(3)]
    flat_ref = torch.nn.Parameter(flat.detach().clone())
    kw = dict(lr=0.01, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
    ours = MuonStacks([flat, *stacks], **kw)
    ref = torch.optim.Muon([flat_ref, *experts], **kw)
    for _ in range(4):
        grads = [torch.randn(s.shape, generator=gen) for s in stacks]
        g_flat = torch.randn(flat.shape, generator=gen)
        for s, g in zip(stacks, grads):
            s.grad = g.clone()
        flat.grad, flat_ref.grad = g_flat.clone(), g_flat.clone()
        for i, p in enumerate(experts):
            p.grad = grads[i // 3][i % 3].clone()
        ours.step()
        ref.step()
    assert torch.equal(flat, flat_ref)
    for i, p in enumerate(experts):
        assert torch.equal(stacks[i // 3][i % 3], p), i
    assert ours.state[stacks[0]]["momentum_buffer"].shape == (3, 12, 5)  # one buffer per stack
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    again = MuonStacks([flat, *stacks], **kw)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(again.state[stacks[1]]["momentum_buffer"], ours.state[stacks[1]]["momentum_buffer"])


def test_combined_state_dict_round_trips_weights_only():
    model, t = tiny_model("moe", "train.optimizer=muon")
    opt = build_optimizer(model, t)
    x = torch.randint(0, 512, (2, 16))
    out = model(x, x)
    (out.loss + out.aux_loss).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = build_optimizer(model, t)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.state_dict()["muon"]["param_groups"] == opt.state_dict()["muon"]["param_groups"]
    with pytest.raises(ValueError, match="Muon \\+ AdamW"):
        fresh.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


@pytest.mark.parametrize("override, expected", [
    ("train.optimizer=sgd", "error: train.optimizer: invalid choice 'sgd' (command line); valid: 'adamw', 'muon'"),
    ("train.muon_momentum=1.5", "error: train.muon_momentum must be in [0, 1), got 1.5"),
])
def test_bad_optimizer_settings_are_one_line_exit_2(override, expected):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(TINY), override],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(expected), proc.stderr
    with pytest.raises(ValueError):
        TrainConfig(muon_lr=0.0)


def test_ten_muon_steps_lower_the_loss(tiny_data_cache, tmp_path):
    from train.trainer import train

    out = tmp_path / "run"
    result = train(load_config(TINY, [f"data.cache_dir={tiny_data_cache}", f"train.out_dir={out}",
                                      "train.optimizer=muon", "train.max_steps=10", "train.warmup_steps=2",
                                      "train.log_interval=1", "train.eval_interval=10", "train.ckpt_interval=10",
                                      "train.sample_max_new_tokens=2", "wandb.mode=disabled"]))
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.25, losses  # ~0.4 here
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < math.log(512)
    state = torch.load(out / "state.pt", weights_only=True)
    assert set(state["optimizer"]) == {"muon", "adamw"}


def test_clip_grad_norm_gives_torchs_gradients_and_skips_the_identity_multiply(monkeypatch):
    from train.runtime import clip_grad_norm

    def grads_after(clip, max_norm, scale):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
        for p in params:
            p.grad = torch.randn_like(p) * scale
        norm = clip(params, max_norm)
        return float(norm), [p.grad.clone() for p in params]

    calls = []
    real = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", lambda *a, **k: calls.append(1) or real(*a, **k))
    for max_norm, scale, multiplies in [(1.0, 10.0, True), (1.0, 0.01, False), (float("inf"), 10.0, False),
                                        (1.0, float("nan"), True)]:
        calls.clear()
        norm, grads = grads_after(clip_grad_norm, max_norm, scale)
        assert bool(calls) == multiplies, (max_norm, scale)
        ref_norm, ref_grads = grads_after(torch.nn.utils.clip_grad_norm_, max_norm, scale)
        assert norm == ref_norm or (math.isnan(norm) and math.isnan(ref_norm))
        for g, ref in zip(grads, ref_grads):  # bit-identical to torch's clipping, NaN where torch has NaN
            assert torch.equal(g.isnan(), ref.isnan()) and torch.equal(g.nan_to_num(), ref.nan_to_num())
