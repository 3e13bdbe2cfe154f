"""Issue 9 (what the FFN does): the attention-only (`ffn.type: none`) and linear (`dense` + `identity`) variants build,
train, and report FFN shares of parameters and training FLOPs equal to counts done by hand from the layer shapes;
the shipped experiment sweeps follow the sizing rules their comments state. (That every shipped sweep passes
`scripts/compare.py --dry-run` is tested in test_compare.py, which globs configs/compare/*.yaml.)"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import FFNConfig, MiniMindConfig, resolve_d_ff
from model.model_minimind import MiniMindForCausalLM
from train.plan import plan_sweep
from train.config_load import load_config
from train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
V, D, L, H, G, T = 512, 64, 2, 4, 2, 64  # configs/tiny.yaml's model (vocab from its tokenizer size)
C = D // H  # head size


def by_hand(d_ff: int) -> dict:
    """Parameter and FLOP counts of the tiny model from its shapes; d_ff=0: no FFN sub-layer (and no FFN norm)."""
    attention = L * (D * H * C + 2 * D * G * C + H * C * D)  # q, k, v, o projections, no biases
    norms = L * D + D + (L * D if d_ff else 0)  # attention norm per layer, final norm, FFN norm per layer
    ffn = L * 2 * D * d_ff  # up + down
    total = V * D + attention + norms + ffn  # tied LM head counted once
    flops = 6 * total + 12 * L * D * T
    return dict(total=total, ffn=ffn, flops=flops, param_share=ffn / total, flop_share=6 * ffn / flops)


def summary_info(*overrides: str) -> dict:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import summary
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return summary.summarize(load_config(TINY, [f"model.vocab_size={V}", *overrides]))


@pytest.mark.parametrize("ffn, d_ff", [(["model.ffn.type=none"], 0),
                                       (["model.ffn.type=dense", "model.ffn.activation=identity"], 4 * D),
                                       (["model.ffn.type=dense", "model.ffn.activation=gelu"], 4 * D)])
def test_summary_ffn_shares_match_hand_counts(ffn, d_ff):
    info, want = summary_info(*ffn), by_hand(d_ff)
    assert (info["total_params"], info["ffn_params"], info["flops_per_token"]) == (want["total"], want["ffn"],
                                                                                 want["flops"])
    assert info["ffn_param_share"] == pytest.approx(want["param_share"], rel=1e-12)
    assert info["ffn_flop_share"] == pytest.approx(want["flop_share"], rel=1e-12)
    if d_ff == 0:
        assert info["ffn_param_share"] == 0.0 and info["ffn_flop_share"] == 0.0


def test_linear_ffn_has_gelus_shares_and_is_linear():
    shares = {a: summary_info("model.ffn.type=dense", f"model.ffn.activation={a}") for a in ("identity", "gelu")}
    assert shares["identity"]["ffn_param_share"] == shares["gelu"]["ffn_param_share"] > 0.3
    assert shares["identity"]["ffn_flop_share"] == shares["gelu"]["ffn_flop_share"] > 0.3
    torch.manual_seed(0)
    x, y = torch.randn(2, 5, D, dtype=torch.float64), torch.randn(2, 5, D, dtype=torch.float64)
    for act, linear in (("identity", True), ("gelu", False)):
        cfg = MiniMindConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                             num_key_value_heads=G, max_seq_len=T, ffn=FFNConfig(type="dense", activation=act))
        ffn = MiniMindForCausalLM(cfg).model.layers[0].ffn.double()
        combo = ffn(2.0 * x - 3.0 * y)
        assert torch.allclose(combo, 2.0 * ffn(x) - 3.0 * ffn(y), atol=1e-12) == linear, act
        if linear:  # the two matrices collapse to one map of rank <= d
            product = ffn.down_proj.weight @ ffn.up_proj.weight
            assert product.shape == (D, D) and torch.allclose(ffn(x), x @ product.T, atol=1e-12)


def test_summary_cli_prints_zero_share_without_ffn():
    proc = subprocess.run([sys.executable, "scripts/summary.py", "--config", str(TINY), f"model.vocab_size={V}",
                           "model.ffn.type=none"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"FFN share of params\s+0\.0%", proc.stdout) and re.search(r"FFN share of FLOPs\s+0\.0%",
                                                                               proc.stdout)


@pytest.mark.parametrize("ffn, d_ff", [(["model.ffn.type=none"], 0),
                                       (["model.ffn.type=dense", "model.ffn.activation=identity"], 4 * D)])
def test_none_and_linear_train_and_the_run_summary_shows_the_share(ffn, d_ff, tiny_data_cache, tmp_path, capsys):
    cfg = load_config(TINY, [f"data.cache_dir={tiny_data_cache}", f"train.out_dir={tmp_path / 'run'}",
                             "train.max_steps=8", "train.log_interval=1", "train.eval_interval=8",
                             "train.ckpt_interval=8", *ffn])
    result = train(cfg)
    out = capsys.readouterr().out
    want = by_hand(d_ff)
    share = re.search(r"ffn share \| ([\d.]+)% of params, ([\d.]+)% of training FLOPs", out)
    assert share, out
    assert float(share.group(1)) == pytest.approx(100 * want["param_share"], abs=0.05)
    assert float(share.group(2)) == pytest.approx(100 * want["flop_share"], abs=0.05)
    losses = [float(m) for m in re.findall(r"^step \d+/8 loss ([\d.]+)", out, flags=re.M)]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3  # it learns (starts near ln 512 = 6.24)
    assert result["val_loss"] < losses[0]


def test_expansion_and_moe_sweeps_follow_their_sizing_rules():
    plan = plan_sweep(ROOT / "configs" / "compare" / "expansion.yaml")
    d = plan.runs[0].cfg.model.hidden_size
    ffn_params = {}
    for name, info in plan.variants.items():
        family, ratio = re.fullmatch(r"(gelu|swiglu)-x(\d+)", name).groups()
        width = resolve_d_ff(info.cfg.model.ffn, d)
        assert width == (int(ratio) * d if family == "gelu" else round(2 / 3 * int(ratio) * d)), name
        assert plan.sweep.variants[name].family == family and not info.matched
        ffn_params[family, int(ratio)] = info.counts["ffn"]
    for ratio in (1, 2, 4, 8):  # equal FFN parameters per ratio, within the rounding of the GLU width
        assert ffn_params["swiglu", ratio] == pytest.approx(ffn_params["gelu", ratio], rel=0.01)
        assert ffn_params["gelu", ratio] == 4 * 2 * d * ratio * d  # 4 layers × (up + down)

    plan = plan_sweep(ROOT / "configs" / "compare" / "moe-granularity.yaml")
    moes = {n: i for n, i in plan.variants.items() if i.cfg.model.ffn.type == "moe"}
    assert {(i.cfg.model.ffn.n_experts, i.cfg.model.ffn.top_k) for i in moes.values()} == {(4, 1), (8, 2), (16, 4)}
    assert {i.cfg.model.ffn.balancing for i in moes.values()} == {"aux_loss", "aux_free"}
    for name, info in moes.items():
        assert resolve_d_ff(info.cfg.model.ffn, d) % 4 == 0, name  # 16-byte rows for the grouped matmul
        assert info.matched_on == "active", name


def built_counts(model_cfg: MiniMindConfig) -> tuple[int, int]:
    """(total, active) parameters of the model actually built, counted with p.numel(); active leaves out the
    n_experts - top_k routed experts a token does not reach (each: matrices × d × d_ff weights, no biases)."""
    with torch.device("meta"):
        model = MiniMindForCausalLM(model_cfg)
    total = sum(p.numel() for p in model.parameters())  # a tied LM head is one parameter, counted once
    ffn, d = model_cfg.ffn, model_cfg.hidden_size
    idle = 0
    if ffn.type == "moe":
        per_expert = (3 if ffn.expert_type == "glu" else 2) * d * resolve_d_ff(ffn, d)
        idle = model_cfg.num_hidden_layers * (ffn.n_experts - ffn.top_k) * per_expert
    return total, total - idle


def test_moe_sweep_is_matched_on_active_params_of_the_built_models(tmp_path):
    """The plan's counts and match against the models as built; a tolerance tighter than the rounding refuses."""
    from train.errors import ConfigError

    path = ROOT / "configs" / "compare" / "moe-granularity.yaml"
    plan = plan_sweep(path, ["model.vocab_size=2048"])
    base_total, base_active = built_counts(plan.variants["swiglu"].cfg.model)
    assert base_total == base_active
    off = {}
    for name, info in plan.variants.items():
        total, active = built_counts(info.cfg.model)
        assert (info.counts["total"], info.counts["active"]) == (total, active), name
        off[name] = active / base_active - 1
        assert info.rel_diff == pytest.approx(off[name], abs=1e-12), name
        # rounding an expert width (~170 at d=128) to a multiple of 4 moves it by <= 2, i.e. <= 1.2% of the FFN's
        # active params and < 1% of the model's: well inside the sweep's 2% tolerance
        assert abs(off[name]) < 0.01, (name, off[name])
        if info.cfg.model.ffn.type == "moe":
            assert total > active, name
    assert off["swiglu"] == 0 and any(abs(r) > 1e-4 for r in off.values())

    tight = tmp_path / "tight.yaml"
    text = path.read_text().replace("base: ../base.yaml", f"base: {ROOT / 'configs' / 'base.yaml'}")
    assert "param_tolerance: 0.01\n" in text
    tight.write_text(text.replace("param_tolerance: 0.01\n", "param_tolerance: 0.0001\n"))
    with pytest.raises(ConfigError, match="parameter mismatch") as info:
        plan_sweep(tight, ["model.vocab_size=2048"])
    for name, rel in off.items():  # exactly the variants further off than 0.01% are named
        assert (f"'{name}' has" in str(info.value)) == (abs(rel) > 1e-4), (name, rel, str(info.value))


def test_report_names_the_unmatched_variants_and_how_far_off_they_are(tmp_path):
    from train.report import summarize
    from train.report_render import render_markdown
    plan = plan_sweep(ROOT / "configs" / "compare" / "ablation.yaml", out_dir=str(tmp_path / "sweep"))
    md = render_markdown(summarize(plan, results=[]))  # nothing trained: every run is listed as missing
    notes = {line.split("`")[1]: line for line in md.splitlines() if line.startswith("- `")}
    base, noffn = plan.variants["gelu"].counts, plan.variants["noffn"].counts
    assert "**not parameter-matched**" in notes["noffn"]
    assert f"{noffn['total']:,} total" in notes["noffn"] and f"{base['total']:,}" in notes["noffn"]
    assert f"({noffn['total'] / base['total'] - 1:+.1%} total)" in notes["noffn"]
    for name in ("gelu", "noffn-deep", "noffn-wide", "linear"):  # matched (or the baseline): description only
        assert "not parameter-matched" not in notes[name]
    assert "| noffn-deep | none | total (+1.8%)" in md
