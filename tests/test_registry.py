"""The FFN registry owns the FFN: a toy block defined and registered here — one class plus `register_ffn`, nothing
edited anywhere else — works in the summary, the trainer (with its per-step hook), a parameter-matched sweep plan,
and is refused by the exporter with its own reason. Unknown types are refused, never routed to another type's rules.
"""
import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from model.config import FFNConfig, MiniMindConfig, resolve_d_ff
from model.ffn import ACTIVATIONS, DENSE_ACTIVATIONS, FFNBlock, check_activation, dense_ffn_params, round_to
from model.model_minimind import MiniMindForCausalLM
from model.registry import FFN_REGISTRY, build_ffn, ffn_class, register_ffn, unregister_ffn
from train.config import ffn_label
from train.config_load import load_config
from train.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
D, L = 64, 2  # configs/tiny.yaml


# --- the README's recipe, verbatim in spirit: one class + one register_ffn call ------------------------------------
class ScaledFFN(FFNBlock):
    """W_down · (s ⊙ act(W_up · x)): a dense FFN with a learned scale per hidden unit."""

    steps = 0  # after_optimizer_step calls seen (the trainer must call it without knowing the type)

    def __init__(self, dim: int, d_ff: int, activation: str):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.up_proj = nn.Linear(dim, d_ff, bias=False)
        self.scale = nn.Parameter(torch.ones(d_ff))
        self.down_proj = nn.Linear(d_ff, dim, bias=False)

    @classmethod
    def width(cls, ffn, hidden_size: int) -> int:  # 2·d·F + F parameters = the dense FFN's 8·d²
        if ffn.d_ff is not None:
            return ffn.d_ff
        return round_to(dense_ffn_params(hidden_size) / (2 * hidden_size + 1), ffn.multiple_of)

    @classmethod
    def validate(cls, ffn) -> None:
        check_activation("activation", ffn.activation, DENSE_ACTIVATIONS, "a scaled FFN")

    @classmethod
    def hf_export(cls, ffn) -> dict:
        raise ValueError("model.ffn.type=toy: transformers has no FFN with a learned hidden scale")

    @classmethod
    def from_config(cls, cfg) -> "ScaledFFN":
        return cls(cfg.hidden_size, cls.width(cfg.ffn, cfg.hidden_size), cfg.ffn.activation)

    def forward(self, x_D: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.scale * self.act(self.up_proj(x_D)))

    def after_optimizer_step(self, skipped: bool = False) -> None:
        type(self).steps += 1


@pytest.fixture
def toy():
    register_ffn("toy", ScaledFFN)
    ScaledFFN.steps = 0
    yield ScaledFFN
    unregister_ffn("toy")


def toy_overrides(*extra):
    return ["model.ffn.type=toy", "model.ffn.activation=gelu", *extra]


# --- the toy everywhere ---------------------------------------------------------------------------------------------
def test_toy_config_width_label_and_validation(toy):
    ffn = FFNConfig(type="toy", activation="gelu")
    assert ffn_class("toy") is toy and build_ffn(MiniMindConfig(vocab_size=32, hidden_size=D, ffn=ffn)).scale.numel() \
        == resolve_d_ff(ffn, D) == round(8 * D * D / (2 * D + 1))
    assert ffn_label(ffn) == "toy-gelu" and toy.label(ffn) == "toy gelu"  # FFNBlock's defaults
    assert load_config(TINY, toy_overrides()).run_name == "toy-gelu-s0"
    with pytest.raises(ValueError, match="model.ffn.activation 'sigmoid' is not valid for a scaled FFN"):
        FFNConfig(type="toy", activation="sigmoid")
    with pytest.raises(ConfigError, match="model.ffn.activation 'sigmoid'"):
        load_config(TINY, ["model.ffn.type=toy", "model.ffn.activation=sigmoid"])


def test_toy_in_the_summary(toy, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from summary import print_human, summarize
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    info = summarize(load_config(TINY, toy_overrides()))
    dense = summarize(load_config(TINY, ["model.ffn.type=dense", "model.ffn.activation=gelu"]))
    F_ = info["ffn_d_ff"]
    assert info["ffn_type"] == "toy" and info["ffn_name"] == "toy gelu" and info["ffn_activation"] == "gelu"
    assert info["ffn_params"] == L * (2 * D * F_ + F_) == info["ffn_active_params"]
    assert abs(info["total_params"] / dense["total_params"] - 1) < 0.005
    assert info["flops_per_token"] > 0 and info["ffn_matched_on"] == "total"
    print_human(info)
    out = capsys.readouterr().out
    assert f"toy gelu, d_ff={F_}" in out
    assert any(line.split()[:2] == ["model.layers.*.ffn", f"{F_:,}"] for line in out.splitlines())  # the scale


def test_toy_trains_with_its_step_hook_and_export_refuses_it(toy, tiny_data_cache, tmp_path):
    from train.export_hf import ExportError, export_run
    from train.trainer import train

    run = tmp_path / "run"
    cfg = load_config(TINY, toy_overrides(f"data.cache_dir={tiny_data_cache}", "train.max_steps=3",
                                          f"train.out_dir={run}", "wandb.mode=disabled", "train.log_interval=1",
                                          "train.eval_interval=3", "train.ckpt_interval=3"))
    result = train(cfg)
    assert result["step"] == 3 and math.isfinite(result["val_loss"])
    assert toy.steps == 3 * L  # after_optimizer_step: once per optimizer step, on every layer's block
    assert "type: toy" in (run / "config.yaml").read_text()
    with pytest.raises(ExportError, match="no FFN with a learned hidden scale"):
        export_run(run, tmp_path / "hf")  # the class's own reason, before anything is written
    assert not (tmp_path / "hf").exists()


def test_toy_sweep_plan_is_parameter_matched(toy, tmp_path):
    from train.plan import plan_sweep

    sweep = tmp_path / "sweep.yaml"
    text = (f"name: toy-sweep\nbase: {TINY}\nbaseline: gelu\nparam_tolerance: 0.01\nvariants:\n"
            f"  gelu: {{model.ffn.type: dense, model.ffn.activation: gelu}}\n"
            f"  toy: {{model.ffn.type: toy, model.ffn.activation: gelu}}\n")
    sweep.write_text(text)
    plan = plan_sweep(sweep, out_dir=str(tmp_path / "runs"))
    info = plan.variants["toy"]
    assert info.matched and info.matched_on == "total"
    assert info.rel_diff is not None and abs(info.rel_diff) <= 0.01
    assert info.counts["ffn"] == L * (2 * D * resolve_d_ff(info.cfg.model.ffn, D) + resolve_d_ff(info.cfg.model.ffn, D))
    sweep.write_text(text.replace("{model.ffn.type: toy,", "{model.ffn.type: toy, model.ffn.d_ff: 16,"))
    with pytest.raises(ConfigError, match="parameter mismatch .*'toy'"):  # the match really uses the toy's count
        plan_sweep(sweep, out_dir=str(tmp_path / "runs"))


# --- unknown types and registration rules --------------------------------------------------------------------------
def test_unknown_type_is_refused_at_validation_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(TINY),
                           "model.ffn.type=nope"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "model.ffn.type: invalid choice 'nope'; valid: 'none', 'dense', 'glu', 'moe'" in lines[0]
    with pytest.raises(ValueError, match=r"^model.ffn.type: invalid choice 'nope'; valid: 'none', 'dense', 'glu', "
                                         r"'moe'$"):
        ffn_class("nope")


def test_unknown_type_is_refused_by_the_exporter():
    from train.export_hf import ExportError, hf_architecture

    model = MiniMindForCausalLM(MiniMindConfig(vocab_size=32, hidden_size=D, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, max_seq_len=8,
                                               ffn=FFNConfig(type="moe", n_experts=4)))
    model.config.ffn.type = "nope"
    with pytest.raises(ExportError, match="invalid choice 'nope'"):
        hf_architecture(model)


def test_register_ffn_refuses_what_would_not_work(toy):
    with pytest.raises(ValueError, match="already registered"):
        register_ffn("dense", ScaledFFN)
    register_ffn("toy", ScaledFFN)  # the same class again: fine
    with pytest.raises(TypeError, match="lacks .*width"):
        register_ffn("bare", nn.Linear)
    with pytest.raises(ValueError, match="lowercase"):
        register_ffn("My FFN", ScaledFFN)
    bad = type("BadMatch", (ScaledFFN,), {"matched_on": "flops"})
    with pytest.raises(TypeError, match="matched_on"):
        register_ffn("bad", bad)
    assert list(FFN_REGISTRY)[:4] == ["none", "dense", "glu", "moe"] and "bad" not in FFN_REGISTRY


def test_none_is_a_block_class_with_no_sub_layer():
    cls = ffn_class("none")
    ffn = FFNConfig(type="none")
    assert cls.width(ffn, D) == 0 and cls.slug(ffn) == "noffn" and cls.label(ffn) == "none"
    assert build_ffn(MiniMindConfig(vocab_size=32, hidden_size=D, ffn=ffn)) is None
    with pytest.raises(ValueError, match="attention-only"):
        cls.hf_export(ffn)


@pytest.mark.parametrize("name, ffn, label, slug", [
    ("dense", dict(activation="gelu"), "dense gelu", "dense-gelu"),
    ("glu", dict(activation="silu"), "glu silu", "glu-silu"),
    ("moe", dict(n_experts=8, top_k=2), "moe 8x2 glu-silu", "moe8x2-glu-silu"),
    ("moe", dict(n_experts=8, top_k=2, n_shared_experts=1), "moe 8x2+1s glu-silu", "moe8x2+1s-glu-silu"),
])
def test_labels_and_slugs(name, ffn, label, slug):
    cfg = FFNConfig(type=name, **ffn)
    assert ffn_class(name).label(cfg) == label and ffn_class(name).slug(cfg) == slug == ffn_label(cfg)


def test_blocks_do_not_import_the_config_or_the_registry():
    """Imports go one way, config -> registry -> blocks: no circle, and model/ never imports train/."""
    def runtime_imports(path: Path) -> set[str]:
        names = set()
        for node in ast.parse(path.read_text()).body:  # top level, outside `if TYPE_CHECKING:`
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    for block in ("ffn.py", "moe.py", "precision.py"):
        imported = runtime_imports(ROOT / "model" / block)
        assert not imported & {"model.config", "model.registry", "model.model_minimind"}, block
    for path in (ROOT / "model").glob("*.py"):
        assert not any(name.split(".")[0] == "train" for name in runtime_imports(path)), path.name
    assert "model.registry" in runtime_imports(ROOT / "model" / "config.py")
