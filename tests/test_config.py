"""Config loading: bad files and overrides give one-line errors naming the key and the file; scripts/summary.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import FFNConfig, MiniMindConfig
from train.config_load import load_config
from train.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "base.yaml"

# (YAML body, words the one-line message must contain besides the file name)
BAD_FILES = {
    "unknown key": ("model:\n  hiden_size: 64\n", ["model.hiden_size", "did you mean 'hidden_size'"]),
    "wrong type": ("model:\n  hidden_size: big\n", ["model.hidden_size", "integer", "'big'"]),
    "invalid choice": ("model:\n  ffn:\n    type: mlp\n", ["model.ffn.type", "'mlp'", "'dense'", "'glu'", "'moe'"]),
    "hidden vs heads": ("model:\n  hidden_size: 100\n  num_attention_heads: 8\n",
                        ["model.hidden_size=100", "model.num_attention_heads=8"]),
    "heads vs kv heads": ("model:\n  num_attention_heads: 8\n  num_key_value_heads: 3\n",
                          ["model.num_attention_heads=8", "model.num_key_value_heads=3"]),
    "d_ff <= 0": ("model:\n  ffn:\n    d_ff: 0\n", ["model.ffn.d_ff", "0"]),
    "top_k > n_experts": ("model:\n  ffn:\n    type: moe\n    n_experts: 4\n    top_k: 5\n",
                          ["model.ffn.top_k", "n_experts=4", "5"]),
    "activation not for dense": ("model:\n  ffn:\n    type: dense\n    activation: sigmoid\n",
                                 ["model.ffn.activation", "sigmoid", "relu2"]),
    "yaml syntax error": ("model:\n  hidden_size: 64\n  num_hidden_layers: 2: 3\n", [":3", "YAML syntax error"]),
    "top level not a mapping": ("- a\n- b\n", ["top level must be a mapping"]),
}


def check_one_line(err: ConfigError, *words: str) -> None:
    msg = str(err)
    assert "\n" not in msg
    for word in words:
        assert word in msg, (word, msg)


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_config_files(tmp_path, name):
    body, words = BAD_FILES[name]
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    check_one_line(info.value, str(path), *words)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    check_one_line(info.value, "not found", str(tmp_path / "nope.yaml"))


def test_extends_cycle_and_missing_parent(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nmodel:\n  hidden_size: 64\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "a.yaml")
    check_one_line(info.value, "cycle", "a.yaml", "b.yaml")
    (tmp_path / "c.yaml").write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml")
    check_one_line(info.value, str(tmp_path / "c.yaml"), "gone.yaml", "not found")


def test_extends_and_overrides_merge(tmp_path):
    (tmp_path / "child.yaml").write_text(f"extends: {BASE}\nmodel:\n  hidden_size: 64\n")
    cfg = load_config(tmp_path / "child.yaml", ["model.ffn.type=moe", "model.ffn.n_experts=4", "model.ffn.top_k=1"])
    assert cfg.model.hidden_size == 64 and cfg.model.num_hidden_layers == 4  # from the base
    assert (cfg.model.ffn.type, cfg.model.ffn.n_experts, cfg.model.ffn.top_k) == ("moe", 4, 1)


@pytest.mark.parametrize("override,words", [
    ("model.ffn.type", ["malformed override", "model.ffn.type"]),
    ("model..x=1", ["malformed override"]),
    ("model.ffn.top_k=abc", ["model.ffn.top_k", "command line"]),
    ("model.ffn.tpye=moe", ["model.ffn.tpye", "command line", "did you mean 'type'"]),
    ("model.hidden_size=[1,", ["model.hidden_size", "cannot parse"]),
])
def test_bad_overrides(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(BASE, [override])
    check_one_line(info.value, *words)


def test_python_built_configs_are_checked_too():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        MiniMindConfig(num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(ValueError, match="top_k"):
        FFNConfig(type="moe", n_experts=2, top_k=3)


def run_summary(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "summary.py"), "--config", str(BASE), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_summary_bad_override_exits_2_with_one_line():
    proc = run_summary("model.ffn.type=mlp")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "model.ffn.type" in lines[0]
    assert proc.stdout == ""


def test_summary_json_and_one_override_flip_keeps_params_matched():
    flipped = run_summary("model.ffn.type=dense", "model.ffn.activation=gelu", "--json")
    assert flipped.returncode == 0, flipped.stderr
    dense = json.loads(flipped.stdout)
    for key in ("total_params", "active_params", "non_embedding_params", "flops_per_token", "ffn_type", "ffn_d_ff",
                "ffn_params", "ffn_param_share", "ffn_flop_share"):
        assert key in dense
    sys.path.insert(0, str(ROOT / "scripts"))  # the unflipped default in-process (one subprocess is enough)
    from summary import summarize
    glu = summarize(load_config(BASE))
    assert glu["ffn_type"] == "glu" and glu["vocab_size"] == 2048  # null in base.yaml: the tokenizer's size
    assert dense["ffn_type"] == "dense" and dense["ffn_d_ff"] == 4 * dense["hidden_size"]
    assert abs(dense["total_params"] / glu["total_params"] - 1) < 0.01
    assert abs(dense["flops_per_token"] / glu["flops_per_token"] - 1) < 0.01


# ----------------------------------------------------------------------------------------------------------------
# Config values are data: no interpolation is ever resolved

SECRET = "s3cr3t-value-that-must-not-leak"


@pytest.mark.parametrize("body, key", [
    ("name: ${oc.env:SECRET}\n", "name"),
    ("model:\n  hidden_size: 64\ntrain:\n  seed: ${model.hidden_size}\n", "train.seed"),
    ("train:\n  sample_prompts: [ok, 'x ${oc.env:SECRET,default}']\n", "train.sample_prompts[1]"),
])
def test_interpolations_in_files_are_refused_not_resolved(tmp_path, monkeypatch, body, key):
    monkeypatch.setenv("SECRET", SECRET)
    (tmp_path / "parent.yaml").write_text(body)
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "child.yaml")
    check_one_line(info.value, key + ":", "interpolations", "not supported", str(tmp_path / "parent.yaml"))
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("override, key", [("name=${oc.env:SECRET}", "name"),
                                           ("wandb.tags=[a, '${oc.env:SECRET}']", "wandb.tags[1]"),
                                           ("train.out_dir=runs/${name}", "train.out_dir")])
def test_interpolations_in_overrides_are_refused_not_resolved(monkeypatch, override, key):
    monkeypatch.setenv("SECRET", SECRET)
    with pytest.raises(ConfigError) as info:
        load_config(BASE, [override])
    check_one_line(info.value, key + ":", "interpolations", "not supported", "command line")
    assert SECRET not in str(info.value)


def test_validate_config_refuses_interpolations_from_elsewhere(monkeypatch):
    from train.config_load import validate_config

    monkeypatch.setenv("SECRET", SECRET)
    with pytest.raises(ConfigError) as info:
        validate_config({"wandb": {"notes": "${oc.env:SECRET}"}}, source="run/config.yaml")
    check_one_line(info.value, "wandb.notes:", "interpolations", "run/config.yaml")
    assert SECRET not in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# Every number is finite

@pytest.mark.parametrize("override", ["train.lr=nan", "train.grad_clip=inf", "model.rope_theta=.inf",
                                      "model.ffn.aux_loss_coef=nan", "train.lr=.NaN", "wandb.init_timeout=-.inf",
                                      "data.val_fraction=nan", "model.dropout=nan", "train.peak_flops=Infinity",
                                      "model.ffn.capacity_factor=.inf", "train.seed=.inf", "train.max_steps=.nan"])
def test_non_finite_numbers_are_refused(override):
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError) as info:
        load_config(BASE, [override])
    check_one_line(info.value, key, "finite number", "command line")


@pytest.mark.parametrize("body, key", [("train:\n  lr: .nan\n", "train.lr"),
                                       ("model:\n  rope_theta: .inf\n", "model.rope_theta"),
                                       ("model:\n  ffn:\n    type: moe\n    z_loss_coef: -.inf\n",
                                        "model.ffn.z_loss_coef")])
def test_non_finite_numbers_in_files_are_refused(tmp_path, body, key):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    check_one_line(info.value, f"{key} must be a finite number", str(path))


def test_strings_that_spell_nan_stay_strings_and_python_assignment_is_checked():
    from pydantic import ValidationError

    from train.config import TrainConfig

    cfg = load_config(BASE, ["name=nan", "wandb.notes=inf"])
    assert (cfg.name, cfg.wandb.notes) == ("nan", "inf")
    with pytest.raises(ValidationError, match="finite number"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ValidationError, match="finite number"):
        cfg.train.grad_clip = float("inf")
