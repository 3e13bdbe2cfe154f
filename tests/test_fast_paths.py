"""The optimised code paths against plain reference implementations, in fp32: outputs AND gradients.

- MoE: grouped-matmul dispatch and the split-per-expert loop vs a naive per-token loop with autograd
  (tests/moe_reference.py).
- AdamW: the fused implementation that build_optimizer picks vs torch's plain for-loop AdamW.
- torch.compile (train.compile): the compiled model (whole, or per block) vs the same weights in eager mode.
- The hand-written backward passes (model/fused_ops.py: RMSNorm, GLU product; QKVRope) vs autograd through the
  plain ops, and the norms that hand bf16 to matmul-only consumers vs norms that emit fp32.
- The column-split bf16 matmul (model/split_matmul.py) vs F.linear under autocast.
"""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from model.config import FFNConfig, MiniMindConfig
from model.fused_ops import glu_product, has_fused_glu, rms_norm
from model.model_minimind import MiniMindForCausalLM, folded_gqa_attention
from model.rope import QKVRope, rope_cos_sin
from model.split_matmul import column_blocks, split_applies, split_linear
from moe_reference import make_moe, naive_moe, use_path
from train.compiler import compile_for_training, resolve_compile
from train.optim import build_optimizer


def _grads(module, x, out_fn, probe):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = out_fn(x)
    (out * probe).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


MOE_CASES = {
    "glu-8x2": dict(n_experts=8, top_k=2, expert_type="glu"),
    "glu-4x1": dict(n_experts=4, top_k=1, expert_type="glu"),
    "relu-4x2-shared": dict(n_experts=4, top_k=2, expert_type="dense", expert_activation="relu", n_shared_experts=1),
}


@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_dispatch_paths_match_naive_reference_with_gradients(case, monkeypatch):
    moe = make_moe(32, std=0.3, d_ff=16, **MOE_CASES[case]).train()
    x_BTD = torch.randn(2, 12, 32)
    probe = torch.randn(2, 12, 32)
    ref_out, ref_dx, ref_dp = _grads(moe, x_BTD.view(-1, 32), lambda x: naive_moe(moe, x), probe.view(-1, 32))
    assert set(ref_dp) == {n for n, _ in moe.named_parameters()}  # the router and every expert weight get gradients
    for mode in ("grouped", "loop"):
        use_path(monkeypatch, mode)
        assert moe.experts.grouped_mm_ok(x_BTD) == (mode == "grouped")
        out, dx, dp = _grads(moe, x_BTD, moe, probe)
        torch.testing.assert_close(out.view(-1, 32), ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dx.view(-1, 32), ref_dx, atol=1e-5, rtol=1e-5)
        for name, g in ref_dp.items():
            torch.testing.assert_close(dp[name], g, atol=1e-5, rtol=1e-5, msg=f"{mode}: d{name}")


def test_moe_forward_has_no_dense_all_experts_compute():
    """Each routed expert GEMM sees only its own tokens: N·K rows in total, not N·E."""
    moe = make_moe(32, n_experts=8, top_k=2, d_ff=16)
    rows_seen = []
    grouped_mm, loop = moe.experts._forward_grouped, moe.experts._forward_loop
    moe.experts._forward_grouped = lambda x, c: (rows_seen.append(x.shape[0]), grouped_mm(x, c))[1]
    moe.experts._forward_loop = lambda x, c: (rows_seen.append(x.shape[0]), loop(x, c))[1]
    moe(torch.randn(3, 10, 32))
    assert rows_seen == [3 * 10 * 2]


def test_fused_adamw_matches_plain_adamw():
    torch.manual_seed(0)
    cfg = MiniMindConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_seq_len=16, ffn=FFNConfig(type="glu"))
    model = MiniMindForCausalLM(cfg)
    reference = copy.deepcopy(model)
    initial = model.lm_head.weight.detach().clone()
    t = SimpleNamespace(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, decay_embeddings=False, optimizer="adamw")
    fast = build_optimizer(model, t)
    assert all(group["fused"] for group in fast.param_groups)  # the fast path is what the trainer gets
    plain = build_optimizer(reference, t)
    for group in plain.param_groups:
        group["fused"], group["foreach"] = False, False
    x = torch.randint(0, 64, (2, 16))
    for _ in range(3):
        for m, opt in ((model, fast), (reference, plain)):
            opt.zero_grad()
            m(x, torch.roll(x, -1, 1)).loss.backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    assert (model.lm_head.weight - initial).abs().max() > 1e-3  # it did train


@pytest.mark.parametrize("ffn,mode", [(dict(type="glu"), "model"), (dict(type="moe", n_experts=4, top_k=2), "model"),
                                      (dict(type="glu"), "blocks")], ids=["swiglu-model", "moe-4x2-model", "swiglu-blocks"])
def test_compiled_model_matches_eager_with_gradients(ffn, mode):
    """What train.compile runs (torch.compile's default inductor backend, the whole model or every block) against
    eager: loss, logits, every grad."""
    torch.manual_seed(0)
    cfg = MiniMindConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_seq_len=16, ffn=FFNConfig(**ffn))
    eager = MiniMindForCausalLM(cfg).train()
    compiled_copy = copy.deepcopy(eager)
    compiled = compile_for_training(compiled_copy, compiled_copy, mode)
    if mode == "blocks":  # compiled in place: the names checkpoints use are unchanged
        assert compiled is compiled_copy and list(compiled.state_dict()) == list(eager.state_dict())
    x = torch.randint(0, 64, (2, 16))
    results = []
    for module, params in ((eager, eager), (compiled, compiled_copy)):
        with torch.profiler.profile() as prof:
            out = module(x, torch.roll(x, -1, 1), return_logits=True)
            (out.loss + out.aux_loss).backward()
        results.append((out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in params.named_parameters()}))
        hand_written = {e.name for e in prof.events()} & {"QKVRope", "QKVRopeBackward", "_GLUProduct",
                                                          "_GLUProductBackward"}
        # eager runs the hand-written backward passes; compiled code leaves the plain ops to inductor to fuse
        assert bool(hand_written) == (module is eager), hand_written
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = results
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert set(grads) == set(ref_grads) and all(g is not None for g in ref_grads.values())
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="this torch has no grouped_mm")
def test_compiled_bf16_moe_with_padded_groups_matches_eager():
    """The CPU training path of an MoE: bf16 autocast, expert groups padded to 32 rows, compiled vs eager."""
    torch.manual_seed(0)
    cfg = MiniMindConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_seq_len=16,
                         ffn=FFNConfig(type="moe", n_experts=4, top_k=2, d_ff=32))
    eager = MiniMindForCausalLM(cfg).train()
    compiled_copy = copy.deepcopy(eager)
    compiled = torch.compile(compiled_copy)
    assert eager.moe_layers()[0].pad_rows(torch.zeros(1, 32, dtype=torch.bfloat16)) == 32
    x = torch.randint(0, 64, (2, 16))
    results = []
    for module, params in ((eager, eager), (compiled, compiled_copy)):
        with torch.profiler.profile() as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = module(x, torch.roll(x, -1, 1))
                objective = out.loss + out.aux_loss
            objective.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in params.named_parameters()}))
        hand_written = {e.name for e in prof.events()} & {"_RMSNorm", "_RMSNormBackward", "QKVRope", "_GLUProduct"}
        if module is compiled:  # inductor fuses the plain ops instead of running the hand-written passes
            assert not hand_written, hand_written
        else:
            assert hand_written == {"_RMSNorm", "_RMSNormBackward", "QKVRope", "_GLUProduct"}
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
    for name, g in ref_grads.items():  # bf16: within 2% of each gradient's largest entry (measured: <= 1%)
        assert g.abs().max() > 0, name
        assert (grads[name] - g).abs().max() <= 2e-2 * g.abs().max(), name


def test_compile_setting_resolves_to_off_blocks_or_model(monkeypatch):
    import train.compiler as compiler
    assert [resolve_compile(v, 10) for v in (False, True, "blocks", "model")] == ["off", "blocks", "blocks", "model"]
    monkeypatch.setattr(compiler, "has_cxx_compiler", lambda: True)
    assert resolve_compile("auto", compiler.AUTO_MIN_STEPS - 1) == "off"  # too short for the compile time to pay
    assert resolve_compile("auto", compiler.AUTO_MIN_STEPS) == "blocks"
    monkeypatch.setattr(compiler, "has_cxx_compiler", lambda: False)
    assert resolve_compile("auto", 10 ** 6) == "off"  # inductor needs a C++ compiler on CPU
    with pytest.raises(ValueError, match="valid: false, true, auto, blocks, model"):
        resolve_compile("fast", 10)
    from train.config import TrainConfig
    assert TrainConfig().compile == "auto"  # the default: compiled where the run is long enough to pay for it


# --- hand-written backward passes (model/fused_ops.py, QKVRope) against autograd through the plain ops ------------

def _fwd_bwd(fn, inputs, probe):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, probe if isinstance(probe, tuple) else (probe,))
    return [o.detach() for o in outs], [t.grad for t in inputs]


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
def test_fused_rms_norm_forward_is_f_rms_norm_and_backward_its_derivative(out_dtype):
    torch.manual_seed(0)
    x, w = torch.randn(3, 20, 48) * 3, 1 + 0.2 * torch.randn(48)
    probe = torch.randn(3, 20, 48).to(out_dtype or torch.float32)
    (y,), (dx, dw) = _fwd_bwd(lambda x, w: rms_norm(x, w, 1e-5, out_dtype), (x, w), probe)
    (ref,), (ref_dx, ref_dw) = _fwd_bwd(lambda x, w: F.rms_norm(x, (48,), w, 1e-5), (x, w), probe.float())
    assert y.dtype == (out_dtype or torch.float32) and torch.equal(y, ref.to(y.dtype))  # same ops, same order
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6)  # same math, different rounding order
    torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-5)
    x64, w64 = x[:1, :4].double().requires_grad_(), w.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (x64, w64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", [F.silu, F.gelu], ids=["silu", "gelu"])
def test_glu_product_is_bit_identical_to_chunk_act_mul(act, dtype):
    assert has_fused_glu(act)
    torch.manual_seed(0)
    gate_up, probe = torch.randn(4, 10, 2 * 24).to(dtype), torch.randn(4, 10, 24).to(dtype)
    (h,), (dgu,) = _fwd_bwd(lambda gu: glu_product(gu, act), (gate_up,), probe)

    def plain(gu):
        gate, up = gu.chunk(2, dim=-1)
        return act(gate) * up
    (ref,), (ref_dgu,) = _fwd_bwd(plain, (gate_up,), probe)
    assert torch.equal(h, ref) and torch.equal(dgu, ref_dgu)
    assert torch.autograd.gradcheck(lambda gu: glu_product(gu, act), (gate_up[:1, :2].double().requires_grad_(),))


def _qkv_rope_and_textbook(dtype, compute=None):
    """QKVRope's (outputs, dqkv) and the textbook's (split + rotate_half + autograd), both on the same inputs and
    output gradients; the textbook computed in `compute` (default: dtype)."""
    torch.manual_seed(0)
    B, T, H, G, C = 2, 12, 4, 2, 16
    cos, sin_signed = rope_cos_sin(C, T, 1e4)
    sin = sin_signed * torch.cat([-torch.ones(C // 2), torch.ones(C // 2)])  # the textbook's unsigned sin
    qkv = torch.randn(B, T, (H + 2 * G) * C).to(dtype)
    probes = tuple(torch.randn(B, n, T, C).to(dtype) for n in (H, G, G))  # head-major, like the outputs
    compute = compute or dtype

    def textbook(qkv_BTX):  # LLaMA's rotate_half: x·cos + cat(-x2, x1)·sin
        q, k, v = qkv_BTX.split([H * C, G * C, G * C], dim=-1)
        c, s = cos.to(compute)[:, None], sin.to(compute)[:, None]

        def rot(x_BTNC):
            x1, x2 = x_BTNC.chunk(2, dim=-1)
            return (x_BTNC * c + torch.cat([-x2, x1], dim=-1) * s).transpose(1, 2)
        return rot(q.view(B, T, H, C)), rot(k.view(B, T, G, C)), v.view(B, T, G, C).transpose(1, 2)
    fused = _fwd_bwd(lambda t: QKVRope.apply(t, cos.to(dtype), sin_signed.to(dtype), H, G), (qkv,), probes)
    reference = _fwd_bwd(textbook, (qkv.to(compute),), tuple(p.to(compute) for p in probes))
    return fused, reference, (B, H, G, T, C)


def test_qkv_rope_in_fp32_is_bit_identical_to_split_and_textbook_rope():
    (outs, (dqkv,)), (ref_outs, (ref_dqkv,)), _ = _qkv_rope_and_textbook(torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(outs, ref_outs)) and torch.equal(dqkv, ref_dqkv)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qkv_rope_in_low_precision_rounds_once_less_than_the_textbook_and_is_head_major(dtype):
    """bf16/fp16 rotate with one mul and one addcmul per half (the product added before rounding): against the
    textbook computed in fp64, its error is no larger than the textbook's own in that dtype. The queries come out
    head-major, so the folded attention's (B, G, R·T, C) query is a view, not a copy."""
    (outs, (dqkv,)), (low_outs, (low_dqkv,)), (B, H, G, T, C) = _qkv_rope_and_textbook(dtype)
    _, (exact_outs, (exact_dqkv,)), _ = _qkv_rope_and_textbook(dtype, compute=torch.float64)
    for ours, textbook, exact in zip((*outs, dqkv), (*low_outs, low_dqkv), (*exact_outs, exact_dqkv)):
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(ours.double(), exact, rtol=eps, atol=eps)
        assert (ours.double() - exact).abs().mean() <= (textbook.double() - exact).abs().mean()
    assert torch.equal(outs[2], low_outs[2])  # v is passed through
    q_BHTC = outs[0]
    assert q_BHTC.view(B, G, H // G * T, C).data_ptr() == q_BHTC.data_ptr()


MATMUL_INPUT_FFNS = {
    "swiglu": dict(type="glu", activation="silu"), "geglu": dict(type="glu", activation="gelu"),
    "polynorm-glu": dict(type="glu", activation="polynorm"), "relu2": dict(type="dense", activation="relu2"),
    "xielu": dict(type="dense", activation="xielu"),
    "moe-glu-shared": dict(type="moe", n_experts=4, top_k=2, n_shared_experts=1),
    "moe-dense-null": dict(type="moe", n_experts=4, top_k=2, expert_type="dense", expert_activation="relu",
                           n_null_experts=2),
}


@pytest.mark.parametrize("ffn", MATMUL_INPUT_FFNS)
def test_norms_handing_bf16_to_matmul_input_blocks_change_no_logit(ffn):
    """Under autocast a block norm emits the compute dtype when what follows only feeds matmuls (attention always;
    FFN blocks with matmul_input): the cast the Linear would make. Every such built-in block: logits bit-identical
    to the model whose norms emit fp32."""
    torch.manual_seed(0)
    cfg = MiniMindConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_seq_len=16, ffn=FFNConfig(**MATMUL_INPUT_FFNS[ffn]))
    model = MiniMindForCausalLM(cfg).eval()
    fp32_norms = copy.deepcopy(model)
    norms = [m for m in fp32_norms.modules() if getattr(m, "feeds_matmuls", False)]
    assert len(norms) == 2 * cfg.num_hidden_layers  # attention's and the FFN's in every block
    for m in norms:
        m.feeds_matmuls = False
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x).logits, fp32_norms(x).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_gqa_attention_matches_sdpa_with_gradients(dtype):
    """GQA with the query heads of a group stacked along time (model_minimind.folded_gqa_attention) against SDPA's
    own causal GQA: outputs and the gradients of q, k and v."""
    torch.manual_seed(0)
    B, H, G, T, C = 2, 6, 2, 20, 16
    q, k, v = torch.randn(B, H, T, C), torch.randn(B, G, T, C), torch.randn(B, G, T, C)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    probe = torch.randn(B, H, T, C).to(dtype)
    (y,), grads = _fwd_bwd(folded_gqa_attention, (q, k, v), probe)
    (ref,), ref_grads = _fwd_bwd(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), (q, k, v), probe)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y, ref, **tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **tol)
    # the first query of every head sees key 0 only: its output is v[0] of its group, exactly as causal demands
    torch.testing.assert_close(y[:, :, 0], v[:, :, 0].repeat_interleave(H // G, dim=1), atol=0, rtol=0)


def test_start_summary_says_whether_the_run_is_compiled():
    from pathlib import Path

    from train.config_load import load_config
    from train.tracking import start_summary

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", ["model.vocab_size=512"])
    counts = dict(total=10, active=10, embedding=2, attention=3, ffn=4, ffn_active=4)
    rt = SimpleNamespace(device=torch.device("cpu"), world_size=1)

    def device_line(mode):
        text = start_summary(cfg, counts, 100, 64, 30, 512, {"train_tokens": 1000, "val_tokens": 100}, 512, rt,
                             "fp32", 1e9, Path("run"), None, mode)
        return next(line for line in text.splitlines() if line.strip().startswith("device"))

    assert device_line("off").endswith(", eager (train.compile=auto)")  # auto is the default: a short run stays eager
    assert device_line("blocks").endswith(", compiled: blocks (train.compile=auto)")


# --- x @ W.T in column blocks for bf16/fp16 matmuls on CPU (model/split_matmul.py) -----------------------------------

def test_split_applies_to_low_precision_eager_cpu_matmuls_only(monkeypatch):
    x = torch.zeros(2, 4)
    assert split_applies(x, torch.bfloat16) and split_applies(x, torch.float16)
    assert not split_applies(x, torch.float32)  # MKL: one matmul, the fp32 digits stay as they were
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not split_applies(x, torch.bfloat16)  # inside torch.compile inductor picks its own matmul calls
    assert column_blocks(6400, 1024) == (1024,) * 6 + (256,) and column_blocks(700, 1024) == (700,)


@pytest.mark.parametrize("widths", [(40, 40), (32, 32, 16)], ids=["halves", "uneven-blocks"])
def test_split_linear_is_the_blocks_of_f_linear_with_its_autocast_gradients(widths):
    """Forward: each block is F.linear of that block of rows of W (bf16 under autocast), in its own columns.
    Backward: exactly what autograd computes for F.linear under autocast, for dx and (fp32) dW."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 24).to(torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(80, 24) * 0.2).requires_grad_(True)
    probe = torch.randn(3, 7, 80).to(torch.bfloat16)
    grads = []
    for fn in (lambda: split_linear(x, weight, widths, torch.bfloat16), lambda: F.linear(x, weight)):
        x.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn()
        y.backward(probe)
        grads.append((y.detach(), x.grad, weight.grad))
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = grads
    starts = [sum(widths[:i]) for i in range(len(widths))]
    w_bf16 = weight.detach().to(torch.bfloat16)
    blocks = [x.detach() @ w_bf16[s:s + n].T for s, n in zip(starts, widths)]
    assert y.dtype == torch.bfloat16 and torch.equal(y, torch.cat(blocks, dim=-1))
    torch.testing.assert_close(y, y_ref, atol=0, rtol=2 ** -7)  # a full matmul may round in another order
    assert dx.dtype == x.dtype and dw.dtype == torch.float32
    assert torch.equal(dx, dx_ref) and torch.equal(dw, dw_ref)


def test_glu_block_splits_gate_and_up_under_bf16_autocast_and_matches_the_linear(monkeypatch):
    import model.ffn as ffn_mod
    from model.ffn import GLUFFN
    torch.manual_seed(0)
    block = GLUFFN(32, 48, "silu")
    x = torch.randn(2, 16, 32).to(torch.bfloat16)
    probe = torch.randn(2, 16, 32).to(torch.bfloat16)
    runs = []
    for split in (True, False):
        monkeypatch.setattr(ffn_mod, "split_applies", lambda x, dtype, split=split: split)
        with torch.profiler.profile() as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, dx, grads = _grads(block, x, block, probe)
        assert ("_SplitLinear" in {e.name for e in prof.events()}) == split
        runs.append((out, dx, grads))
    (out, dx, grads), (ref_out, ref_dx, ref_grads) = runs
    torch.testing.assert_close(out, ref_out, atol=1e-2, rtol=2e-2)
    torch.testing.assert_close(dx, ref_dx, atol=1e-2, rtol=2e-2)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-3, rtol=2e-2, msg=name)
