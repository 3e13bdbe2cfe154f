"""MiniMind model: shapes, causality, KV-cache generation, every FFN variant, parameter matching and accounting."""
import dataclasses
import math

import pytest
import torch

from model.config import FFNConfig, MiniMindConfig
from model.model_minimind import MiniMindForCausalLM

V, D, L, T = 256, 64, 2, 32


def tiny_config(**ffn) -> MiniMindConfig:
    return MiniMindConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
                          num_key_value_heads=2, max_seq_len=T, ffn=FFNConfig(**ffn))


def tiny_model(seed=0, **ffn) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(tiny_config(**ffn)).eval()


VARIANTS = {
    **{f"dense-{a}": dict(type="dense", activation=a) for a in ("relu", "gelu", "gelu_tanh", "silu", "relu2",
                                                                "identity")},
    **{f"glu-{a}": dict(type="glu", activation=a) for a in ("silu", "gelu", "relu", "sigmoid", "identity")},
    "moe-softmax-aux": dict(type="moe", n_experts=4, top_k=2),
    "moe-sigmoid-auxfree-shared": dict(type="moe", n_experts=4, top_k=2, router_scoring="sigmoid",
                                       balancing="aux_free", n_shared_experts=1),
    "moe-top1-none-dense": dict(type="moe", n_experts=4, top_k=1, balancing="none", expert_type="dense",
                                expert_activation="relu"),
    "moe-top1-shared-z0": dict(type="moe", n_experts=4, top_k=1, n_shared_experts=1, z_loss_coef=0.0),
    "none": dict(type="none"),
}


def test_shapes_and_loss():
    model = tiny_model()
    x = torch.randint(0, V, (3, T))
    y = torch.randint(0, V, (3, T))
    y[0, :5] = -100
    out = model(x, y, return_logits=True)
    assert model(x, y).logits is None  # the chunked loss does not build the (tokens × vocab) logits
    assert out.logits.shape == (3, T, V)
    assert out.loss.shape == () and out.aux_loss.item() == 0.0 and out.aux_losses == {}
    keep = y.flatten() != -100
    expected = -out.logits.flatten(0, 1)[keep].log_softmax(-1).gather(1, y.flatten()[keep, None]).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert model(x).loss is None
    assert out.loss.item() == pytest.approx(math.log(V), abs=0.1)  # small init: near-uniform predictions


@pytest.mark.parametrize("ffn", [dict(type="glu"), dict(type="moe", n_experts=4, top_k=2)])
def test_causality(ffn):
    model = tiny_model(**ffn)
    x = torch.randint(0, V, (2, T))
    for t in (0, 10, T - 2):
        x2 = x.clone()
        x2[:, t + 1] = (x2[:, t + 1] + 1) % V
        a, b = model(x).logits, model(x2).logits
        torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], atol=1e-5, rtol=1e-5)
        assert (a[:, t + 1] - b[:, t + 1]).abs().max() > 1e-4


def naive_greedy(model, ids, n):
    """Full recomputation for every new token, context cropped to max_seq_len (nanoGPT)."""
    logits = []
    for _ in range(n):
        step = model(ids[:, -model.config.max_seq_len:]).logits[:, -1]
        logits.append(step)
        ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
    return ids, torch.stack(logits, 1)


@pytest.mark.parametrize("ffn", [dict(type="glu"), dict(type="moe", n_experts=4, top_k=2)])
def test_kv_cache_generation_equals_full_recomputation(ffn):
    model = tiny_model(**ffn)
    prompt = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        expected, expected_logits = naive_greedy(model, prompt, 40)  # runs past max_seq_len=32: cropping kicks in
    assert torch.equal(model.generate(prompt, 40, greedy=True), expected)
    # logits of the cached path, step by step, against the full forward
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache, ids, cached_logits = out.past_key_values, prompt, [out.logits[:, -1]]
        for t in range(10):
            ids = torch.cat([ids, expected[:, 5 + t:6 + t]], dim=1)
            out = model(ids[:, -1:], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            cached_logits.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(cached_logits, 1), expected_logits[:, :11], atol=1e-4, rtol=1e-4)


def test_prefill_with_cache_in_chunks_matches_full_forward():
    model = tiny_model()
    x = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        full = model(x).logits
        first = model(x[:, :12], use_cache=True)
        second = model(x[:, 12:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, atol=1e-5, rtol=1e-5)


def test_sampling_options_and_eos():
    model = tiny_model()
    prompt = torch.randint(0, V, (2, 4))
    greedy = model.generate(prompt, 8, greedy=True)
    assert greedy.shape == (2, 12) and torch.equal(greedy[:, :4], prompt)
    assert torch.equal(model.generate(prompt, 8, top_k=1), greedy)  # top-k 1 is greedy
    assert torch.equal(model.generate(prompt, 8, temperature=0.0), greedy)
    assert torch.equal(model.generate(prompt, 8, top_p=1e-6), greedy)  # nucleus of one token
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(model.generate(prompt, 8, temperature=1.5, top_k=50, top_p=0.9, generator=g1),
                       model.generate(prompt, 8, temperature=1.5, top_k=50, top_p=0.9, generator=g2))
    eos = int(greedy[0, 6])  # a row-0 greedy token becomes "EOS": row 0 stops at its first occurrence
    stop = 4 + greedy[0, 4:].tolist().index(eos)
    out = model.generate(prompt, 8, greedy=True, eos_token_id=eos)
    assert torch.equal(out[0, :stop + 1], greedy[0, :stop + 1]) and (out[0, stop:] == eos).all()
    stream = list(model.generate_stream(prompt[:1], 8, greedy=True, eos_token_id=eos))
    assert stream == greedy[0, 4:stop + 1].tolist()
    with pytest.raises(ValueError):
        model.generate(prompt, 2, top_p=0.0)
    assert not model.training


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_backward_every_variant(name):
    model = tiny_model(**VARIANTS[name]).train()
    x = torch.randint(0, V, (2, T))
    out = model(x, torch.roll(x, -1, 1))
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)
    (out.loss + out.aux_loss).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert model.model.layers[0].attn.qkv_proj.weight.grad.abs().sum() > 0
    if name != "none":
        assert any(n.startswith("model.layers.0.ffn.") and p.grad.abs().sum() > 0 for n, p in model.named_parameters())
    else:
        assert model.model.layers[0].ffn is None and model.param_counts()["ffn"] == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the CPU training path
        out = model(x, torch.roll(x, -1, 1), return_logits=True)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_param_matching_at_default_sizing():
    totals = {name: tiny_model(**ffn).param_counts()["total"] for name, ffn in {
        "relu": dict(type="dense", activation="relu"), "gelu": dict(type="dense", activation="gelu"),
        "relu2": dict(type="dense", activation="relu2"), "swiglu": dict(type="glu", activation="silu"),
        "geglu": dict(type="glu", activation="gelu"), "reglu": dict(type="glu", activation="relu"),
        "bilinear": dict(type="glu", activation="identity")}.items()}
    assert max(totals.values()) / min(totals.values()) - 1 < 0.01, totals
    dense = tiny_model(type="dense", activation="relu").param_counts()
    for moe in (dict(n_experts=8, top_k=2), dict(n_experts=4, top_k=1), dict(n_experts=8, top_k=2, n_shared_experts=1),
                dict(n_experts=8, top_k=1, expert_type="dense", expert_activation="relu")):
        counts = tiny_model(type="moe", **moe).param_counts()
        assert abs(counts["active"] / dense["active"] - 1) < 0.01, (moe, counts)
        assert counts["total"] > counts["active"]


def test_param_counts_and_flops_by_hand():
    F_, H, G, C = 100, 4, 2, D // 4
    model = tiny_model(type="dense", activation="relu", d_ff=F_)
    attention = L * (D * (H + 2 * G) * C + H * C * D)
    ffn = L * 2 * D * F_
    norms = L * 2 * D + D
    total = V * D + attention + ffn + norms
    counts = model.param_counts()
    assert counts == dict(total=total, active=total, non_embedding=total - V * D, embedding=V * D, ffn=ffn,
                          ffn_active=ffn, attention=attention)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.flops_per_token() == 6 * total + 12 * L * D * T
    assert model.flops_per_token(seq_len=8) == 6 * total + 12 * L * D * 8
    assert model.ffn_share() == pytest.approx(dict(params=ffn / total, flops=6 * ffn / (6 * total + 12 * L * D * T)))

    moe = tiny_model(type="moe", n_experts=4, top_k=1, n_shared_experts=1, d_ff=F_, expert_type="dense")
    expert, router = 2 * D * F_, D * 4
    counts = moe.param_counts()
    assert counts["ffn"] == L * (4 * expert + expert + router)
    assert counts["ffn_active"] == L * (1 * expert + expert + router)
    assert counts["active"] == total - ffn + L * (2 * expert + router)
    assert tiny_model(type="none").ffn_share() == dict(params=0.0, flops=0.0)

    untied = MiniMindForCausalLM(dataclasses.replace(tiny_config(type="dense", d_ff=F_), tie_word_embeddings=False))
    assert untied.param_counts()["total"] == total + V * D
    assert untied.flops_per_token() == 6 * total + 12 * L * D * T  # the input lookup is not a matmul


def test_init_scales_residual_projections():
    cfg = dataclasses.replace(tiny_config(type="glu"), num_hidden_layers=8, hidden_size=128, init_std=0.02)
    model = MiniMindForCausalLM(cfg)
    layer = model.model.layers[0]
    assert layer.attn.qkv_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert layer.ffn.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.equal(layer.attn_norm.weight, torch.ones(128))
    moe = MiniMindForCausalLM(dataclasses.replace(cfg, ffn=FFNConfig(type="moe"))).model.layers[0].ffn
    assert moe.experts.w_down.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert moe.experts.w_up.std().item() == pytest.approx(0.02, rel=0.05)


def test_dropout_only_in_training():
    model = MiniMindForCausalLM(dataclasses.replace(tiny_config(), dropout=0.2))
    x = torch.randint(0, V, (2, 16))
    model.train()
    assert not torch.equal(model(x).logits, model(x).logits)
    model.eval()
    assert torch.equal(model(x).logits, model(x).logits)


def test_vocab_size_must_be_set_and_length_checked():
    with pytest.raises(ValueError, match="vocab_size"):
        MiniMindForCausalLM(dataclasses.replace(tiny_config(), vocab_size=None))
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model()(torch.zeros(1, T + 1, dtype=torch.long))


def test_moe_model_observability():
    model = tiny_model(type="moe", n_experts=4, top_k=2, balancing="aux_free").train()
    x = torch.randint(0, V, (2, T))
    out = model(x, x)
    assert set(out.aux_losses) == {"aux_loss", "z_loss"} and all(isinstance(v, float) for v in out.aux_losses.values())
    load = model.expert_load()
    assert len(load) == L and all(len(l) == 4 and sum(l) == pytest.approx(1.0) for l in load)
    for module in model.modules():  # what the trainer does after every optimizer step
        if hasattr(module, "after_optimizer_step"):
            module.after_optimizer_step()
    assert all(m.router.selection_bias.abs().sum() > 0 for m in model.moe_layers())
    assert any(getattr(m, "may_skip_params", False) for m in model.modules())  # DDP: find_unused_parameters
    model.reset_expert_load()
    assert model.expert_load() == [[0.0] * 4] * L
    assert "router.selection_bias" in " ".join(model.state_dict())  # saved with checkpoints


def test_dense_models_have_no_moe_bookkeeping():
    model = tiny_model(type="glu")
    assert model.moe_layers() == [] and model.expert_load() == []
    assert not any(hasattr(m, "after_optimizer_step") or getattr(m, "may_skip_params", False)
                   for m in model.modules() if m is not model)  # the model's own hook only fans out


@pytest.mark.parametrize("name", VARIANTS)
def test_built_width_is_the_class_width_rule(name):
    from model.registry import ffn_class

    cfg = tiny_config(**VARIANTS[name])
    ffn = MiniMindForCausalLM(cfg).model.layers[0].ffn
    width = ffn_class(cfg.ffn.type).width(cfg.ffn, D)
    if name == "none":
        assert ffn is None and width == 0
    else:
        built = ffn.experts.d_ff if hasattr(ffn, "experts") else ffn.down_proj.weight.shape[1]
        assert built == width > 0
