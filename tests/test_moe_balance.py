"""MoE balancing options, null experts, shared-expert sizing and routing health (model/moe.py, model/moe_balance.py).

Shape suffixes as in model/moe.py: N tokens, D hidden, E router outputs, K top_k.
"""
import math

import pytest
import torch

from model.config import FFNConfig
from model.ffn import dense_ffn_params
from model.moe import MoEFFN
from moe_reference import make_moe, reference_forward

D = 64


def axis_router(moe: MoEFFN, scale: float = 3.0) -> None:
    """Router logits = scale · x[:E]: a token along axis e prefers output e."""
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[:, :moe.n_outputs] = scale * torch.eye(moe.n_outputs)


def tokens_on_axes(axes_BT: list[list[int]]) -> torch.Tensor:
    x = torch.zeros(len(axes_BT), len(axes_BT[0]), D)
    for b, row in enumerate(axes_BT):
        for t, axis in enumerate(row):
            x[b, t, axis] = 1.0
    return x


def test_sequence_wise_loss_averages_each_sequences_own_balance():
    """Sequence 0 spreads over the 4 experts (f = P = 1/4: loss α), sequence 1 sends every token to expert 0
    (f = (1, 0, 0, 0), P_0 = p: loss α·E·p); the sequence-wise loss is their mean, the micro-batch loss is not."""
    E, coef = 4, 0.01
    x = tokens_on_axes([[0, 1, 2, 3] * 2, [0] * 8])
    p0 = math.exp(3.0) / (math.exp(3.0) + E - 1)
    losses = {}
    for balancing in ("seq_aux_loss", "aux_loss"):
        moe = make_moe(D, n_experts=E, top_k=1, d_ff=32, balancing=balancing, aux_loss_coef=coef, z_loss_coef=0.0)
        axis_router(moe)
        moe(x)
        losses[balancing] = moe.aux_losses[balancing].item()
        assert moe.aux_loss.item() == losses[balancing]
    assert losses["seq_aux_loss"] == pytest.approx((coef + coef * E * p0) / 2, rel=1e-6)
    assert losses["aux_loss"] != pytest.approx(losses["seq_aux_loss"], rel=1e-3)


def test_sequence_wise_loss_of_one_sequence_is_the_micro_batch_loss():
    x = torch.randn(1, 16, D)
    values = []
    for balancing in ("seq_aux_loss", "aux_loss"):
        moe = make_moe(D, std=0.2, n_experts=8, top_k=2, d_ff=32, balancing=balancing)
        moe(x)
        values.append(moe.aux_losses[balancing].item())
    assert values[0] == pytest.approx(values[1], rel=1e-6)


@pytest.mark.parametrize("balancing", ["aux_loss", "seq_aux_loss", "global_aux_loss"])
def test_sigmoid_scoring_with_the_selection_bias_works_with_every_balancing_loss(balancing):
    """DeepSeek-V3's mix: sigmoid scores, the bias moving beside a balancing loss. The loss reaches the router, the
    bias moves against the load, and the loss's f counts the biased choices."""
    moe = make_moe(D, n_experts=4, top_k=1, d_ff=32, balancing=balancing, router_scoring="sigmoid",
                   aux_free_bias=True, bias_update_rate=0.01, z_loss_coef=0.0).train()
    axis_router(moe)
    x = tokens_on_axes([[0] * 8, [0] * 8])  # all tokens prefer expert 0
    moe(x)
    moe.aux_losses[balancing].backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0
    moe.after_optimizer_step()
    torch.testing.assert_close(moe.router.selection_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    with torch.no_grad():
        moe.router.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))  # now the bias picks expert 3
    moe(x)
    probs3 = moe.router(x.view(-1, D))[1][:, 3].mean()
    assert moe.aux_losses[balancing].item() == pytest.approx(0.01 * 4 * probs3.item(), rel=1e-5)  # f = (0, 0, 0, 1)


def test_aux_free_is_the_bias_alone():
    moe = make_moe(D, n_experts=4, top_k=1, d_ff=32, balancing="aux_free", z_loss_coef=0.0).train()
    moe(torch.randn(2, 8, D))
    assert moe.aux_loss.item() == 0.0 and set(moe.aux_losses) == {"aux_loss", "z_loss"}
    moe.after_optimizer_step()
    assert moe.router.selection_bias.abs().sum() > 0


# --- null experts ------------------------------------------------------------------------------------------------

def test_null_experts_compute_nothing_and_renormalise_over_the_real_experts():
    moe = make_moe(D, std=0.2, n_experts=4, n_null_experts=4, top_k=2, d_ff=32)
    assert moe.router.gate.weight.shape == (8, D) and moe.experts.w_up.shape[0] == 4
    axis_router(moe, scale=5.0)
    # token 0: real 0 + null 4 -> gate 1 on expert 0; token 1: nulls 5 + 6 -> no output; token 2: real 1 + real 2
    x = tokens_on_axes([[0, 5, 1], [4, 6, 2]]).sum(0, keepdim=True)
    _, _, expert_NK, weight_NK = moe.router(x.view(-1, D))
    assert [sorted(e) for e in expert_NK.tolist()] == [[0, 4], [5, 6], [1, 2]]
    real_NK = expert_NK < 4
    torch.testing.assert_close((weight_NK * real_NK)[[0, 2]].sum(-1), torch.ones(2))
    out = moe(x)
    assert out[0, 1].abs().sum() == 0
    torch.testing.assert_close(out, reference_forward(moe, x), atol=1e-5, rtol=1e-5)


def test_null_experts_are_balanced_as_one_group():
    """f of the null experts is their group mean: moving slots between null experts leaves the loss unchanged."""
    moe = make_moe(D, n_experts=2, n_null_experts=2, top_k=1, d_ff=32, z_loss_coef=0.0, aux_loss_coef=1.0)
    axis_router(moe)
    losses = []
    for axes in ([0, 1, 2, 2], [0, 1, 2, 3]):  # both null slots on null 2, or one on each
        moe(tokens_on_axes([axes]))
        losses.append(moe.aux_losses["aux_loss"])
    probs = [moe.router(tokens_on_axes([a]).view(-1, D))[1].mean(0) for a in ([0, 1, 2, 2], [0, 1, 2, 3])]
    for loss, p in zip(losses, probs):  # f = (1/4, 1/4, 1/4, 1/4) after grouping in both cases
        assert loss.item() == pytest.approx((4 * 0.25 * p).sum().item(), rel=1e-6)


def test_null_experts_in_the_width_rule_capacity_and_names():
    ffn = FFNConfig(type="moe", n_experts=8, n_null_experts=8, top_k=4)  # balanced: 2 real experts per token
    d = 128
    moe = MoEFFN(d, ffn)
    assert moe.d_ff == MoEFFN.width(FFNConfig(type="moe", n_experts=8, top_k=2), d) - 1  # router 16 vs 8 outputs
    assert abs(moe.active_params() - dense_ffn_params(d)) / dense_ffn_params(d) < 0.01
    assert MoEFFN.label(ffn) == "moe 8x4+8n glu-silu" and MoEFFN.slug(ffn) == "moe8x4+8n-glu-silu"
    capped = make_moe(D, n_experts=2, n_null_experts=2, top_k=1, d_ff=32, capacity_factor=1.0).train()
    with torch.no_grad():
        capped.router.selection_bias.copy_(torch.tensor([100.0, 0, 0, 0]))
    capped(torch.randn(1, 8, D))  # capacity 1.0 · 1 · 8 / (2 + 2) = 2 of the 8 slots on expert 0
    assert capped.health()["moe_drop_frac"] == pytest.approx(6 / 8)
    with pytest.raises(ValueError, match="n_null_experts=8"):
        MoEFFN.hf_export(ffn)
    with pytest.raises(ValueError, match="n_experts\\+n_null_experts=10"):
        FFNConfig(type="moe", n_experts=8, n_null_experts=2, top_k=11)
    with pytest.raises(ValueError, match="n_null_experts"):
        FFNConfig(type="moe", n_null_experts=-1)


# --- shared expert sizing ----------------------------------------------------------------------------------------

def test_shared_d_ff_sizes_the_shared_expert_and_the_routed_experts_fill_the_rest():
    d = 128
    moe = MoEFFN(d, FFNConfig(type="moe", n_experts=4, top_k=1, n_shared_experts=1, shared_d_ff=172, multiple_of=4))
    assert moe.d_ff == 168 and moe.shared_experts.down_proj.weight.shape == (d, 172)
    assert moe.active_params() == dense_ffn_params(d)  # 512 + 384 · (168 + 172) = 131072
    default = MoEFFN(d, FFNConfig(type="moe", n_experts=4, top_k=1, n_shared_experts=1, multiple_of=4))
    assert default.shared_experts.down_proj.weight.shape == (d, default.d_ff)  # null: one routed width
    for bad in (dict(shared_d_ff=64), dict(n_shared_experts=1, shared_d_ff=0)):
        with pytest.raises(ValueError, match="shared_d_ff"):
            FFNConfig(type="moe", **bad)


# --- health ------------------------------------------------------------------------------------------------------

def test_health_of_collapsed_routing_with_capacity_dropping():
    E = 4
    moe = make_moe(D, n_experts=E, top_k=1, d_ff=32, capacity_factor=1.0, balancing="aux_free",
                   bias_update_rate=0.01).train()
    with torch.no_grad():
        moe.router.gate.weight.zero_()  # uniform probabilities: entropy log(E)
        moe.router.selection_bias.copy_(torch.tensor([100.0, 0, 0, 0]))  # every token picks expert 0
    moe(torch.randn(1, 8, D))  # capacity 1.0 · 1 · 8 / 4 = 2: 6 of 8 slots dropped
    moe.after_optimizer_step()
    h = moe.health()
    assert set(h) == {"moe_max_vio", "moe_drop_frac", "moe_router_entropy", "moe_bias_abs", "moe_active_ffn_params"}
    assert h["moe_max_vio"] == pytest.approx(E - 1)  # load (8, 0, 0, 0): max / mean − 1 = 3
    assert h["moe_drop_frac"] == pytest.approx(6 / 8)
    assert h["moe_router_entropy"] == pytest.approx(math.log(E), rel=1e-6)
    assert h["moe_bias_abs"] == pytest.approx((99.99 + 3 * 0.01) / 4, rel=1e-6)
    per_expert = moe.per_expert_params()
    assert h["moe_active_ffn_params"] == pytest.approx(D * E + per_expert * 2 / 8)
    moe.eval()
    moe(torch.randn(1, 8, D))  # evaluation does not count
    assert moe.health() == h
    window = moe.window_state()  # what a checkpoint keeps of the open logging window
    moe.reset_expert_load()
    assert moe.health()["moe_max_vio"] == 0.0 and moe.health()["moe_router_entropy"] == 0.0
    moe.load_window_state(window)
    assert moe.health() == h and moe.load_counts.sum() == 8


def test_health_of_dropless_routing_uses_every_active_parameter_and_counts_null_slots_as_free():
    moe = make_moe(D, std=0.2, n_experts=8, top_k=2, d_ff=32).train()
    moe(torch.randn(2, 8, D))
    moe.after_optimizer_step()
    h = moe.health()
    assert h["moe_drop_frac"] == 0.0 and h["moe_active_ffn_params"] == moe.active_params()
    assert 0 < h["moe_router_entropy"] < math.log(8) and h["moe_max_vio"] >= 0
    nulls = make_moe(D, n_experts=2, n_null_experts=2, top_k=1, d_ff=32).train()
    axis_router(nulls)
    nulls(tokens_on_axes([[0, 2, 3, 3]]))  # one real slot of four
    assert nulls.health()["moe_active_ffn_params"] == pytest.approx(D * 4 + nulls.per_expert_params() / 4)


def test_train_lines_carry_per_layer_health(tiny_data_cache, tmp_path):
    from pathlib import Path

    from train.config_load import load_config
    from train.runs import read_metrics
    from train.trainer import train

    root = Path(__file__).resolve().parents[1]
    train(load_config(root / "configs" / "tiny.yaml", [
        f"data.cache_dir={tiny_data_cache}", f"train.out_dir={tmp_path}", "model.ffn.type=moe", "model.ffn.n_experts=4",
        "model.ffn.balancing=seq_aux_loss", "model.ffn.aux_free_bias=true", "model.ffn.capacity_factor=1.0",
        "train.max_steps=4", "train.log_interval=2", "train.eval_interval=4", "train.ckpt_interval=4",
        "train.sample_max_new_tokens=2"]))
    lines = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["type"] == "train"]
    assert len(lines) == 2
    for rec in lines:
        assert rec["seq_aux_loss"] > 0 and "aux_loss" not in rec
        for name in ("moe_max_vio", "moe_drop_frac", "moe_router_entropy", "moe_bias_abs", "moe_active_ffn_params"):
            assert len(rec[name]) == 2 and all(v >= 0 for v in rec[name]), name
        assert all(v > 0 for v in rec["moe_bias_abs"]) and all(0 < v < math.log(4) for v in rec["moe_router_entropy"])
