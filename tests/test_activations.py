"""Issue 15's activations: xIELU, PolyReLU, PolyNorm (trainable: learned scalars per layer), gpt-oss's clamped SwiGLU
and LeakyReLU(0.5)². Values against hand computations, gradients and no weight decay on the learned scalars,
parameter match with dense GELU, export refusals, a short training run."""
import math
from pathlib import Path
from typing import get_args

import pytest
import torch

from model.activations import (ACTIVATIONS, GLU_ACTIVATIONS, NO_HF_EQUIVALENT, TRAINABLE_ACTIVATIONS, XIELU, PolyNorm,
                               PolyReLU, clamped_swiglu, leaky_relu2, make_activation)
from model.config import Activation, FFNConfig, MiniMindConfig
from model.counting import meta_counts
from model.ffn import DenseFFN, GLUFFN
from model.model_minimind import MiniMindForCausalLM
from train.config import TrainConfig
from train.config_load import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

# every new variant, as (type, activation)
NEW = [("dense", "xielu"), ("dense", "polyrelu"), ("dense", "polynorm"), ("dense", "leaky_relu2"),
       ("glu", "swiglu_oss"), ("glu", "xielu"), ("glu", "polynorm")]
TRAINABLE = [(t, a) for t, a in NEW if a in TRAINABLE_ACTIVATIONS]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def model_of(ffn_type: str, activation: str, hidden: int = 64, layers: int = 2) -> MiniMindForCausalLM:
    return MiniMindForCausalLM(MiniMindConfig(vocab_size=96, hidden_size=hidden, num_hidden_layers=layers,
                                              num_attention_heads=4, num_key_value_heads=2, max_seq_len=16,
                                              ffn=FFNConfig(type=ffn_type, activation=activation)))


def values(fn, xs, **kw) -> list[float]:
    with torch.no_grad():
        return fn(torch.tensor(xs, dtype=torch.float64), **kw).tolist()


# --- values against hand computations -------------------------------------------------------------------------------
def test_xielu_at_init_both_branches():
    act = XIELU().double()
    with torch.no_grad():  # the scalars are stored in fp32: 0.8 to ~1e-8
        ap = torch.nn.functional.softplus(act.alpha_p).item()
        an = 0.5 + torch.nn.functional.softplus(act.alpha_n).item()
    assert ap == pytest.approx(0.8, abs=1e-7) and an == pytest.approx(0.8, abs=1e-7)

    def hand(x, beta=0.5, eps=-1e-6):
        if x > 0:
            return ap * x * x + beta * x
        return an * (math.expm1(min(x, eps)) - x) + beta * x

    xs = [3.0, 0.5, 1e-3, 0.0, -1e-3, -0.5, -1.0, -4.0, -30.0]
    assert values(act, xs) == pytest.approx([hand(x) for x in xs], abs=1e-12)
    # the numbers themselves: 0.8·9 + 1.5; 0.8·(e⁻¹ − 1 + 1) − 0.5; 0.8·(e⁻⁴ + 3) − 2
    assert values(act, [3.0, -1.0, -4.0]) == pytest.approx([8.7, 0.8 * math.exp(-1) - 0.5,
                                                             0.8 * (math.exp(-4) + 3) - 2], abs=1e-6)


def test_xielu_matches_transformers():
    activations = pytest.importorskip("transformers.activations")
    ref = activations.XIELUActivation(dtype=torch.float32)
    ours = XIELU()
    for name in ("alpha_p", "alpha_n"):  # the same init (to an ulp: they invert softplus in fp32, we in fp64)
        assert getattr(ours, name).shape == (1,)
        assert torch.allclose(getattr(ref, name).detach(), getattr(ours, name).detach(), rtol=1e-6, atol=0)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4
    with torch.no_grad():
        ref.alpha_p.fill_(0.3), ref.alpha_n.fill_(-0.7), ours.alpha_p.fill_(0.3), ours.alpha_n.fill_(-0.7)
        assert torch.allclose(ref._xielu_python(x), ours(x), rtol=1e-6, atol=1e-6)


def test_polyrelu_with_given_coefficients_and_at_init():
    act = PolyReLU().double()
    xs = [-2.0, 0.0, 0.5, 2.0]
    # at init (a_i = 1/3 stored in fp32)
    assert values(act, xs) == pytest.approx([0.0, 0.0, (0.125 + 0.25 + 0.5) / 3, (8 + 4 + 2) / 3], rel=1e-7)
    with torch.no_grad():
        act.weight.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))  # a_3, a_2, a_1
        act.bias.fill_(0.25)  # a_0
    hand = [0.25 + (2 * max(x, 0) - max(x, 0) ** 2 + 0.5 * max(x, 0) ** 3) for x in xs]
    assert values(act, xs) == pytest.approx(hand, abs=1e-12)


def test_polynorm_with_given_coefficients():
    act = PolyNorm().double()
    with torch.no_grad():
        act.weight.copy_(torch.tensor([0.2, -0.7, 1.5], dtype=torch.float64))  # a_3, a_2, a_1
        act.bias.fill_(-0.1)  # a_0
    rows = [[1.0, -2.0, 0.5, 3.0], [0.1, 0.2, -0.3, 0.0]]

    def norm(u):  # over the row (the FFN's inner dimension)
        rms = math.sqrt(sum(v * v for v in u) / len(u) + 1e-6)
        return [v / rms for v in u]

    for row in rows:
        n1, n2, n3 = norm(row), norm([v ** 2 for v in row]), norm([v ** 3 for v in row])
        hand = [1.5 * a + -0.7 * b + 0.2 * c - 0.1 for a, b, c in zip(n1, n2, n3)]
        assert values(act, row) == pytest.approx(hand, abs=1e-12)
    default = PolyNorm()
    assert default.weight.tolist() == pytest.approx([1 / 3] * 3) and default.bias.tolist() == [0.0]


def test_clamped_swiglu_hits_both_clamps():
    gate = [10.0, 3.0, -2.0, -20.0, 7.5]
    up = [9.0, -8.0, 0.5, 2.0, -0.25]

    def hand(g, u):
        g, u = min(g, 7.0), max(-7.0, min(u, 7.0))
        return (u + 1) * g / (1 + math.exp(-1.702 * g))

    with torch.no_grad():
        got = clamped_swiglu(torch.tensor(gate, dtype=torch.float64), torch.tensor(up, dtype=torch.float64))
    assert got.tolist() == pytest.approx([hand(g, u) for g, u in zip(gate, up)], abs=1e-12)
    assert got[0].item() == pytest.approx(8 * 7 / (1 + math.exp(-1.702 * 7)), abs=1e-12)  # gate 10→7, up 9→7
    assert got[1].item() == pytest.approx(-6 * 3 / (1 + math.exp(-1.702 * 3)), abs=1e-12)  # up -8→-7


def test_clamped_swiglu_block_is_gpt_oss_with_interleaved_columns():
    """Our fused gate_up is chunked (gate rows first), gpt-oss's interleaved: the same parameters, re-laid out."""
    modeling = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    torch.manual_seed(0)
    block = GLUFFN(16, 8, "swiglu_oss")
    x = torch.randn(5, 16) * 8
    gate_FD, up_FD = block.gate_up_proj.weight.detach().chunk(2, dim=0)
    interleaved_DU = torch.stack([gate_FD, up_FD], dim=1).reshape(16, 16).T  # columns g0, u0, g1, u1, ...
    config = modeling.GptOssConfig(hidden_size=16, intermediate_size=8, num_local_experts=1)
    experts = modeling.GptOssExperts(config)
    with torch.no_grad():
        want = experts._apply_gate(x @ interleaved_DU) @ block.down_proj.weight.T
        assert torch.allclose(block(x), want, rtol=1e-6, atol=1e-6)


def test_leaky_relu2():
    assert values(leaky_relu2, [-2.0, -0.5, 0.0, 1.5]) == pytest.approx([1.0, 0.0625, 0.0, 2.25], abs=1e-15)
    assert ACTIVATIONS["leaky_relu2"] is leaky_relu2


@pytest.mark.parametrize("name", sorted(TRAINABLE_ACTIVATIONS))
def test_hand_written_backward_passes_gradcheck(name):
    torch.manual_seed(0)
    act = make_activation(name).double()
    with torch.no_grad():  # away from the init, so every coefficient matters
        for p in act.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = (torch.randn(6, 10, dtype=torch.float64) * 2).requires_grad_()
    params = list(act.parameters())
    assert torch.autograd.gradcheck(act, (x,))
    # the learned scalars' gradients through the module (softplus included) against central differences
    out = act(x)
    grads = torch.autograd.grad(out, params, torch.ones_like(out))
    for p, grad in zip(params, grads):
        for k in range(p.numel()):
            with torch.no_grad():
                base = p.detach().clone()
                p.view(-1)[k] += 1e-6
                up = act(x).sum()
                p.view(-1)[k] -= 2e-6
                down = act(x).sum()
                p.copy_(base)
            assert grad.view(-1)[k].item() == pytest.approx(((up - down) / 2e-6).item(), rel=1e-5, abs=1e-6)


def test_xielu_gradients_match_transformers_autograd():
    activations = pytest.importorskip("transformers.activations")
    ref, ours = activations.XIELUActivation(dtype=torch.float64), XIELU().double()
    with torch.no_grad():
        ref.alpha_p.copy_(ours.alpha_p)
        ref.alpha_n.copy_(ours.alpha_n)
    x = torch.randn(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    g = torch.randn(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want = torch.autograd.grad(ref._xielu_python(x.requires_grad_()), (x, ref.alpha_p, ref.alpha_n), g)
    got = torch.autograd.grad(ours(x), (x, ours.alpha_p, ours.alpha_n), g)
    for w, o in zip(want, got):
        assert torch.allclose(w, o, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(TRAINABLE_ACTIVATIONS))
def test_trainable_activations_keep_half_precision(name):
    """(1,)-shaped fp32 scalars would promote a bf16 activation tensor to fp32; the backward keeps the dtypes too."""
    act = make_activation(name)
    x = torch.randn(4, 32).bfloat16().requires_grad_()
    y = act(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in act.parameters())


def test_existing_blocks_keep_their_functions():
    assert DenseFFN(8, 32, "gelu").act is ACTIVATIONS["gelu"] and GLUFFN(8, 21, "silu").act is ACTIVATIONS["silu"]
    assert len(list(DenseFFN(8, 32, "relu2").parameters())) == 2  # up, down: no activation parameters
    a, b = DenseFFN(8, 32, "xielu"), DenseFFN(8, 32, "xielu")
    assert a.act is not b.act  # one set of scalars per layer


# --- the learned scalars: gradients, no weight decay, counted -------------------------------------------------------
@pytest.mark.parametrize("ffn_type, activation", TRAINABLE)
def test_gradients_reach_the_learned_scalars(ffn_type, activation):
    torch.manual_seed(0)
    model = model_of(ffn_type, activation)
    ids = torch.randint(0, 96, (2, 16))
    model(ids, ids.roll(-1, 1)).loss.backward()
    scalars = [(n, p) for n, p in model.named_parameters() if ".act." in n]
    assert len(scalars) == 4  # 2 layers × (alpha_p, alpha_n | weight, bias)
    for name, p in scalars:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # muon: the scalars go to its AdamW part
@pytest.mark.parametrize("ffn_type, activation", TRAINABLE)
def test_learned_scalars_get_no_weight_decay(ffn_type, activation, optimizer):
    from train.optim import build_optimizer

    model = model_of(ffn_type, activation)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1, optimizer=optimizer))
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    scalars = {n: p for n, p in model.named_parameters() if ".act." in n}
    assert scalars and all(p.ndim < 2 for p in scalars.values())
    assert all(decay_of[id(p)] == 0.0 for p in scalars.values())
    assert decay_of[id(model.model.layers[0].ffn.down_proj.weight)] == 0.1  # the matrices still decay


@pytest.mark.parametrize("hidden", [64, 128])
@pytest.mark.parametrize("ffn_type, activation", NEW)
def test_parameter_match_with_dense_gelu(ffn_type, activation, hidden):
    def counts(t, a):
        return meta_counts(MiniMindConfig(vocab_size=2048, hidden_size=hidden, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, max_seq_len=128,
                                          ffn=FFNConfig(type=t, activation=a)))[0]

    ours, gelu = counts(ffn_type, activation), counts("dense", "gelu")
    assert abs(ours["total"] / gelu["total"] - 1) < 0.01
    assert abs(ours["ffn"] / gelu["ffn"] - 1) < 0.01
    extra = 4 * TRAINABLE_ACTIVATIONS[activation].n_params if activation in TRAINABLE_ACTIVATIONS else 0
    matrices = {"dense": 2, "glu": 3}[ffn_type]
    d_ff = {"dense": 4 * hidden, "glu": round(8 * hidden / 3)}[ffn_type]
    assert ours["ffn"] == 4 * matrices * hidden * d_ff + extra  # the scalars are counted


def test_shipped_sweep_is_matched_within_one_percent(tmp_path):
    from train.plan import plan_sweep

    plan = plan_sweep(ROOT / "configs" / "compare" / "activations-2025.yaml", out_dir=str(tmp_path / "runs"))
    assert {(i.cfg.model.ffn.type, i.cfg.model.ffn.activation) for i in plan.variants.values()} >= \
        {(t, a) for t, a in NEW if (t, a) not in {("glu", "xielu"), ("glu", "polynorm")}}
    for name, info in plan.variants.items():
        assert info.matched and abs(info.rel_diff or 0.0) <= 0.01, name


# --- config, export, MoE --------------------------------------------------------------------------------------------
def test_config_keys_and_refusals():
    assert load_config(TINY, ["model.ffn.type=dense", "model.ffn.activation=xielu"]).run_name == "dense-xielu-s0"
    assert load_config(TINY, ["model.ffn.type=glu", "model.ffn.activation=swiglu_oss"]).run_name \
        == "glu-swiglu_oss-s0"
    with pytest.raises(ValueError, match="model.ffn.activation 'swiglu_oss' is not valid for a dense FFN"):
        FFNConfig(type="dense", activation="swiglu_oss")  # a gate-and-up function needs the GLU block
    for trainable in TRAINABLE_ACTIVATIONS:  # one set of scalars per expert is not implemented: refused
        with pytest.raises(ValueError, match=f"model.ffn.expert_activation '{trainable}' is not valid"):
            FFNConfig(type="moe", n_experts=4, expert_activation=trainable)
    with pytest.raises(ValueError, match="model.ffn.expert_activation 'swiglu_oss' is not valid"):
        FFNConfig(type="moe", n_experts=4, expert_activation="swiglu_oss")
    assert set(GLU_ACTIVATIONS) == {"swiglu_oss"}


def test_every_activation_is_a_config_choice_and_exports_or_says_why_not():
    from train.export_hf import HF_ACTIVATIONS

    names = {*ACTIVATIONS, *TRAINABLE_ACTIVATIONS, *GLU_ACTIVATIONS}
    assert set(get_args(Activation)) == names
    assert not set(HF_ACTIVATIONS) & set(NO_HF_EQUIVALENT) and names == set(HF_ACTIVATIONS) | set(NO_HF_EQUIVALENT)


@pytest.mark.parametrize("ffn_type, activation, why", [
    ("dense", "xielu", "Apertus, always applies q/k RMSNorm"),
    ("glu", "xielu", "Apertus"),
    ("dense", "polyrelu", "no PolyReLU"),
    ("dense", "polynorm", "no PolyNorm"),
    ("glu", "polynorm", "no PolyNorm"),
    ("dense", "leaky_relu2", "no squared leaky ReLU"),
    ("glu", "leaky_relu2", "no squared leaky ReLU"),
    ("glu", "swiglu_oss", "only inside GptOssExperts"),
])
def test_export_refuses_with_the_reason(ffn_type, activation, why):
    from train.export_hf import ExportError, hf_architecture

    with pytest.raises(ExportError, match=f"model.ffn.activation={activation} .*no exact transformers equivalent.*"
                                          f"{why}"):
        hf_architecture(model_of(ffn_type, activation))


# --- a short real run ------------------------------------------------------------------------------------------------
def test_three_training_steps_move_the_learned_scalars(tiny_data_cache, tmp_path):
    from safetensors.torch import load_file

    from train.trainer import train

    run = tmp_path / "run"
    cfg = load_config(TINY, ["model.ffn.type=dense", "model.ffn.activation=xielu", f"data.cache_dir={tiny_data_cache}",
                             "train.max_steps=3", f"train.out_dir={run}", "wandb.mode=disabled",
                             "train.log_interval=1", "train.eval_interval=3", "train.ckpt_interval=3"])
    result = train(cfg)
    assert result["step"] == 3 and math.isfinite(result["val_loss"])
    weights = load_file(str(run / "model.safetensors"))
    init = XIELU()
    for layer in range(cfg.model.num_hidden_layers):
        for name in ("alpha_p", "alpha_n"):
            saved = weights[f"model.layers.{layer}.ffn.act.{name}"]
            assert saved.shape == (1,) and not torch.equal(saved, getattr(init, name).detach())
