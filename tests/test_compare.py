"""FFN comparison sweeps: the sweep file rules (fairness keys, parameter match), the report's statistics, plots from
synthetic curves, and a tiny real sweep end to end (report numbers = the runs' own metrics.jsonl, resume, dry-run)."""
import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

import train.compare as compare
from train.compare import run_sweep
from train.plan import VariantInfo, plan_sweep
from train.sweep import SweepConfig, flatten, load_sweep
from train.errors import ConfigError
from train.report import RunResult, summarize
from train.report_render import render_markdown

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def tiny_base(tmp: Path, cache: Path, **train) -> Path:
    """configs/tiny.yaml cut down further: two plays, a 320-token vocabulary, 6 steps (`train` keys replace these)."""
    return write_yaml(tmp / "tiny-base.yaml", {
        "extends": str(ROOT / "configs" / "tiny.yaml"),
        "data": {"val_plays": ["macbeth"], "max_documents": 2, "cache_dir": str(cache),
                 "tokenizer": {"vocab_size": 320}},
        "train": {"max_steps": 6, "warmup_steps": 2, "log_interval": 2, "eval_interval": 3, "eval_tokens": 2048,
                  "ckpt_interval": 3, "sample_max_new_tokens": 8, "sample_prompts": ["ROMEO:"], **train},
        "wandb": {"mode": "disabled"},
    })


def sweep_file(tmp: Path, variants: dict, **extra) -> Path:
    data = {"name": "tiny-sweep", "base": "tiny-base.yaml", "out_dir": str(tmp / "runs" / "tiny-sweep"),
            "seeds": [0], "baseline": "gelu", "variants": variants, **extra}
    return write_yaml(tmp / "sweep.yaml", data)


GELU = {"model.ffn.type": "dense", "model.ffn.activation": "gelu"}
SWIGLU = {"model.ffn.type": "glu", "model.ffn.activation": "silu"}


@pytest.fixture
def tmp_sweep_dir(tmp_path, tmp_path_factory):
    tiny_base(tmp_path, tmp_path_factory.getbasetemp() / "compare-data")
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------
# Sweep file rules (no model needed)

def test_short_and_explicit_variant_forms_and_extends(tmp_sweep_dir):
    path = sweep_file(tmp_sweep_dir, {"gelu": GELU, "noffn": {"model.ffn.type": "none", "match": False},
                                      "wide": {"model": {"ffn": {"type": "dense", "d_ff": 512}}}})
    sweep, base = load_sweep(path)
    assert base == tmp_sweep_dir / "tiny-base.yaml"
    assert sweep.variants["gelu"].overrides == GELU and sweep.variant_matched("gelu")
    assert sweep.variants["noffn"].overrides == {"model.ffn.type": "none"} and not sweep.variant_matched("noffn")
    assert flatten(sweep.variants["wide"].overrides) == {"model.ffn.type": "dense", "model.ffn.d_ff": 512}
    (tmp_sweep_dir / "sub").mkdir()
    child = write_yaml(tmp_sweep_dir / "sub" / "more.yaml", {"extends": "../sweep.yaml", "name": "more", "seeds": [1, 2]})
    sweep2, base2 = load_sweep(child)
    assert (sweep2.name, sweep2.seeds, base2) == ("more", [1, 2], base)  # base stays relative to the parent file
    assert list(sweep2.variants) == ["gelu", "noffn", "wide"]


@pytest.mark.parametrize("variant, key", [({"data.max_bytes": 1000}, "data.max_bytes"),
                                          ({"data": {"tokenizer": {"vocab_size": 400}}}, "data.tokenizer.vocab_size"),
                                          ({"train.lr": 0.01}, "train.lr"), ({"train.seed": 3}, "train.seed"),
                                          ({"model.max_seq_len": 32}, "model.max_seq_len")])
def test_variant_may_not_touch_shared_settings(tmp_sweep_dir, variant, key):
    path = sweep_file(tmp_sweep_dir, {"gelu": GELU, "bad": {**SWIGLU, **variant}})
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    msg = str(err.value)
    assert "\n" not in msg and "variant 'bad'" in msg and f"'{key}'" in msg and "allowed: model.*" in msg


def test_sweep_file_errors_are_one_line(tmp_sweep_dir):
    cases = [({"seed": [0]}, "unknown key"), ({"baseline": "nope"}, "baseline 'nope' is not a variant"),
             ({"match_on": "some"}, "match_on"), ({"overrides": {"train.seed": 1}}, "'train.seed' is set by the sweep"),
             ({"seeds": [0, 0]}, "distinct")]
    for extra, expected in cases:
        path = sweep_file(tmp_sweep_dir, {"gelu": GELU}, **extra)
        with pytest.raises(ConfigError) as err:
            load_sweep(path)
        assert expected in str(err.value) and "\n" not in str(err.value)
    path = sweep_file(tmp_sweep_dir, {"gelu": GELU})
    with pytest.raises(ConfigError, match="set by the sweep"):
        plan_sweep(path, ["train.seed=4"])


# ---------------------------------------------------------------------------------------------------------------
# Plot helpers

def test_train_loss_smoothing_is_a_centered_mean():
    # the train-loss smoothing is a centered mean whose window shrinks at the ends (no EMA lag)
    from train.plots import _smooth
    assert _smooth(np.array([1.0, 2.0, 3.0, 4.0, 9.0]), 3).tolist() == pytest.approx([1.5, 2.0, 3.0, 16 / 3, 6.5])


# ---------------------------------------------------------------------------------------------------------------
# Report and plots from synthetic runs

def fake_run(variant, seed, final_loss, moe=False, n=4):
    evals = [{"step": 10 * i, "tokens": 1000 * i, "wall_s": 2.0 * i + seed, "val_loss": final_loss + 1.0 / i,
              "val_bpb": (final_loss + 1.0 / i) / 2} for i in range(1, n + 1)]
    train = [{"step": 5 * i, "tokens": 500 * i, "wall_s": 1.0 * i, "loss": final_loss + 2.0 / i} for i in range(1, 2 * n + 1)]
    load = [{"step": 5 * i, "tokens": 500 * i, "load": [[0.5, 0.25, 0.25, 0.0], [0.25] * 4]} for i in range(1, 4)]
    final = {"val_loss": final_loss, "val_bpb": final_loss / 2, "tokens": 4000, "wall_time_s": 8.0 + seed,
             "tokens_per_s": 500.0, "step": 40}
    return RunResult(variant, seed, Path(f"/runs/{variant}-s{seed}"), True, final, evals, train,
                     load if moe else [], [{"prompt": "ROMEO:", "text": "ROMEO: hello"}])


def fake_plan(tmp_path):
    from model.config import FFNConfig
    sweep = SweepConfig(name="fake", base="x.yaml", baseline="gelu", seeds=[0, 1],
                                variants={"gelu": {"overrides": GELU, "family": "dense"},
                                          "gelu-wide": {"overrides": GELU, "family": "dense", "match": False},
                                          "moe": {"overrides": {"model.ffn.type": "moe"}}})
    def info(name, ffn_type, total, active, ffn):
        cfg = SimpleNamespace(model=SimpleNamespace(ffn=FFNConfig(type=ffn_type, activation="gelu" if ffn_type == "dense" else "silu")))
        counts = {"total": total, "active": active, "ffn": ffn, "ffn_active": ffn, "non_embedding": total - 100}
        matched = sweep.variant_matched(name)
        on = ("active" if ffn_type == "moe" else "total") if matched else "-"
        return VariantInfo(name, cfg, counts, 6 * active, matched, on, False)
    variants = {"gelu": info("gelu", "dense", 1000, 1000, 600), "gelu-wide": info("gelu-wide", "dense", 1600, 1600, 1200),
                "moe": info("moe", "moe", 3000, 1010, 2600)}
    variants["moe"].rel_diff = 0.01
    runs = [SimpleNamespace(variant=v, seed=s, name=f"{v}-s{s}", reported=True, size=None) for v in variants
            for s in (0, 1)]
    return SimpleNamespace(sweep=sweep, variants=variants, runs=runs, all_runs=runs, ladder={None: variants},
                           sweep_path=tmp_path / "fake.yaml", base_path=tmp_path / "x.yaml", out_dir=tmp_path / "out",
                           selections={}, pending=0, seeds=[0, 1])


def test_summary_markdown_and_plots_from_synthetic_runs(tmp_path):
    from train.plots import make_plots
    plan = fake_plan(tmp_path)
    results = [fake_run("gelu", 0, 3.0), fake_run("gelu", 1, 3.2), fake_run("gelu-wide", 0, 2.8),
               fake_run("gelu-wide", 1, 2.9), fake_run("moe", 0, 2.9, moe=True)]  # moe seed 1 missing
    doc = summarize(plan, results, command="python scripts/compare.py --config fake.yaml")
    rows = {r["name"]: r for r in doc["variants"]}
    assert rows["gelu"]["val_loss_mean"] == pytest.approx(3.1) and rows["gelu"]["val_loss_std"] == pytest.approx(statistics.stdev([3.0, 3.2]))
    assert [r["name"] for r in doc["variants"]] == ["gelu-wide", "moe", "gelu"]  # sorted by rank
    assert (rows["gelu-wide"]["rank"], rows["moe"]["rank"], rows["gelu"]["rank"]) == (1, 2, 3)
    # gelu-wide - gelu per seed: -0.2, -0.3 -> mean -0.25 over the 2 common seeds: no verdict from 2 seeds
    assert rows["gelu-wide"]["delta_vs_baseline"] == pytest.approx(-0.25)
    assert rows["gelu-wide"]["verdict"] == "needs ≥ 3 seeds" and rows["moe"]["verdict"] == "needs ≥ 3 seeds"
    assert rows["moe"]["seeds"] == [0] and rows["moe"]["p_value"] is None  # one common seed: no test at all
    verdicts = {v["variant"]: v for v in doc["verdicts"]}
    assert sorted(verdicts) == ["gelu-wide", "moe"] and verdicts["gelu-wide"]["delta"] == pytest.approx(-0.25)
    assert doc["missing_runs"] == ["moe-s1"]
    assert (rows["moe"]["matched_on"], rows["gelu-wide"]["matched_on"]) == ("active", "-")
    md = render_markdown(doc)
    assert "-0.2500" in md and "needs ≥ 3 seeds" in md and "not matched" in md and "beyond noise" not in md
    assert "Incomplete" in md and "moe-s1" in md and "ROMEO: hello" in md and "3.1000 ± 0.1414" in md
    paths = make_plots(doc, results, plan.out_dir)
    names = sorted(p.name for p in paths)
    assert names == ["expert_load_moe.png", "final_loss_vs_ffn_params.png", "final_loss_vs_train_flops.png",
                     "train_loss_smoothed.png", "val_loss_vs_flops.png", "val_loss_vs_tokens.png",
                     "val_loss_vs_wallclock.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000 for p in paths)


# ---------------------------------------------------------------------------------------------------------------
# Planning with the real model: parameter match, dry-run

def dry_run(monkeypatch, capsys, *args) -> str:
    import importlib
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    script = importlib.import_module("compare")
    monkeypatch.setattr(compare, "train_run", lambda cfg: pytest.fail("--dry-run trained something"))
    monkeypatch.setattr(sys, "argv", ["scripts/compare.py", *args, "--dry-run"])
    assert script.main() == 0
    return capsys.readouterr().out


def test_param_mismatch_is_refused_with_one_line_and_exit_2(tmp_sweep_dir):
    fat = {**GELU, "model.ffn.d_ff": 512}  # the matched width at hidden 64 is 256
    path = sweep_file(tmp_sweep_dir, {"gelu": GELU, "fat": fat})
    proc = subprocess.run([sys.executable, "scripts/compare.py", "--config", str(path), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "parameter mismatch" in lines[0]
    assert "'fat'" in lines[0] and "tolerance 2%" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_sweep_dir / "runs").exists()
    # the same variant with an explicit opt-out is planned, and reported as not matched
    path = sweep_file(tmp_sweep_dir, {"gelu": GELU, "fat": {"overrides": fat, "match": False}})
    plan = plan_sweep(path)
    assert plan.variants["fat"].matched_on == "-" and plan.variants["fat"].counts["ffn"] == 2 * plan.variants["gelu"].counts["ffn"]


def test_ffn_params_are_matched_too_not_only_the_total(tmp_sweep_dir):
    # FFN params are about half of the tiny model, so a FFN 3% wider moves the total by ~1.5%: inside a 2% tolerance
    # on totals alone, refused once the FFN params are held to the same tolerance
    wide = {**GELU, "model.ffn.d_ff": 264}  # the matched width is 256
    plan = plan_sweep(sweep_file(tmp_sweep_dir, {"gelu": GELU, "wide": {"overrides": wide, "match": False}}))
    base, w = plan.variants["gelu"].counts, plan.variants["wide"].counts
    assert abs(w["total"] / base["total"] - 1) < 0.02 < w["ffn"] / base["ffn"] - 1
    with pytest.raises(ConfigError, match=r"'wide' has [\d,]+ ffn params vs [\d,]+ \(\+3\.1%\)") as info:
        plan_sweep(sweep_file(tmp_sweep_dir, {"gelu": GELU, "wide": wide}))
    assert "total params" not in str(info.value)
    # a block without FFN params (matched on total by depth) is held to the total only
    plan = plan_sweep(sweep_file(tmp_sweep_dir, {"gelu": GELU, "noffn": {"overrides": {"model.ffn.type": "none"}}},
                                 param_tolerance=0.9))
    assert plan.variants["noffn"].counts["ffn"] == 0 and plan.variants["noffn"].matched


def test_moe_is_matched_on_active_params_and_dry_run_trains_nothing(tmp_sweep_dir, monkeypatch, capsys):
    moe = {"model.ffn.type": "moe", "model.ffn.n_experts": 4, "model.ffn.top_k": 2}
    path = sweep_file(tmp_sweep_dir, {"gelu": GELU, "swiglu": SWIGLU, "moe": moe}, seeds=[0, 1])
    plan = plan_sweep(path)
    base, m = plan.variants["gelu"], plan.variants["moe"]
    assert (base.matched_on, m.matched_on) == ("total", "active")
    assert m.counts["total"] > 1.3 * base.counts["total"] and abs(m.rel_diff) <= 0.02
    out = dry_run(monkeypatch, capsys, "--config", str(path), "--variants", "swiglu,moe", "--seeds", "1")
    assert "runs planned now: swiglu-s1, moe-s1" in out and "gelu" in out and "reference only" in out
    assert "2 runs = 2 variants × 1 sizes × 1 seeds" in out
    assert "estimated time" in out and f"{m.counts['active']:,}" in out
    assert not (tmp_sweep_dir / "runs").exists()


SHIPPED = sorted((ROOT / "configs" / "compare").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_sweeps_pass_dry_run(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # runs/<name> would appear here if anything were written
    out = dry_run(monkeypatch, capsys, "--config", str(path))
    sweep, _ = load_sweep(path)
    assert all(name in out for name in sweep.variants) and "estimated time" in out
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# A tiny real sweep: 2 variants × 2 seeds, 6 steps each

def read_finals(sweep_dir: Path) -> dict:
    finals = {}
    for run_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        finals[run_dir.name] = [r for r in records if r["type"] == "final"][-1]
    return finals


def test_tiny_sweep_report_resume_and_skip(tmp_sweep_dir, monkeypatch):
    path = sweep_file(tmp_sweep_dir, {"gelu": GELU, "swiglu": SWIGLU}, seeds=[0, 1])
    run_sweep(plan_sweep(path), command="pytest")
    out = tmp_sweep_dir / "runs" / "tiny-sweep"
    finals = read_finals(out)
    assert sorted(finals) == ["gelu-s0", "gelu-s1", "swiglu-s0", "swiglu-s1"]
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert sorted(r["name"] for r in report["variants"]) == ["gelu", "swiglu"]
    for row in report["variants"]:
        mine = [finals[f"{row['name']}-s{s}"] for s in (0, 1)]
        loss, bpb = [f["val_loss"] for f in mine], [f["val_bpb"] for f in mine]
        assert row["seeds"] == [0, 1]
        assert row["val_loss_mean"] == pytest.approx(statistics.fmean(loss))
        assert row["val_loss_std"] == pytest.approx(statistics.stdev(loss))
        assert row["val_bpb_mean"] == pytest.approx(statistics.fmean(bpb))
        assert row["tokens"] == 6 * 8 * 64  # 6 steps × 8 sequences × 64 tokens
        assert row["params_total"] == mine[0]["params"] and row["params_active"] == mine[0]["active_params"]
        rates = []  # training throughput over all logging windows: tokens / optimizer-step seconds
        for s in (0, 1):
            recs = [json.loads(x) for x in (out / f"{row['name']}-s{s}" / "metrics.jsonl").read_text().splitlines()]
            recs = [r for r in recs if r["type"] == "train"]
            seconds = sum((b["tokens"] - a["tokens"]) / b["tok_per_s"] for a, b in zip([{"tokens": 0}] + recs, recs))
            rates.append(recs[-1]["tokens"] / seconds)
        assert row["tokens_per_s"] == pytest.approx(statistics.fmean(rates))
        assert f"{statistics.fmean(loss):.4f} ± {statistics.stdev(loss):.4f}" in md
    for name in ("val_loss_vs_tokens", "val_loss_vs_wallclock", "val_loss_vs_flops", "train_loss_smoothed"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert "ROMEO:" in md and report["missing_runs"] == []

    # Rerun: finished runs are skipped (the trainer is not called, weights untouched).
    weights = {p: p.stat().st_mtime_ns for p in out.glob("*/model.safetensors")}
    calls = []
    real_train = compare.train_run
    monkeypatch.setattr(compare, "train_run", lambda cfg: calls.append(cfg.run_name) or real_train(cfg))
    run_sweep(plan_sweep(path))
    assert calls == [] and weights == {p: p.stat().st_mtime_ns for p in weights}
    (out / "report.json").unlink()
    run_sweep(plan_sweep(path, variants=["swiglu"]), report_only=True)  # --report-only: rebuild, train nothing
    rebuilt = json.loads((out / "report.json").read_text())
    assert calls == [] and {r["name"]: r["val_loss_mean"] for r in rebuilt["variants"]} == \
        {r["name"]: r["val_loss_mean"] for r in report["variants"]}  # the baseline is read back for the deltas

    # A run without final metrics (killed after its last checkpoint) is resumed, and only that one.
    metrics = out / "swiglu-s1" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(line for line in lines if '"final"' not in line) + "\n")
    run_sweep(plan_sweep(path))
    assert calls == ["swiglu-s1"]
    assert read_finals(out)["swiglu-s1"]["val_loss"] == pytest.approx(finals["swiglu-s1"]["val_loss"])
    assert all(p.stat().st_mtime_ns == t for p, t in weights.items() if "swiglu-s1" not in str(p))

    # The same sweep directory with a different budget is refused instead of mixing results.
    with pytest.raises(ConfigError, match=r"train.max_steps=6 but this sweep asks for 8"):
        run_sweep(plan_sweep(path, ["train.max_steps=8"]))


def test_a_diverged_run_does_not_stop_the_sweep(tmp_sweep_dir, monkeypatch):
    from train.errors import UserError
    from train.trainer import TrainingDiverged
    path = sweep_file(tmp_sweep_dir, {"gelu": GELU, "swiglu": SWIGLU})
    calls = []

    def diverge(cfg):
        calls.append(cfg.run_name)
        raise TrainingDiverged("non-finite loss at step 3")
    monkeypatch.setattr(compare, "train_run", diverge)
    with pytest.raises(UserError, match=r"2 run\(s\) diverged \(gelu-s0, swiglu-s0\)"):
        run_sweep(plan_sweep(path))
    assert calls == ["gelu-s0", "swiglu-s0"]
    report = json.loads((tmp_sweep_dir / "runs" / "tiny-sweep" / "report.json").read_text())
    assert report["missing_runs"] == ["gelu-s0", "swiglu-s0"] and all(r["rank"] is None for r in report["variants"])


def test_routing_health_is_summarised_per_run_and_variant_and_rendered(tmp_path):
    from train.runs import routing_health
    recs = [{"type": "train", "step": 5, "moe_max_vio": [0.4, 0.2], "moe_drop_frac": [0.0, 0.1], "loss": 3.0},
            {"type": "train", "step": 10, "moe_max_vio": [0.2, 0.0], "moe_drop_frac": [0.0, 0.0], "loss": 2.0}]
    health = routing_health(recs)
    # layer means 0.3 then 0.1: end of training 0.1, averaged over the two windows 0.2
    assert health["moe_max_vio"] == pytest.approx({"final": 0.1, "mean": 0.2})
    assert health["moe_drop_frac"] == pytest.approx({"final": 0.0, "mean": 0.025})
    assert routing_health([{"type": "train", "step": 5, "loss": 3.0}]) == {}  # dense runs: nothing

    plan = fake_plan(tmp_path)
    results = [fake_run(v, s, 3.0 + s / 10) for v in ("gelu", "gelu-wide") for s in (0, 1)]
    for s, vio in ((0, 0.1), (1, 0.3)):
        run = fake_run("moe", s, 2.9, moe=True)
        run.health = {"moe_max_vio": {"final": vio, "mean": 2 * vio}}
        results.append(run)
    doc = summarize(plan, results)
    rows = {r["name"]: r for r in doc["variants"]}
    assert rows["moe"]["health"]["moe_max_vio"] == pytest.approx({"final": 0.2, "mean": 0.4})
    assert rows["gelu"]["health"] == {}
    md = render_markdown(doc)
    section = md.split("## MoE routing health")[1]
    assert "| moe | 2.9000 ± 0.0000 | 0.200 / 0.400 |" in section and "| gelu |" not in section
