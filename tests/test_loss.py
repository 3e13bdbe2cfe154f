"""Chunked LM-head + cross-entropy (model/loss.py) against a plain `F.cross_entropy(h @ W.T)` written here: loss and
gradients. The chunked function is called directly wherever `linear_cross_entropy` would take its one-chunk shortcut
(which *is* the plain path), so every comparison below really compares two implementations."""
import math

import pytest
import torch
import torch.nn.functional as F

import model.loss as loss_mod
import model.model_minimind as mm
from model.config import FFNConfig, MiniMindConfig
from model.loss import linear_cross_entropy
from model.model_minimind import MiniMindForCausalLM

N, D, V = 50, 16, 37


def plain(h, w, y):
    """The reference, independent of model/loss.py: full logits, then F.cross_entropy (fp32 softmax)."""
    return F.cross_entropy((h @ w.T).float(), y, ignore_index=-100)


def chunked(rows, dtype=torch.float32):
    """The chunked implementation itself, with `rows` rows per chunk (no one-chunk shortcut)."""
    def fn(h, w, y):
        with torch.autocast("cpu", enabled=False):
            return loss_mod._ChunkedLinearCrossEntropy.apply(h, w, y, rows, dtype)
    return fn


def inputs(ignored=(3, 4, 40)):
    torch.manual_seed(0)
    h = torch.randn(N, D, requires_grad=True)
    w = (torch.randn(V, D) * 0.5).requires_grad_(True)
    y = torch.randint(0, V, (N,))
    y[list(ignored)] = -100
    return h, w, y


def loss_and_grads(fn, h, w, y, autocast=False):
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(h, w, y)
    (2.5 * loss).backward()  # a grad_output other than 1 reaches the saved gradients
    return loss.detach(), h.grad.clone(), w.grad.clone()


@pytest.fixture
def no_shortcut(monkeypatch):
    """Make linear_cross_entropy fail loudly if it takes the plain one-chunk path."""
    def refuse(*args):
        raise AssertionError("linear_cross_entropy fell back to the plain path")
    monkeypatch.setattr(loss_mod, "reference_cross_entropy", refuse)


@pytest.mark.parametrize("rows", [1, 7, N, 2 * N], ids=["row-by-row", "ragged-chunks", "one-chunk", "larger"])
@pytest.mark.parametrize("ignored", [(3, 4, 40), ()], ids=["some-ignored", "none-ignored"])
def test_fp32_chunked_matches_plain(rows, ignored):
    """With ignored rows the logit gradient is masked; without, the mask pass is skipped (model/loss.py)."""
    h, w, y = inputs(ignored)
    got, want = (loss_and_grads(f, h, w, y) for f in (chunked(rows), plain))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    if ignored:
        assert got[1][list(ignored)].abs().max() == 0  # ignored rows get no gradient
    assert got[1].abs().min(dim=1).values.gt(0).sum() == N - len(ignored)  # every other row does
    assert got[2].abs().max() > 0 and got[0] > 0


def test_the_comparison_can_fail():
    """A deliberately wrong chunked result (one target shifted) must not pass the tolerances used above."""
    h, w, y = inputs()
    wrong = y.clone()
    wrong[0] = (wrong[0] + 1) % V
    got, want = loss_and_grads(chunked(7), h, w, wrong), loss_and_grads(plain, h, w, y)
    assert not torch.allclose(got[1], want[1], atol=1e-6, rtol=1e-5)


def test_public_function_dispatch(monkeypatch, no_shortcut):
    """More rows than one chunk holds: the chunked path (the plain one would raise); fewer: the plain path."""
    monkeypatch.setattr(loss_mod, "CHUNK_LOGITS", 7 * V)
    h, w, y = inputs()
    got, want = loss_and_grads(linear_cross_entropy, h, w, y), loss_and_grads(plain, h, w, y)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    monkeypatch.setattr(loss_mod, "CHUNK_LOGITS", N * V)
    with pytest.raises(AssertionError, match="fell back"):
        linear_cross_entropy(h, w, y)


@pytest.mark.parametrize("ignored", [(3, 4, 40), ()], ids=["some-ignored", "none-ignored"])
def test_bf16_autocast_matches_plain(monkeypatch, no_shortcut, ignored):
    monkeypatch.setattr(loss_mod, "CHUNK_LOGITS", 8 * V)
    h, w, y = inputs(ignored)
    got, want = (loss_and_grads(f, h, w, y, autocast=True) for f in (linear_cross_entropy, plain))
    assert got[0].dtype == torch.float32 and got[1].dtype == h.dtype and got[2].dtype == w.dtype
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)  # the loss: same bf16 logits, fp32 softmax
    for a, b in zip(got[1:], want[1:]):  # gradients: bf16 matmuls, the weight's summed over chunks
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-2)


def test_bf16_logits_in_column_blocks_are_the_single_matmuls(monkeypatch, no_shortcut):
    """On CPU in bf16 the logits are computed in LM_HEAD_BLOCK-wide column blocks (model/split_matmul.py): with
    blocks of 16 (16 + 16 + 5 columns) loss and gradients equal the one-matmul chunks', and the blocks did run."""
    import model.split_matmul as split_mod
    monkeypatch.setattr(loss_mod, "CHUNK_LOGITS", 8 * V)
    monkeypatch.setattr(loss_mod, "LM_HEAD_BLOCK", 16)
    calls = []
    monkeypatch.setattr(loss_mod, "mm_columns", lambda *a: calls.append(a[2]) or split_mod.mm_columns(*a))
    h, w, y = inputs()
    blocked = loss_and_grads(linear_cross_entropy, h, w, y, autocast=True)
    assert calls and all(widths == (16, 16, 5) for widths in calls)
    monkeypatch.setattr(loss_mod, "split_applies", lambda x, dtype: False)
    calls.clear()
    single = loss_and_grads(linear_cross_entropy, h, w, y, autocast=True)
    assert calls and all(widths == (V,) for widths in calls)
    for a, b in zip(blocked, single):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rows", [9, 2 * N], ids=["chunks", "one-chunk"])
def test_no_grad_path_gives_the_plain_loss(rows):
    h, w, y = inputs()
    with torch.no_grad():
        no_grad = loss_mod._chunked(h, w, y, rows, torch.float32, with_grad=False)[0]
        want = plain(h, w, y)
    assert no_grad.item() == pytest.approx(want.item(), rel=1e-6)
    assert no_grad.item() == pytest.approx(chunked(rows)(h, w, y).item(), rel=1e-6)


@pytest.mark.parametrize("rows", [7, 2 * N], ids=["chunks", "one-chunk"])
def test_all_rows_ignored_gives_nan_like_the_plain_loss(rows):
    h, w, y = inputs(ignored=range(N))
    assert math.isnan(plain(h, w, y).item())
    assert math.isnan(chunked(rows)(h, w, y).item())
    with torch.no_grad():
        assert math.isnan(loss_mod._chunked(h, w, y, rows, torch.float32, with_grad=False)[0].item())


@pytest.mark.parametrize("ffn", [dict(type="glu"), dict(type="moe", n_experts=4, top_k=2)], ids=["swiglu", "moe"])
def test_model_gradients_match_the_plain_loss(monkeypatch, no_shortcut, ffn):
    """Whole model with tied embeddings: every parameter's gradient through the chunked loss equals the plain one."""
    monkeypatch.setattr(loss_mod, "CHUNK_LOGITS", 5 * 64)  # 5 rows per chunk, 48 rows
    cfg = MiniMindConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_seq_len=16, ffn=FFNConfig(**ffn))
    torch.manual_seed(0)
    model = MiniMindForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = torch.randint(0, 64, (3, 16))
    grads = []
    for fn in (linear_cross_entropy, plain):
        monkeypatch.setattr(mm, "linear_cross_entropy", fn)
        model.zero_grad()
        out = model(x, torch.roll(x, -1, 1))
        (out.loss + out.aux_loss).backward()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, got), (ref_loss, want) = grads
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-4, msg=name)
