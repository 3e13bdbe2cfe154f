"""Per-variant tuning and the scaling ladder: selection reads only tuning losses, the validation parts are disjoint,
and a tiny ladder × grid × 2 seeds sweep runs end to end with every report.json field."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from train.compare import run_sweep
from train.plan import choose, plan_sweep, resolve_selection
from train.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
GELU = {"model.ffn.type": "dense", "model.ffn.activation": "gelu"}
SWIGLU = {"model.ffn.type": "glu", "model.ffn.activation": "silu"}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def base(tmp_path, tmp_path_factory):
    return write_yaml(tmp_path / "tiny-base.yaml", {
        "extends": str(ROOT / "configs" / "tiny.yaml"),
        "data": {"val_plays": ["macbeth"], "max_documents": 2,
                 "cache_dir": str(tmp_path_factory.getbasetemp() / "compare-data"), "tokenizer": {"vocab_size": 320}},
        "train": {"max_steps": 4, "warmup_steps": 1, "log_interval": 2, "eval_interval": 4, "eval_tokens": 1024,
                  "ckpt_interval": 4, "sample_max_new_tokens": 4, "sample_prompts": ["ROMEO:"]},
        "wandb": {"mode": "disabled"}})


def sweep(tmp_path, **extra) -> Path:
    data = {"name": "ladder", "base": "tiny-base.yaml", "out_dir": str(tmp_path / "runs" / "ladder"), "seeds": [0, 1],
            "baseline": "gelu", "variants": {"gelu": GELU, "swiglu": SWIGLU}, **extra}
    return write_yaml(tmp_path / "sweep.yaml", data)


# ---------------------------------------------------------------------------------------------------------------
# Selection

def test_choose_picks_the_lowest_tuning_loss_and_flags_edges():
    points = [{"train.lr": v} for v in (1e-3, 2e-3, 4e-3, 8e-3)]
    assert choose(points, [3.1, 2.9, 3.0, 3.4]) == (1, [])
    assert choose(points, [3.1, 3.0, 2.95, 2.9]) == (3, ["train.lr"])  # best on the edge: widen the grid
    assert choose(points, [None, 3.0, float("nan"), 3.2]) == (1, [])  # unfinished / NaN points are skipped
    assert choose(points, [None] * 4) == (None, [])


def fake_final(run_dir: Path, step: int, val_loss: float, tune_loss: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps(
        {"type": "final", "step": step, "val_loss": val_loss, "tune_loss": tune_loss}) + "\n")


def test_selection_reads_tuning_losses_never_reporting_blocks(base, tmp_path, monkeypatch):
    """The reporting loss says lr=4e-3, the tuning loss says lr=1e-3: selection must follow the tuning loss; and the
    only thing it opens is each tuning run's metrics.jsonl (no validation data, no weights)."""
    path = sweep(tmp_path, tune={"train.lr": [1.0e-3, 4.0e-3]})
    plan = plan_sweep(path)
    tuning = [r for r in plan.runs if r.tuning]
    assert len(tuning) == 4 and plan.pending == 2 and not [r for r in plan.runs if not r.tuning]
    for r in tuning:
        low = r.point["train.lr"] == 1.0e-3
        fake_final(r.cfg.out_dir, 4, val_loss=5.0 if low else 4.0, tune_loss=4.0 if low else 5.0)
    opened = []
    real_open = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: opened.append(self.name) or real_open(self, *a, **k))
    import train.data.loader as loader
    monkeypatch.setattr(loader, "val_batches", lambda *a, **k: pytest.fail("selection read validation blocks"))
    monkeypatch.setattr(np, "memmap", lambda *a, **k: pytest.fail("selection opened a token shard"))
    resolve_selection(plan)
    # metrics.jsonl of the tuning runs, and the config files that plan the chosen point's other seeds
    assert "metrics.jsonl" in opened and {n for n in opened if not n.endswith(".yaml")} == {"metrics.jsonl"}
    for sel in plan.selections.values():
        assert sel.points[sel.chosen] == {"train.lr": 1.0e-3} and sel.on_edge == ["train.lr"]
    finals = [r for r in plan.runs if r.reported]
    assert sorted(r.name for r in finals) == ["gelu-lr0.001-s0", "gelu-lr0.001-s1", "swiglu-lr0.001-s0",
                                              "swiglu-lr0.001-s1"]
    s1 = next(r for r in finals if r.name == "gelu-lr0.001-s1")
    assert s1.cfg.train.lr == 1.0e-3 and s1.cfg.train.min_lr == pytest.approx(1.0e-4)  # base ratio min_lr/lr kept


def test_validation_parts_are_disjoint_halves(base):
    from train.config_load import load_config
    from train.data import prepare_data, val_batches
    cfg = load_config(base)
    prepared = prepare_data(cfg.data)
    seq = cfg.model.max_seq_len
    report, tune = (val_batches(prepared, seq, 4, None, part=p) for p in ("report", "tune"))
    val = np.memmap(prepared.val_path, dtype=prepared.dtype, mode="r")
    n_blocks = (len(val) - 1) // seq
    starts = lambda b: [x[i, 0].item() for x, _ in b for i in range(len(x))]  # noqa: E731
    assert report.n_tokens == (n_blocks // 2) * seq and tune.n_tokens == (n_blocks - n_blocks // 2) * seq
    first_tune = (n_blocks // 2) * seq  # the tuning part starts where the reporting part's inputs end
    assert starts(report) == [int(val[i * seq]) for i in range(n_blocks // 2)]
    assert starts(tune) == [int(val[first_tune + i * seq]) for i in range(n_blocks - n_blocks // 2)]
    with pytest.raises(ValueError):
        val_batches(prepared, seq, 4, None, part="test")


def test_bad_tuning_and_ladder_keys_are_refused(base, tmp_path):
    with pytest.raises(ConfigError, match="'train.seed' cannot be tuned"):
        plan_sweep(sweep(tmp_path, tune={"train.seed": [0, 1]}))
    with pytest.raises(ConfigError, match="size 'xs' may not set 'model.ffn.type'"):
        plan_sweep(sweep(tmp_path, sizes={"xs": {"model.ffn.type": "glu"}}))
    with pytest.raises(ConfigError, match="tuned by the sweep"):
        plan_sweep(sweep(tmp_path, tune={"train.lr": [1.0e-3, 2.0e-3]}), ["train.lr=0.1"])


# ---------------------------------------------------------------------------------------------------------------
# A tiny ladder × grid × 2 seeds, end to end

def test_tiny_ladder_with_tuning_end_to_end(base, tmp_path, capsys):
    sizes = {"xs": {"model.hidden_size": 32, "model.num_attention_heads": 2, "model.num_key_value_heads": 1},
             "s": {"model.hidden_size": 48, "model.num_attention_heads": 2, "model.num_key_value_heads": 1},
             "m": {"model.hidden_size": 64, "model.num_attention_heads": 2, "model.num_key_value_heads": 1}}
    path = sweep(tmp_path, sizes=sizes, budget={"tokens_per_param": 0.05}, tune={"train.lr": [2.0e-3, 4.0e-3]})
    plan = plan_sweep(path)
    assert len(plan.runs) == 2 * 3 * 2 and plan.pending == 2 * 3 * 1  # tuning first, seed 1 after selection
    budgets = {s: plan.ladder[s]["gelu"].cfg.train.max_tokens for s in sizes}
    assert budgets["xs"] < budgets["s"] < budgets["m"]
    assert all(plan.ladder[s]["swiglu"].cfg.train.max_tokens == budgets[s] for s in sizes)  # same budget per size
    doc = run_sweep(plan, command="pytest")
    out = tmp_path / "runs" / "ladder"
    assert doc["missing_runs"] == [] and doc["pending_runs"] == 0
    assert len([p for p in out.iterdir() if p.is_dir()]) == 2 * 3 * 3  # 2 grid points + 1 more seed, per variant·size
    report = json.loads((out / "report.json").read_text())
    assert {r["name"] for r in report["variants"]} == {"gelu", "swiglu"}
    assert all(len(r["val_loss_per_seed"]) == 2 for r in report["variants"])
    (v,) = report["verdicts"]
    assert v["variant"] == "swiglu" and v["verdict"] == "needs ≥ 3 seeds"
    assert set(v) >= {"delta", "ci95", "p_value", "p_holm", "mde", "verdict"} and len(v["ci95"]) == 2
    assert {s["size"] for s in report["sizes"]} == set(sizes)
    scaling = {s["variant"]: s for s in report["scaling"]}
    for entry in scaling.values():
        assert set(entry) >= {"E", "A", "alpha", "compute_multiplier", "ci95", "time_multiplier", "points"}
        assert [p["size"] for p in entry["points"]] == list(sizes)
        assert all(set(p) >= {"size", "flops", "tokens", "loss_mean", "loss_std", "n"} for p in entry["points"])
    assert scaling["gelu"]["compute_multiplier"] == pytest.approx(1.0)  # the baseline against itself
    tuning = report["tuning"]
    assert len(tuning) == 2 * 3 and all(t["chosen"] is not None and len(t["points"]) == 2 for t in tuning)
    for t in tuning:  # the chosen point is the one with the lowest tuning loss, read back from its run
        best = min(t["points"], key=lambda p: p["tune_loss"])
        assert t["chosen"] == best["values"]
        name = f"{t['variant']}-{t['size']}-lr{best['values']['train.lr']:g}-s0"
        final = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()][-1]
        assert final["tune_loss"] == pytest.approx(best["tune_loss"]) and final["val_loss"] != final["tune_loss"]
    md = (out / "report.md").read_text()
    assert "Scaling: compute multipliers" in md and "## Tuning" in md and "widen the grid" in md
    assert (out / "scaling_loss_vs_flops.png").is_file() and (out / "tuning_loss_vs_value.png").is_file()
    # --dry-run of the finished sweep prints the whole plan: nothing pending, every run planned
    from train.estimate import format_plan
    text = format_plan(plan_sweep(path), 1e10, "test")
    assert "18 runs = 2 variants × 3 sizes × (2 grid points + 1 more seeds)" in text


# ---------------------------------------------------------------------------------------------------------------
# A second factor crossed with the variants

def test_rank_agreement_on_synthetic_rankings():
    from train.stats import rank_agreement
    same = rank_agreement({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 0.5, "b": 0.6, "c": 0.9})
    assert same["kendall_tau"] == pytest.approx(1.0) and same["order_flips"] == []
    one_swap = rank_agreement({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 1.0, "b": 3.0, "c": 2.0})
    assert one_swap["kendall_tau"] == pytest.approx(1 / 3) and one_swap["order_flips"] == [["b", "c"]]
    reversed_ = rank_agreement({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}, {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0})
    assert reversed_["kendall_tau"] == pytest.approx(-1.0) and len(reversed_["order_flips"]) == 6
    assert rank_agreement({"a": 1.0}, {"a": 2.0, "b": 1.0})["kendall_tau"] is None  # one common variant


def test_factor_sweep_plans_every_level_and_reports_agreement(base, tmp_path):
    path = sweep(tmp_path, seeds=[0], factors={"train.weight_decay": [0.0, 0.1]})
    plan = plan_sweep(path)
    assert len(plan.runs) == 2 * 2 * 1  # variants × levels × seeds
    names = sorted(r.name for r in plan.runs)
    assert names == ["gelu-weight_decay0-s0", "gelu-weight_decay0.1-s0", "swiglu-weight_decay0-s0",
                     "swiglu-weight_decay0.1-s0"]
    assert {r.cfg.train.weight_decay for r in plan.runs} == {0.0, 0.1}
    with pytest.raises(ConfigError, match="is a factor of the sweep"):
        plan_sweep(path, ["train.weight_decay=0.5"])
    with pytest.raises(ConfigError, match="'train.seed' cannot be a factor"):
        plan_sweep(sweep(tmp_path, factors={"train.seed": [0, 1]}))
    doc = run_sweep(plan, command="pytest")
    assert [lv["level"] for lv in doc["levels"]] == ["weight_decay0", "weight_decay0.1"]
    for lv in doc["levels"]:  # each level ranks its own runs
        runs = {r["name"]: r["runs"] for r in lv["variants"]}
        assert all(f"-{lv['level']}-s0" in runs[name][0] for name in runs)
    (agree,) = doc["agreement"]
    means = [{r["name"]: r["val_loss_mean"] for r in lv["variants"]} for lv in doc["levels"]]
    same_order = (means[0]["gelu"] - means[0]["swiglu"]) * (means[1]["gelu"] - means[1]["swiglu"]) > 0
    assert agree["levels"] == ["weight_decay0", "weight_decay0.1"] and agree["n"] == 2
    assert agree["kendall_tau"] == pytest.approx(1.0 if same_order else -1.0)
    assert agree["order_flips"] == ([] if same_order else [["gelu", "swiglu"]]) or agree["order_flips"] == \
        ([] if same_order else [["swiglu", "gelu"]])
    md = (tmp_path / "runs" / "ladder" / "report.md").read_text()
    assert "Rankings by factor level" in md and "Kendall τ" in md
