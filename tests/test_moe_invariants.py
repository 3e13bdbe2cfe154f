"""MoE invariants: the cases where the MoE must *be* another computation, checked exactly where the operations are the
same and to a stated rounding bound where they are not.

Shape suffixes as in model/moe.py: N tokens, D hidden, K top_k.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import model.moe as moe_module
from model.config import FFNConfig, MiniMindConfig
from model.ffn import GLUFFN
from model.model_minimind import MiniMindForCausalLM
from moe_reference import make_moe, naive_moe, use_path

D, WIDTH = 64, 48  # WIDTH: a multiple of 4, so fp32 grouped_mm takes it (16-byte aligned rows)
PATHS = ["grouped", "loop"] if hasattr(F, "grouped_mm") else ["loop"]


def model_cfg(**ffn) -> MiniMindConfig:
    return MiniMindConfig(vocab_size=256, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_seq_len=32, ffn=FFNConfig(**ffn))


def expert_name(dense_name: str) -> str | None:
    """The stacked expert weight holding a dense GLU weight ('...ffn.gate_up_proj.weight' -> '...ffn.experts.w_up')."""
    for dense, expert in (("gate_up_proj.weight", "experts.w_up"), ("down_proj.weight", "experts.w_down")):
        if dense_name.endswith(f".ffn.{dense}"):
            return dense_name.replace(dense, expert)
    return None


@pytest.mark.parametrize("path", PATHS)
def test_one_expert_top1_is_the_dense_glu_exactly(path, monkeypatch):
    """One expert, top-1, no balancing terms: the router's softmax over one logit is exactly 1.0, the gate is that
    probability (top-1 keeps p), index_add into zeros adds y·1.0, and the expert runs the dense block's matmuls on the
    same rows. Logits, loss and every gradient are bitwise equal; the router's gradient is exactly 0 (softmax of one
    logit has zero derivative: p·(g − p·g) = 0)."""
    use_path(monkeypatch, path)
    torch.manual_seed(0)
    dense = MiniMindForCausalLM(model_cfg(type="glu", d_ff=WIDTH))
    moe = MiniMindForCausalLM(model_cfg(type="moe", n_experts=1, top_k=1, d_ff=WIDTH, balancing="none",
                                        z_loss_coef=0.0))
    moe_sd = moe.state_dict()
    with torch.no_grad():
        for name, t in dense.state_dict().items():
            (moe_sd[expert_name(name)][0] if expert_name(name) else moe_sd[name]).copy_(t)
    x = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(1))
    outs = []
    for m in (dense, moe):
        out = m(x, torch.roll(x, -1, 1), return_logits=True)
        (out.loss + out.aux_loss).backward()
        outs.append(out)
    assert torch.equal(outs[0].logits, outs[1].logits) and torch.equal(outs[0].loss, outs[1].loss)
    moe_params = dict(moe.named_parameters())
    for name, p in dense.named_parameters():
        grad = moe_params[expert_name(name)].grad[0] if expert_name(name) else moe_params[name].grad
        assert torch.equal(grad, p.grad), name
    routers = [p for n, p in moe.named_parameters() if n.endswith("router.gate.weight")]
    assert len(routers) == 2 and all(torch.equal(p.grad, torch.zeros_like(p)) for p in routers)


def identical_experts(scoring: str, router_std: float):
    """(dense GLU, 4-expert top-2 renormalised MoE whose experts are all copies of it)."""
    torch.manual_seed(0)
    glu = GLUFFN(D, WIDTH, "silu")
    moe = make_moe(D, n_experts=4, top_k=2, d_ff=WIDTH, balancing="none", z_loss_coef=0.0, router_scoring=scoring)
    with torch.no_grad():
        for p in glu.parameters():
            p.normal_(0, 0.2)
        moe.router.gate.weight.normal_(0, router_std)
        moe.experts.w_up.copy_(glu.gate_up_proj.weight.expand(4, -1, -1))
        moe.experts.w_down.copy_(glu.down_proj.weight.expand(4, -1, -1))
    return glu, moe


def forward_backward(block, x_BTD, probe_BTD):
    x = x_BTD.clone().requires_grad_(True)
    out = block(x)
    (out * probe_BTD).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("path", PATHS)
def test_identical_experts_under_a_uniform_router_are_the_dense_glu_exactly(scoring, path, monkeypatch):
    """n identical experts, renormalised top-2, router weights 0: every gate is exactly 0.5 (1/4 / (1/4 + 1/4), or
    σ(0) / (σ(0) + σ(0))), both experts compute the same rows, and 0.5·y + 0.5·y = y in floating point. Output, input
    gradient and the experts' summed weight gradients (0.5·g each) equal the dense block's bitwise."""
    use_path(monkeypatch, path)
    glu, moe = identical_experts(scoring, router_std=0.0)
    x, probe = torch.randn(3, 11, D), torch.randn(3, 11, D)
    (y_dense, dx_dense), (y_moe, dx_moe) = forward_backward(glu, x, probe), forward_backward(moe, x, probe)
    assert torch.equal(y_moe, y_dense) and torch.equal(dx_moe, dx_dense)
    assert torch.equal(moe.experts.w_up.grad.sum(0), glu.gate_up_proj.weight.grad)
    assert torch.equal(moe.experts.w_down.grad.sum(0), glu.down_proj.weight.grad)
    assert torch.equal(moe.router.gate.weight.grad, torch.zeros_like(moe.router.gate.weight))


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_identical_experts_under_any_router_match_the_dense_glu_to_rounding(scoring):
    """With a random router the gates w1 + w2 = 1 only up to fp32 rounding, so w1·y + w2·y differs from y by a few ulp
    of |y| (and the gradients, built from w_k-scaled pieces, by a few ulp of their own scale). Mathematically the
    router gets no gradient (Σ w_k = 1 for every logit); in fp32 it is at the rounding level. Tolerances: 8 ulp
    (2^-20 ≈ 1e-6) relative to each tensor's largest entry."""
    glu, moe = identical_experts(scoring, router_std=0.5)
    x, probe = torch.randn(3, 11, D), torch.randn(3, 11, D)
    (y_dense, dx_dense), (y_moe, dx_moe) = forward_backward(glu, x, probe), forward_backward(moe, x, probe)
    pairs = [(y_moe, y_dense), (dx_moe, dx_dense), (moe.experts.w_up.grad.sum(0), glu.gate_up_proj.weight.grad),
             (moe.experts.w_down.grad.sum(0), glu.down_proj.weight.grad)]
    for got, want in pairs:
        assert (got - want).abs().max() <= 2 ** -20 * want.abs().max()
    assert moe.router.gate.weight.grad.abs().max() <= 2 ** -20 * glu.gate_up_proj.weight.grad.abs().max()


REFERENCE_CONFIGS = {
    "softmax-top2": dict(),
    "softmax-top1": dict(top_k=1),
    "sigmoid-top3-unnormalised": dict(router_scoring="sigmoid", top_k=3, norm_topk_prob=False),
    "shared": dict(n_shared_experts=2),
    "dense-experts-gelu": dict(expert_type="dense", expert_activation="gelu"),
    "null-experts": dict(n_null_experts=4, top_k=3),
}


@pytest.mark.parametrize("path, dtype", [*((p, torch.float32) for p in PATHS), ("loop", torch.float64)])
@pytest.mark.parametrize("name", REFERENCE_CONFIGS)
def test_dropless_dispatch_is_the_per_token_reference_forward_and_backward(name, path, dtype, monkeypatch):
    """Sorting, grouping (grouped_mm or the per-expert loop) and index_add against tests/moe_reference.py's token-by-
    token loop: output, input gradient and every parameter gradient. Not bitwise: a GEMM over an expert's rows sums
    in another order than one token's matrix-vector product. The float64 run (the loop path: grouped_mm has no fp64)
    shows the two are the same computation (≤ 2^-40 ≈ 1e-12 relative; the router itself is fp32 in both, so routing is
    identical); fp32 stays within 2^-18 ≈ 4e-6 of each tensor's largest entry (observed: ≤ 6e-7)."""
    use_path(monkeypatch, path)
    moe = make_moe(D, std=0.2, **{"n_experts": 8, "top_k": 2, "d_ff": 32, **REFERENCE_CONFIGS[name]}).to(dtype)
    x, probe = torch.randn(3, 11, D, dtype=dtype), torch.randn(3, 11, D, dtype=dtype)
    y, dx = forward_backward(moe, x, probe)
    grads = [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()
    y_ref, dx_ref = forward_backward(lambda x_BTD: naive_moe(moe, x_BTD.view(-1, D)).view_as(x_BTD), x, probe)
    tol = 2 ** -40 if dtype == torch.float64 else 2 ** -18
    for got, want in [(y, y_ref), (dx, dx_ref), *zip(grads, (p.grad for p in moe.parameters()))]:
        assert (got - want).abs().max() <= tol * want.abs().max()


# --- the global-batch balance loss -------------------------------------------------------------------------------

def test_global_aux_loss_is_the_micro_batch_loss_with_one_micro_batch_on_one_process():
    """One process, one micro-batch per step: 'all micro-batches and ranks so far' is this micro-batch, so the global
    loss and its gradients are bitwise the Switch loss's (f = counts / counts.sum() = counts / (N·K) exactly)."""
    x = torch.randn(4, 16, D)
    results = []
    for balancing in ("aux_loss", "global_aux_loss"):
        moe = make_moe(D, std=0.2, n_experts=8, top_k=2, d_ff=32, balancing=balancing, aux_loss_coef=0.1).train()
        moe(x)
        loss = moe.aux_losses["aux_loss" if balancing == "aux_loss" else "global_aux_loss"]
        loss.backward()
        results.append((loss.detach(), moe.router.gate.weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_global_aux_loss_sums_the_steps_micro_batches_and_starts_again_after_the_step():
    moe = make_moe(D, std=0.2, n_experts=4, top_k=2, d_ff=32, balancing="global_aux_loss", aux_loss_coef=1.0,
                   z_loss_coef=0.0).train()
    x1, x2 = torch.randn(2, 8, D), torch.randn(2, 8, D)
    counts = []
    for x in (x1, x2):
        _, _, expert_NK, _ = moe.router(x.view(-1, D))
        counts.append(torch.bincount(expert_NK.flatten(), minlength=4))
    moe(x1)
    moe(x2)  # the second micro-batch's f covers both micro-batches
    probs_NE = moe.router(x2.view(-1, D))[1]
    f_E = (counts[0] + counts[1]).double() / (2 * 16 * 2)
    want = 4 * (f_E * probs_NE.double().mean(0)).sum()
    assert moe.aux_losses["global_aux_loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.equal(moe.global_counts, counts[0] + counts[1])
    moe.after_optimizer_step()
    assert moe.global_counts.sum() == 0
    moe.eval()
    moe(x1)  # evaluation: local counts only, the step's buffer untouched
    assert moe.global_counts.sum() == 0


@pytest.mark.parametrize("balancing", ["global_aux_loss", "aux_loss"])
def test_two_simulated_ranks_equal_one_process_on_their_union_only_for_the_global_loss(balancing, monkeypatch):
    """Rank r sees half the micro-batch; all_reduce adds the other rank's routed-slot counts (simulated), DDP averages
    the two ranks' gradients. With the global loss the mean of the ranks' losses and gradients is the one-process
    loss and gradient on the union (to fp32 rounding of the mean); with the micro-batch loss it is not (f differs)."""
    moe = make_moe(D, std=0.2, n_experts=4, top_k=2, d_ff=32, balancing=balancing, aux_loss_coef=1.0,
                   router_scoring="sigmoid", aux_free_bias=True, z_loss_coef=0.0).train()
    with torch.no_grad():
        moe.router.selection_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))  # sigmoid + a moved bias, as DeepSeek-V3
    x = torch.randn(4, 8, D)
    key = "global_aux_loss" if balancing == "global_aux_loss" else "aux_loss"

    def loss_and_grad(x_BTD):
        moe.zero_grad()
        moe(x_BTD)
        moe.aux_losses[key].backward()
        return moe.aux_losses[key].detach(), moe.router.gate.weight.grad.clone()

    union = loss_and_grad(x)
    moe.after_optimizer_step(skipped=True)  # reset the step's counts, keep the bias
    halves = (x[:2], x[2:])
    other_counts = [torch.bincount(moe.router(h.reshape(-1, D))[2].flatten(), minlength=4) for h in halves[::-1]]
    ranks = []
    for rank, half in enumerate(halves):
        monkeypatch.setattr(moe_module.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(moe_module.dist, "all_reduce", lambda t, r=rank: t.add_(other_counts[r]))
        ranks.append(loss_and_grad(half))
        monkeypatch.undo()
        moe.after_optimizer_step(skipped=True)
    mean_loss, mean_grad = (ranks[0][0] + ranks[1][0]) / 2, (ranks[0][1] + ranks[1][1]) / 2
    same = torch.allclose(mean_loss, union[0], rtol=1e-6, atol=0) and torch.allclose(mean_grad, union[1], rtol=1e-5,
                                                                                        atol=1e-7)
    assert same == (balancing == "global_aux_loss")


def test_global_aux_two_process_ddp_equals_one_process_with_the_union_micro_batches(tiny_data_cache, tmp_path):
    """torchrun: 2 processes × micro-batch 2 × grad_accum 4 (2 per rank) against 1 process × micro-batch 4 ×
    grad_accum 2. Rank r's micro-batch m holds sequences (2m + r)·2 .. +2 of the step (train/data/loader.py), so the
    union of the ranks' micro-batch m is the single process's micro-batch m: the global loss sees the same f, the
    LM loss the same tokens. Sigmoid scoring with the selection bias moving beside the loss (DeepSeek-V3's mix)."""
    from safetensors.torch import load_file

    from train.config_load import load_config
    from train.runs import read_metrics
    from train.trainer import train

    root = Path(__file__).resolve().parents[1]
    common = [f"data.cache_dir={tiny_data_cache}", "model.ffn.type=moe", "model.ffn.n_experts=4",
              "model.ffn.balancing=global_aux_loss", "model.ffn.aux_loss_coef=0.1", "model.ffn.router_scoring=sigmoid",
              "model.ffn.aux_free_bias=true", "model.ffn.bias_update_rate=0.01", "train.max_steps=4",
              "train.log_interval=1", "train.eval_interval=4", "train.ckpt_interval=4", "train.sample_max_new_tokens=2"]
    train(load_config(root / "configs" / "tiny.yaml", [*common, "train.micro_batch_size=4", "train.grad_accum=2",
                                                        f"train.out_dir={tmp_path / 'one'}"]))
    two = [*common, "train.micro_batch_size=2", "train.grad_accum=4", f"train.out_dir={tmp_path / 'two'}"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(root / "scripts" / "train.py"), "--config", str(root / "configs" / "tiny.yaml"), *two],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = {}
    for name in ("one", "two"):
        lines = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["type"] == "train"]
        weights = load_file(str(tmp_path / name / "checkpoints" / "step_000004" / "model.safetensors"))
        runs[name] = lines, weights
    (lines1, w1), (lines2, w2) = runs["one"], runs["two"]
    assert len(lines1) == len(lines2) == 4
    for a, b in zip(lines1, lines2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["global_aux_loss"] == pytest.approx(a["global_aux_loss"], rel=1e-4)
    biases = [k for k in w1 if k.endswith("selection_bias")]
    assert len(biases) == 2 and any(w1[k].abs().sum() > 0 for k in biases)
    for key, t in w1.items():
        torch.testing.assert_close(w2[key], t, rtol=1e-4, atol=1e-5, msg=key)
