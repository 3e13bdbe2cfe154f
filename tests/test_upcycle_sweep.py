"""Starting from a parent run: `train.init_from` (the same model, trained on, train/upcycle.py) and a sweep's
`parent:` (train/sweep.py, train/plan.py, train/compare.py): the parent trains first, once per seed, and variants name
it with the value `parent` (continue vs upcycle at equal extra tokens, configs/compare/upcycle.yaml)."""
import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

import train.compare as compare
from test_compare import tiny_base as compare_tiny_base, write_yaml
from train import checkpoint as ck
from train.compare import run_sweep
from train.config_load import load_config
from train.errors import ConfigError
from train.plan import plan_sweep
from train.runtime import setup_runtime
from train.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
CONT = {"model.ffn.type": "glu", "model.ffn.activation": "silu", "model.ffn.d_ff": 128, "train.init_from": "parent"}
UP = {"model.ffn.type": "moe", "model.ffn.n_experts": 4, "model.ffn.top_k": 2, "model.ffn.expert_type": "glu",
      "model.ffn.expert_activation": "silu", "model.ffn.d_ff": 64, "model.ffn.upcycle_from": "parent"}
PARENT = {"overrides": {"model.ffn.type": "glu", "model.ffn.activation": "silu", "model.ffn.d_ff": 128,
                        "train.max_steps": 4}}


def tiny_base(tmp: Path, cache: Path) -> Path:
    """tests/test_compare.py's tiny base (two plays, a 320-token vocabulary, seq 64) at 3 steps."""
    return compare_tiny_base(tmp, cache, max_steps=3, warmup_steps=1, log_interval=1, eval_tokens=1024,
                             sample_max_new_tokens=4)


def sweep_file(tmp: Path, variants: dict, **extra) -> Path:
    data = {"name": "up-sweep", "base": "tiny-base.yaml", "out_dir": str(tmp / "runs" / "up-sweep"), "seeds": [0],
            "baseline": "cont", "variants": variants, **extra}
    return write_yaml(tmp / "sweep.yaml", data)


@pytest.fixture
def tmp_sweep_dir(tmp_path, tmp_path_factory):
    tiny_base(tmp_path, tmp_path_factory.getbasetemp() / "compare-data")
    return tmp_path


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory):
    """(base config, a finished 3-step GLU run of it)."""
    tmp = tmp_path_factory.mktemp("init-from")
    base = tiny_base(tmp, tmp_path_factory.getbasetemp() / "compare-data")
    train(load_config(base, ["model.ffn.d_ff=128", f"train.out_dir={tmp / 'parent'}"]))
    return base, tmp / "parent"


def child_config(parent_run, tmp_path, *overrides):
    base, parent = parent_run
    return load_config(base, ["model.ffn.d_ff=128", f"train.out_dir={tmp_path / 'child'}",
                              f"train.init_from={parent}", *overrides])


# ---------------------------------------------------------------------------------------------------------------
# train.init_from

def test_init_from_starts_with_exactly_the_parents_weights(parent_run, tmp_path):
    from safetensors.torch import load_file
    cfg = child_config(parent_run, tmp_path)
    rt = setup_runtime("cpu", "fp32", 1)
    trainer = Trainer(cfg, rt)  # built as train() builds it: optimizer ready, no step taken
    try:
        assert trainer.step == 0
        want = load_file(str(parent_run[1] / ck.WEIGHTS))
        got = trainer.model.state_dict()
        assert set(want) <= set(got)
        for name, t in want.items():
            assert torch.equal(got[name], t), name
        fresh = [s for s in trainer.optimizer.state.values() if s]
        assert fresh == []  # a fresh optimizer: no moments carried over
    finally:
        trainer.close(failed=True)
        rt.close()


def one_line_error(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_init_from_refusals_are_one_line_naming_the_key(parent_run, tmp_path):
    base, parent = parent_run
    unfinished = tmp_path / "unfinished"
    shutil.copytree(parent, unfinished)
    lines = (unfinished / "metrics.jsonl").read_text().splitlines()
    (unfinished / "metrics.jsonl").write_text("\n".join(x for x in lines if '"final"' not in x) + "\n")
    with pytest.raises(ConfigError) as e:
        train(child_config(parent_run, tmp_path, f"train.init_from={unfinished}"))
    one_line_error(e, "train.init_from", "not a finished run")

    with pytest.raises(ConfigError) as e:
        train(child_config(parent_run, tmp_path, "model.num_hidden_layers=1", "model.ffn.activation=gelu"))
    one_line_error(e, "train.init_from", "model.ffn.activation, model.num_hidden_layers")

    with pytest.raises(ConfigError) as e:
        child_config(parent_run, tmp_path, "model.ffn.type=moe", f"model.ffn.upcycle_from={parent}")
    one_line_error(e, "train.init_from", "model.ffn.upcycle_from", "valid: one of them")

    other_tokenizer = tmp_path / "other-tokenizer"
    shutil.copytree(parent, other_tokenizer)
    (other_tokenizer / "tokenizer.json").write_text('{"tokenizer": "another"}')
    with pytest.raises(ConfigError) as e:
        train(child_config(parent_run, tmp_path, f"train.init_from={other_tokenizer}"))
    one_line_error(e, "train.init_from", "differs from this run's tokenizer")


# ---------------------------------------------------------------------------------------------------------------
# A sweep's parent: planning (no training)

def test_parent_runs_are_planned_and_substituted(tmp_sweep_dir, monkeypatch, capsys):
    path = sweep_file(tmp_sweep_dir, {"cont": CONT, "up": UP, "scratch": {**UP, "model.ffn.upcycle_from": None}},
                      parent=PARENT, seeds=[0, 1])
    plan = plan_sweep(path)
    out = tmp_sweep_dir / "runs" / "up-sweep"
    assert [p.name for p in plan.parents] == ["parent-s0", "parent-s1"]
    assert all(not p.reported and not p.tuning for p in plan.parents)
    assert len(plan.all_runs) == 2 + 3 * 2  # the parents count in the plan
    assert plan.parents[0].cfg.train.max_steps == 4 and plan.runs[0].cfg.train.max_steps == 3  # extra tokens: 3 steps
    for run in plan.runs:
        mine = str(out / f"parent-s{run.seed}")
        if run.variant == "cont":
            assert run.cfg.train.init_from == mine and run.cfg.model == plan.parents[run.seed].cfg.model
        elif run.variant == "up":
            assert run.cfg.model.ffn.upcycle_from == mine and run.cfg.train.init_from is None
        else:
            assert run.cfg.model.ffn.upcycle_from is None and run.cfg.train.init_from is None
    assert plan.variants["up"].matched_on == "active" and abs(plan.variants["up"].rel_diff) < 0.02

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    script = importlib.import_module("compare")
    monkeypatch.setattr(compare, "train_run", lambda cfg: pytest.fail("--dry-run trained something"))
    monkeypatch.setattr(sys, "argv", ["scripts/compare.py", "--config", str(path), "--dry-run"])
    assert script.main() == 0
    text = capsys.readouterr().out
    assert "+ 2 parent runs, trained first" in text and "parent-s0, parent-s1" in text
    assert not out.exists()


@pytest.mark.parametrize("variants, extra, cli, needles", [
    ({"cont": CONT}, {}, [], ["variant 'cont'", "train.init_from", "needs a `parent:` section"]),
    ({"cont": {**CONT, "train.init_from": None}, "up": UP}, {}, [], ["variant 'up'", "model.ffn.upcycle_from"]),
    ({"cont": CONT}, {"parent": {"overrides": {**PARENT["overrides"], "train.init_from": "/x"}}}, [],
     ["parent: may not set 'train.init_from'"]),
    ({"cont": CONT}, {"parent": {"overrides": {"train.lr": 1e-3, "data.max_bytes": 10}}}, [],
     ["parent: may not set 'data.max_bytes'", "train.max_steps"]),
    ({"cont": CONT}, {"parent": PARENT, "overrides": {"train.init_from": "parent"}}, [],
     ["overrides: train.init_from=parent is for variant overrides only"]),
    ({"cont": CONT}, {"parent": PARENT}, ["model.ffn.upcycle_from=parent"], ["command line"]),
    ({"cont": CONT}, {"parent": PARENT, "sizes": {"xs": {"model.hidden_size": 32}}}, [],
     ["parent: does not go with sizes"]),
    ({"cont": {**CONT, "model.ffn.d_ff": 96}}, {"parent": PARENT}, [],
     ["variant 'cont'", "train.init_from=parent needs the parent's model", "model.ffn.d_ff"]),
    ({"cont": CONT, "up": {**UP, "model.ffn.d_ff": 48, "match": False}}, {"parent": PARENT}, [],
     ["variant 'up'", "model.ffn.upcycle_from", "must divide the parent's FFN width 128"]),
])
def test_parent_refusals_are_one_line(tmp_sweep_dir, variants, extra, cli, needles):
    path = sweep_file(tmp_sweep_dir, variants, **extra)
    with pytest.raises(ConfigError) as e:
        plan_sweep(path, cli)
    one_line_error(e, *needles)


# ---------------------------------------------------------------------------------------------------------------
# A tiny sweep end to end: parent-s0 (4 steps), then cont and up (3 extra steps each)

def test_sweep_trains_the_parent_first_then_continues_and_upcycles_it(tmp_sweep_dir, monkeypatch):
    path = sweep_file(tmp_sweep_dir, {"cont": CONT, "up": UP}, parent=PARENT)
    calls = []
    real_train = compare.train_run
    monkeypatch.setattr(compare, "train_run", lambda cfg: calls.append(cfg.run_name) or real_train(cfg))
    plan = plan_sweep(path)
    assert len(plan.all_runs) == 3
    doc = run_sweep(plan, command="pytest")
    assert calls == ["parent-s0", "cont-s0", "up-s0"]
    out = tmp_sweep_dir / "runs" / "up-sweep"
    parent = out / "parent-s0"
    finals = {}
    for name in calls:
        recs = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
        finals[name] = [r for r in recs if r["type"] == "final"][-1]
    assert (finals["parent-s0"]["step"], finals["cont-s0"]["step"], finals["up-s0"]["step"]) == (4, 3, 3)
    cont_cfg = yaml.safe_load((out / "cont-s0" / "config.yaml").read_text())
    up_cfg = yaml.safe_load((out / "up-s0" / "config.yaml").read_text())
    assert cont_cfg["train"]["init_from"] == str(parent) and up_cfg["model"]["ffn"]["upcycle_from"] == str(parent)
    report = json.loads((out / "report.json").read_text())
    assert sorted(r["name"] for r in report["variants"]) == ["cont", "up"] and report["missing_runs"] == []
    assert report["parent"]["runs"] == [str(parent)]
    assert report["parent"]["val_loss_mean"] == pytest.approx(finals["parent-s0"]["val_loss"])
    assert doc["parent"]["finished"] == 1 and "parent-s0" in (out / "report.md").read_text()

    calls.clear()
    run_sweep(plan_sweep(path))  # the same command again: everything finished, the parent included
    assert calls == []


class FakeLauncher:
    """A non-waiting launcher (--no-wait) that records what it is asked to submit; nothing trains."""
    waits = False

    def __init__(self):
        self.submitted_names: list[str] = []

    def train(self, todo):
        self.submitted_names += [run.name for _, run in todo]
        return {}

    def submitted(self, name):
        return name in self.submitted_names

    def ended_failures(self, runs):
        return {}


def test_no_wait_submits_the_parents_first_then_the_rest(tmp_sweep_dir):
    path = sweep_file(tmp_sweep_dir, {"cont": CONT, "up": UP}, parent=PARENT)
    launcher = FakeLauncher()
    assert run_sweep(plan_sweep(path), launcher=launcher) is None
    assert launcher.submitted_names == ["parent-s0"]
    collector = FakeLauncher()
    run_sweep(plan_sweep(path), launcher=collector, collect=True)  # parent unfinished: --collect submits nothing
    assert collector.submitted_names == []
    parent = tmp_sweep_dir / "runs" / "up-sweep" / "parent-s0"  # as if its job had finished
    parent.mkdir(parents=True)
    (parent / "metrics.jsonl").write_text(json.dumps({"type": "final", "step": 4, "val_loss": 5.0}) + "\n")
    run_sweep(plan_sweep(path), launcher=collector, collect=True)
    assert collector.submitted_names == ["cont-s0", "up-s0"]
    again = FakeLauncher()
    assert run_sweep(plan_sweep(path), launcher=again) is None  # or the same --no-wait command again
    assert again.submitted_names == ["cont-s0", "up-s0"]
