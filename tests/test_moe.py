"""MoE layer: routing, dispatch against a naive per-token reference, grouped vs loop paths, balancing losses."""
import math

import pytest
import torch
import torch.nn.functional as F

import model.moe as moe_module
from model.config import FFNConfig, MiniMindConfig
from model.model_minimind import MiniMindForCausalLM
from model.moe import MoEFFN, _pad_groups
from moe_reference import reference_forward, use_path
from moe_reference import make_moe as _make_moe

D = 64


def make_moe(**kw) -> MoEFFN:
    return _make_moe(D, std=0.2, **{"n_experts": 8, "top_k": 2, "d_ff": 32, **kw})


CONFIGS = {
    "softmax-top2": dict(),
    "softmax-top1": dict(top_k=1),
    "sigmoid-top2": dict(router_scoring="sigmoid"),
    "sigmoid-top3-unnormalised": dict(router_scoring="sigmoid", top_k=3, norm_topk_prob=False),
    "shared": dict(n_shared_experts=2),
    "dense-experts-gelu": dict(expert_type="dense", expert_activation="gelu"),
    "unaligned-width": dict(d_ff=21),  # grouped_mm cannot take this width: the loop path runs
}


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_naive_per_token_reference(name):
    moe = make_moe(**CONFIGS[name])
    x = torch.randn(3, 11, D)
    out = moe(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference_forward(moe, x), atol=1e-5, rtol=1e-5)


def test_each_token_reaches_exactly_top_k_experts():
    moe = make_moe(top_k=3)
    x = torch.randn(1, 6, D)
    _, _, expert_NK, _ = moe.router(x.view(-1, D))
    for n in range(6):  # an expert took part in token n's output iff its weights get gradient from it
        moe.zero_grad()
        moe(x)[0, n].sum().backward()
        reached = {e for e in range(8) if moe.experts.w_up.grad[e].abs().sum() > 0}
        assert reached == set(expert_NK[n].tolist())
        assert len(reached) == 3


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="this torch has no grouped_mm; the loop is the only path")
@pytest.mark.parametrize("cfg", [dict(), dict(expert_type="dense", expert_activation="relu2", n_shared_experts=1)])
def test_grouped_and_loop_paths_agree(cfg, monkeypatch):
    moe = make_moe(**cfg)
    x = torch.randn(2, 16, D)
    assert moe.experts.grouped_mm_ok(x)
    results = {}
    for mode in ("grouped", "loop"):
        use_path(monkeypatch, mode)
        moe.zero_grad()
        xg = x.clone().requires_grad_(True)
        out = moe(xg)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[mode] = (out, xg.grad, *(p.grad.clone() for p in moe.parameters()))
    for a, b in zip(results["grouped"], results["loop"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and in bf16 autocast (the training path on CPU)
    outs = {}
    for mode in ("grouped", "loop"):
        use_path(monkeypatch, mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[mode] = moe(x).float()
    torch.testing.assert_close(outs["grouped"], outs["loop"], atol=2e-2, rtol=2e-2)


def test_pad_groups_by_hand():
    # 6 expert-sorted slots: expert 0 has tokens 5, 7, 9; expert 1 token 2; expert 2 none; expert 3 tokens 4, 6.
    # pad 4: R = 6 + 4·3 = 18 -> 20 rows; groups 4, 4, 0 and the last takes the rest: 20 − 8 = 12
    token_S = torch.tensor([5, 7, 9, 2, 4, 6])
    weight_S = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    expert_S = torch.tensor([0, 0, 0, 1, 3, 3])
    token_R, weight_R, counts_E = _pad_groups(token_S, weight_S, expert_S, torch.tensor([3, 1, 0, 2]), 4)
    assert counts_E.tolist() == [4, 4, 0, 12]
    assert token_R.tolist() == [5, 7, 9, 0, 2, 0, 0, 0, 4, 6] + [0] * 10
    torch.testing.assert_close(weight_R, torch.tensor([0.1, 0.2, 0.3, 0, 0.4, 0, 0, 0, 0.5, 0.6] + [0.0] * 10))


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="this torch has no grouped_mm; the loop is the only path")
@pytest.mark.parametrize("cfg", [dict(n_shared_experts=1), dict(capacity_factor=1.0),
                                 dict(top_k=3, expert_type="dense", expert_activation="relu2")])
def test_padding_rows_add_exactly_zero(cfg, monkeypatch):
    """The same layer, inputs and path (fp32 grouped matmul) with expert groups padded to 32 rows and without: the
    weight-0 padding rows must not change the output, the input gradient or any weight gradient (exact for the
    output and the input gradient; the weight gradients only differ by the kernels' summation order over rows)."""
    moe = make_moe(**cfg)
    x = torch.randn(2, 16, D)
    probe = torch.randn(2, 16, D)
    assert moe.experts.grouped_mm_ok(x) and moe.pad_rows(x.view(-1, D)) == 1  # fp32: normally unpadded
    seen_counts = []
    moe.experts.register_forward_pre_hook(lambda mod, args: seen_counts.append(args[1].clone()))
    results = {}
    for pad in (1, 32):
        monkeypatch.setattr(MoEFFN, "pad_rows", lambda self, x_ND: pad)
        moe.zero_grad()
        xg = x.clone().requires_grad_(True)
        out = moe(xg)
        (out * probe).sum().backward()
        results[pad] = (out.detach(), xg.grad, {n: p.grad.clone() for n, p in moe.named_parameters()})
    unpadded, padded = seen_counts
    assert (padded % 32 == 0).all() and padded.sum() > unpadded.sum()  # the padding really ran
    (out1, dx1, dp1), (out32, dx32, dp32) = results[1], results[32]
    assert torch.equal(out32, out1)
    assert torch.equal(dx32, dx1)
    for name, g in dp1.items():  # a nonzero pad weight would move these by ~1e-1
        torch.testing.assert_close(dp32[name], g, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="this torch has no grouped_mm; the loop is the only path")
def test_padded_bf16_groups_match_the_unpadded_loop_with_gradients(monkeypatch):
    """CPU bf16 pads every expert's rows to a multiple of 32 (oneDNN JIT, see MoEFFN.pad_rows). Against the loop path,
    which does not pad: the same up to bf16 rounding (two different kernels; the padding itself adds exactly zero,
    see test_padding_rows_add_exactly_zero)."""
    moe = make_moe(d_ff=32, n_shared_experts=1)
    x = torch.randn(2, 16, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe.pad_rows(x.view(-1, D).bfloat16()) == 32
    seen_counts = []
    moe.experts.register_forward_pre_hook(lambda mod, args: seen_counts.append(args[1].clone()))
    results = {}
    for mode in ("grouped", "loop"):
        use_path(monkeypatch, mode)
        moe.zero_grad()
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = moe(xg).float()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[mode] = (out, xg.grad, *(p.grad.clone() for p in moe.parameters()))
    padded, unpadded = seen_counts
    assert (padded % 32 == 0).all() and padded.sum() == 320 and unpadded.sum() == 2 * 32  # R = 64 + 8·31 -> 320
    for a, b in zip(results["grouped"], results["loop"]):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


def test_switch_aux_loss_equals_coefficient_under_uniform_routing():
    # token n points along axis n mod E and the router maps axis e to expert e: every expert gets the same number of
    # tokens (f_i = 1/E) and by symmetry the mean router probabilities are equal too (P_i = 1/E)
    E, coef = 4, 0.01
    moe = make_moe(n_experts=E, top_k=1, aux_loss_coef=coef, z_loss_coef=0.0)
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[:, :E] = 3.0 * torch.eye(E)
    x = torch.zeros(1, 4 * E, D)
    x[0, torch.arange(4 * E), torch.arange(4 * E) % E] = 1.0
    moe(x)
    assert moe.aux_losses["aux_loss"].item() == pytest.approx(coef, rel=1e-6)
    assert moe.aux_loss.item() == pytest.approx(coef, rel=1e-6)

    # collapsed routing: all tokens to expert 0 with probability p -> α·E·(1·p)
    x = torch.zeros(1, 8, D)
    x[0, :, 0] = 1.0
    moe(x)
    p0 = math.exp(3.0) / (math.exp(3.0) + E - 1)
    assert moe.aux_losses["aux_loss"].item() == pytest.approx(coef * E * p0, rel=1e-5)


def test_aux_loss_top2_uniform_and_z_loss_value():
    E = 8
    moe = make_moe(n_experts=E, top_k=2, aux_loss_coef=0.05, z_loss_coef=0.002)
    with torch.no_grad():
        moe.router.gate.weight.zero_()  # all logits 0: P_i = 1/E whatever the tie-breaking does to f_i
    moe(torch.randn(2, 8, D))
    assert moe.aux_losses["aux_loss"].item() == pytest.approx(0.05, rel=1e-6)
    assert moe.aux_losses["z_loss"].item() == pytest.approx(0.002 * math.log(E) ** 2, rel=1e-6)


def test_no_aux_loss_unless_selected():
    for balancing in ("none", "aux_free"):
        moe = make_moe(balancing=balancing, z_loss_coef=0.0)
        moe(torch.randn(1, 8, D))
        assert moe.aux_loss.item() == 0.0


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_gets_lm_loss_gradient(top_k):
    cfg = MiniMindConfig(vocab_size=256, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_seq_len=32,
                         ffn=FFNConfig(type="moe", n_experts=4, top_k=top_k, norm_topk_prob=True,
                                       aux_loss_coef=0.0, z_loss_coef=0.0))
    torch.manual_seed(0)
    model = MiniMindForCausalLM(cfg)
    x = torch.randint(0, 256, (2, 32))
    out = model(x, torch.roll(x, -1, 1))
    assert out.aux_loss.item() == 0.0
    out.loss.backward()
    for moe in model.moe_layers():
        assert moe.router.gate.weight.grad.abs().max() > 0


def test_aux_free_bias_moves_against_load_and_only_changes_selection():
    E, rate = 4, 0.01
    moe = make_moe(n_experts=E, top_k=1, balancing="aux_free", bias_update_rate=rate)
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0, 0] = 5.0  # tokens with x[0] > 0 strongly prefer expert 0
    x = torch.randn(1, 64, D)
    x[..., 0] = x[..., 0].abs() + 1.0
    moe.train()
    moe(x)
    load = moe.pending_counts.clone()
    assert load[0] == 64
    moe.after_optimizer_step()
    bias = moe.router.selection_bias
    assert bias[0].item() == pytest.approx(-rate)
    assert torch.allclose(bias[1:], torch.full((E - 1,), rate))
    assert moe.pending_counts.sum() == 0
    moe.after_optimizer_step()  # nothing routed since: no move
    assert bias[0].item() == pytest.approx(-rate)

    # a large bias forces expert 3, but the gate weight is still the unbiased probability of expert 3
    with torch.no_grad():
        moe.router.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    _, probs_NE, expert_NK, weight_NK = moe.router(x.view(-1, D))
    assert (expert_NK == 3).all()
    torch.testing.assert_close(weight_NK[:, 0], probs_NE[:, 3])


def test_aux_free_update_is_noop_for_other_balancing():
    moe = make_moe(balancing="aux_loss")
    moe.train()
    moe(torch.randn(1, 16, D))
    moe.after_optimizer_step()
    assert moe.router.selection_bias.abs().sum() == 0
    assert moe.pending_counts.sum() == 0


def test_skipped_step_discards_its_routing_counts():
    moe = make_moe(n_experts=4, top_k=1, balancing="aux_free", bias_update_rate=0.01).train()
    moe(torch.randn(1, 32, D))
    assert moe.pending_counts.sum() == 32
    moe.after_optimizer_step(skipped=True)
    assert moe.pending_counts.sum() == 0 and moe.router.selection_bias.abs().sum() == 0
    assert moe.load_counts.sum() == 32  # the logging window is not the bias's business


def test_aux_free_counts_are_all_reduced_under_torch_distributed(monkeypatch):
    """Under DDP every rank adds the others' counts before moving the bias (so all ranks keep the same bias)."""
    calls = []

    def all_reduce(t):
        calls.append(t.clone())
        t.mul_(3)  # three ranks with the same load

    monkeypatch.setattr(moe_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(moe_module.dist, "all_reduce", all_reduce)
    moe = make_moe(n_experts=4, top_k=1, balancing="aux_free").train()
    moe(torch.randn(1, 8, D))
    moe.after_optimizer_step()
    assert len(calls) == 1 and calls[0].sum() == 8
    other = make_moe(balancing="aux_loss").train()  # the load is all-reduced too (MaxVio is the global batch's) ...
    other(torch.randn(1, 8, D))
    other.after_optimizer_step()
    assert len(calls) == 2 and other.router.selection_bias.abs().sum() == 0  # ... but no bias moves
    other.after_optimizer_step(skipped=True)  # every rank skips the same step: no collective
    assert len(calls) == 2


def test_the_block_class_answers_for_its_type():
    ffn = FFNConfig(type="moe", n_experts=8, top_k=2, n_shared_experts=1)
    assert MoEFFN.matched_on == "active" and MoEFFN.may_skip_params and MoEFFN.step_cost > 1
    assert MoEFFN.label(ffn) == "moe 8x2+1s glu-silu" and MoEFFN.slug(ffn) == "moe8x2+1s-glu-silu"
    assert MoEFFN.describe(ffn)["n_experts"] == 8 and MoEFFN.describe(ffn)["activation"] == "silu"
    with pytest.raises(ValueError, match="shared experts"):
        MoEFFN.hf_export(ffn)
    with pytest.raises(ValueError, match="model.ffn.top_k"):
        MoEFFN.validate(FFNConfig(type="glu", n_experts=2, top_k=3))  # what FFNConfig(type="moe", ...) runs


def test_expert_load_counts_training_slots_only():
    moe = make_moe(top_k=2)
    moe.train()
    moe(torch.randn(2, 8, D))
    moe(torch.randn(1, 8, D))
    assert int(moe.load_counts.sum()) == (16 + 8) * 2
    load = moe.expert_load()
    assert len(load) == 8 and sum(load) == pytest.approx(1.0)
    moe.eval()
    moe(torch.randn(2, 8, D))
    assert int(moe.load_counts.sum()) == 48
    moe.reset_expert_load()
    assert moe.expert_load() == [0.0] * 8


def test_capacity_factor_drops_overflow_tokens_only_when_set():
    E = 4
    moe = make_moe(n_experts=E, top_k=1, capacity_factor=1.0)  # capacity = 1.0 · 1 · 8 / 4 = 2 slots per expert
    with torch.no_grad():
        moe.router.selection_bias.copy_(torch.tensor([100.0, 0, 0, 0]))  # every token picks expert 0
    x = torch.randn(1, 8, D)
    out = moe(x)
    assert out[0, :2].abs().sum() > 0  # the first two tokens fit
    assert out[0, 2:].abs().sum() == 0  # the rest are dropped (the residual carries them)
    moe.capacity_factor = None
    out = moe(x)
    assert (out[0].abs().sum(-1) > 0).all()
    torch.testing.assert_close(out, reference_forward(moe, x), atol=1e-5, rtol=1e-5)


def test_aux_free_two_process_ddp_keeps_the_single_process_bias(tiny_data_cache, tmp_path):
    """The MoE all-reduces its own routing counts under torch.distributed: two ranks end with the single process's
    selection bias and losses (same global batch)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from train.config_load import load_config
    from train.trainer import train
    from train.runs import read_metrics

    root = Path(__file__).resolve().parents[1]
    common = [f"data.cache_dir={tiny_data_cache}", "model.ffn.type=moe", "model.ffn.n_experts=4",
              "model.ffn.balancing=aux_free", "model.ffn.bias_update_rate=0.01", "train.grad_accum=4",
              "train.micro_batch_size=2", "train.max_steps=4", "train.log_interval=1", "train.eval_interval=4",
              "train.ckpt_interval=4", "train.sample_max_new_tokens=2"]
    train(load_config(root / "configs" / "tiny.yaml", [*common, f"train.out_dir={tmp_path / 'one'}"]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(root / "scripts" / "train.py"), "--config", str(root / "configs" / "tiny.yaml"),
                           *common, f"train.out_dir={tmp_path / 'two'}"], cwd=root, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = {}
    for name in ("one", "two"):
        losses = [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["type"] == "train"]
        weights = load_file(str(tmp_path / name / "checkpoints" / "step_000004" / "model.safetensors"))
        runs[name] = losses, {k: v for k, v in weights.items() if k.endswith("selection_bias")}
    (loss1, bias1), (loss2, bias2) = runs["one"], runs["two"]
    assert len(bias1) == 2 and any(b.abs().sum() > 0 for b in bias1.values())  # the bias did move
    for key, b in bias1.items():
        assert torch.equal(bias2[key], b), key
    assert loss2 == pytest.approx(loss1, rel=1e-4, abs=1e-5)
