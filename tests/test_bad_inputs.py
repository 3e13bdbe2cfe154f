"""The bad-input matrix: every case runs one of the real scripts in a fresh process and must fail the same way:
exit status 2, exactly one line on stderr (`error: ...`) naming the key or path and what is valid, no traceback,
no pre-existing file in the data cache or the run directory modified (sha256 of every file before and after; the
`.lock` file is left out: it holds the pid of the last process that took the lock), and nothing executed from a
config, an override or a checkpoint (a payload would create the file `pwned`).

Placeholders in arguments, files and expected words: {tmp} the case's own folder (also the working directory),
{data} a data cache and {run} a finished 4-step run (both built once per module and shared), {tiny} configs/tiny.yaml.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TRAIN = ("--config", "{tiny}", "data.cache_dir={data}", "train.out_dir={tmp}/new-run")  # a fresh run
PWNED = "{tmp}/pwned"


class Case(NamedTuple):
    args: tuple
    expect: tuple  # words the one error line must contain
    script: str = "train.py"
    files: dict = {}  # {name: text} written into {tmp} first
    setup: Optional[Callable[[Path, Path], None]] = None  # (run copy folder, tmp) -> None, after the files


def config(*body: str) -> dict:
    return {"bad.yaml": "extends: {tiny}\n" + "".join(line + "\n" for line in body)}


def copy_run(run: Path, tmp: Path) -> Path:
    shutil.copytree(run, tmp / "run-copy", ignore=shutil.ignore_patterns(".lock"))
    return tmp / "run-copy"


def damage_every_state_file(run: Path, tmp: Path) -> None:
    for state in (copy_run(run, tmp) / "checkpoints").glob("step_*/state.pt"):
        state.write_bytes(b"not a checkpoint")


def malicious_state_file(run: Path, tmp: Path) -> None:
    """The newest checkpoint's state.pt becomes a pickle whose loading would create {tmp}/pwned, with a manifest
    updated to match (anyone can recompute a sha256): only the safe loader stands in the way."""
    import torch

    class Exploit:
        def __reduce__(self):
            return open, (str(tmp / "pwned"), "w")

    newest = sorted((copy_run(run, tmp) / "checkpoints").glob("step_*"))[-1]
    torch.save({"step": 4, "payload": Exploit()}, newest / "state.pt")
    manifest = json.loads((newest / "manifest.json").read_text())
    data = (newest / "state.pt").read_bytes()
    manifest["files"]["state.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (newest / "manifest.json").write_text(json.dumps(manifest))


def exported_run(weights: Optional[bytes] = None, hidden_size: Optional[int] = None):
    """A run folder without checkpoints (config.yaml, tokenizer.json, model.safetensors), e.g. as copied by hand."""
    def setup(run: Path, tmp: Path) -> None:
        copy = copy_run(run, tmp)
        shutil.rmtree(copy / "checkpoints")
        if weights is not None:
            (copy / "model.safetensors").write_bytes(weights)
        if hidden_size is not None:
            text = (copy / "config.yaml").read_text()
            (copy / "config.yaml").write_text(text.replace("hidden_size: 64", f"hidden_size: {hidden_size}"))
    return setup


CASES = {
    # -- config files
    "yaml syntax error": Case(("--config", "{tmp}/bad.yaml"), ("YAML syntax error in {tmp}/bad.yaml:4",),
                              files=config("model:", "  hidden_size: 64", "  num_hidden_layers: 2: 3")),
    "unknown key": Case(("--config", "{tmp}/bad.yaml"), ("unknown key 'model.hiden_size'", "{tmp}/bad.yaml",
                                                         "did you mean 'hidden_size'"),
                        files=config("model:", "  hiden_size: 64")),
    "wrong type": Case(("--config", "{tmp}/bad.yaml"), ("train.max_steps", "valid integer", "'many'", "bad.yaml"),
                       files=config("train:", "  max_steps: many")),
    "invalid choice": Case(("--config", "{tmp}/bad.yaml"), ("model.ffn.type", "'mlp'", "'dense'", "'glu'", "'moe'"),
                           files=config("model:", "  ffn:", "    type: mlp")),
    "heads do not divide hidden size": Case(("--config", "{tmp}/bad.yaml"), (
        "model.hidden_size=64 must be divisible by model.num_attention_heads=5",),
        files=config("model:", "  num_attention_heads: 5")),
    "negative step budget": Case(("--config", "{tmp}/bad.yaml"), ("train.max_steps must be > 0 or null, got -5",),
                                 files=config("train:", "  max_steps: -5")),
    "zero token budget": Case(("--config", "{tmp}/bad.yaml"), ("train.max_tokens must be > 0 or null, got 0",),
                              files=config("train:", "  max_tokens: 0")),
    "top_k > n_experts": Case(("--config", "{tmp}/bad.yaml"), ("model.ffn.top_k", "between 1 and n_experts=4",
                                                               "got 8"),
                              files=config("model:", "  ffn: {type: moe, n_experts: 4, top_k: 8}")),
    "non-finite number in a file": Case(("--config", "{tmp}/bad.yaml"), (
        "model.rope_theta must be a finite number, got inf ({tmp}/bad.yaml)",),
        files=config("model:", "  rope_theta: .inf")),
    "interpolation in a file (reads the environment)": Case(("--config", "{tmp}/bad.yaml"), (
        "name: interpolations (${...}) are not supported ({tmp}/bad.yaml)",), files=config("name: ${oc.env:PATH}")),
    "extends cycle": Case(("--config", "{tmp}/a.yaml"), ("'extends' cycle", "{tmp}/a.yaml -> {tmp}/b.yaml -> "
                                                         "{tmp}/a.yaml"),
                          files={"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"}),
    "missing extended file": Case(("--config", "{tmp}/bad.yaml"), ("extended file not found: {tmp}/nope.yaml",),
                                  files={"bad.yaml": "extends: nope.yaml\n"}),
    "config file not found": Case(("--config", "{tmp}/missing.yaml"), ("config file not found: {tmp}/missing.yaml",)),
    "yaml python tag (code execution)": Case(
        ("--config", "{tmp}/bad.yaml"), ("{tmp}/bad.yaml:3", "python/object/apply:os.system"),
        files=config("train:", f"  out_dir: !!python/object/apply:os.system ['touch {PWNED}']")),
    # -- command-line overrides
    "override without =": Case((*TRAIN, "train.max_steps"), ("malformed override 'train.max_steps'",
                                                             "expected dotted.key=value")),
    "override unknown key": Case((*TRAIN, "train.max_stesp=10"), ("unknown key 'train.max_stesp' (command line)",
                                                                  "did you mean 'max_steps'")),
    "override invalid choice": Case((*TRAIN, "train.dtype=fp8"), ("train.dtype: invalid choice 'fp8' (command line)",
                                                                  "'bf16'", "'fp32'")),
    "override python code (code execution)": Case(
        (*TRAIN, "train.max_steps=__import__('os').system('touch pwned')"),
        ("train.max_steps", "valid integer", "__import__('os').system('touch pwned')", "(command line)")),
    "override yaml tag (code execution)": Case(
        (*TRAIN, "train.seed=!!python/object/apply:os.system [touch pwned]"),
        ("override 'train.seed=!!python/object/apply:os.system [touch pwned]'", "cannot parse the value")),
    "override nan": Case((*TRAIN, "train.lr=nan"), ("train.lr must be a finite number, got nan (command line)",)),
    "override inf": Case((*TRAIN, "model.ffn.aux_loss_coef=.inf"), (
        "model.ffn.aux_loss_coef must be a finite number, got inf (command line)",)),
    "override interpolation": Case((*TRAIN, "name=${oc.env:PATH}"), (
        "name: interpolations (${...}) are not supported (command line)",)),
    # -- data
    "missing corpus file": Case(("--config", "{tiny}", "data.cache_dir={data}", "data.corpus=local",
                                 "data.path={tmp}/missing.txt"), ("data.path: file not found: {tmp}/missing.txt",),
                                script="prepare_data.py"),
    "empty corpus": Case((*TRAIN, "data.corpus=local", "data.path={tmp}/empty.txt"),
                         ("{tmp}/empty.txt", "no non-empty documents (text column 'text')"),
                         files={"empty.txt": ""}),
    "wrong text column": Case((*TRAIN, "data.corpus=local", "data.path={tmp}/docs.jsonl"),
                              ("no text column 'text' (data.text_column); columns: body",),
                              files={"docs.jsonl": "".join(json.dumps({"body": f"doc {i}"}) + "\n"
                                                           for i in range(10))}),
    "binary garbage": Case(("--config", "{tiny}", "data.cache_dir={data}", "data.corpus=local",
                            "data.path={tmp}/corpus.parquet"), ("data.path: cannot read {tmp}/corpus.parquet as "
                                                                "parquet",),
                           script="prepare_data.py", setup=lambda run, tmp: (tmp / "corpus.parquet").write_bytes(
                               bytes(range(256)) * 64)),
    "tokenizer vocab too small": Case((*TRAIN, "data.tokenizer.vocab_size=100"), (
        "data.tokenizer.vocab_size=100 is too small", "at least 256 byte tokens + 1 special tokens",)),
    "model vocab smaller than the tokenizer": Case((*TRAIN, "model.vocab_size=300"), (
        "model.vocab_size=300 is smaller than the tokenizer's vocabulary (512)", "set it to >= 512 or null")),
    "tokenizer file of the wrong type": Case(
        ("--config", "{tiny}", "data.cache_dir={data}", "data.tokenizer.path={tmp}/tokenizer.json"),
        ("cannot load tokenizer {tmp}/tokenizer.json",), script="prepare_data.py",
        files={"tokenizer.json": "vocab: [this is yaml, not a tokenizer]\n"}),
    # -- checkpoints and run directories
    "resume=true without a checkpoint": Case((*TRAIN, "train.resume=true"), (
        "train.resume=true but {tmp}/new-run has no checkpoint to resume from",)),
    "resume with another model shape": Case(
        ("--config", "{tiny}", "data.cache_dir={data}", "train.out_dir={run}", "model.hidden_size=32",
         "train.max_steps=8"), ("model.hidden_size=32 differs from the checkpoint in {run} (model.hidden_size=64)",)),
    "resume with another learning rate": Case(
        ("--config", "{tiny}", "data.cache_dir={data}", "train.out_dir={run}", "train.lr=0.001", "train.max_steps=8"),
        ("resuming {run} would change the run: train.lr=0.001 (checkpoint: 0.003);",)),
    "every checkpoint damaged": Case(
        ("--config", "{tiny}", "data.cache_dir={data}", "train.out_dir={tmp}/run-copy", "train.max_steps=8"),
        ("no usable checkpoint in {tmp}/run-copy/checkpoints", "state.pt has 16 bytes"),
        setup=damage_every_state_file),
    "malicious state.pt (code execution)": Case(
        ("--config", "{tiny}", "data.cache_dir={data}", "train.out_dir={tmp}/run-copy", "train.max_steps=8"),
        ("refusing to load {tmp}/run-copy/checkpoints/step_000004/state.pt",
         "not a plain tensor/primitive state file"), setup=malicious_state_file),
    "out_dir is a file": Case((*TRAIN[:-1], "train.out_dir={tmp}/empty.txt"), (
        "train.out_dir {tmp}/empty.txt is a file, not a directory",), files={"empty.txt": ""}),
    "missing run directory": Case(("--run", "{tmp}/no-such-run", "--prompt", "ROMEO:"), (
        "run directory not found: {tmp}/no-such-run",), script="generate.py"),
    "weights file of the wrong type": Case(("--run", "{tmp}/run-copy"), (
        "cannot read weights {tmp}/run-copy/model.safetensors",), script="evaluate.py",
        setup=exported_run(weights=b"<html>not found</html>")),
    "weights of another model shape": Case(("--run", "{tmp}/run-copy", "--prompt", "ROMEO:"), (
        "weights in {tmp}/run-copy/model.safetensors do not fit the model", "size mismatch"), script="generate.py",
        setup=exported_run(hidden_size=32)),
}


@pytest.fixture(scope="module")
def world(tiny_data_cache, tmp_path_factory) -> dict:
    """A data cache and a finished 4-step run (checkpoints at steps 2 and 4) that no case may change."""
    from train.config_load import load_config
    from train.trainer import train

    root = tmp_path_factory.mktemp("bad-inputs")
    shutil.copytree(tiny_data_cache, root / "data")
    train(load_config(TINY, [f"data.cache_dir={root / 'data'}", f"train.out_dir={root / 'run'}", "train.max_steps=4",
                             "train.ckpt_interval=2", "train.eval_interval=4", "train.sample_max_new_tokens=2",
                             "train.peak_flops=1e9", "train.dtype=fp32"]))
    return {"data": root / "data", "run": root / "run", "tiny": TINY}


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_fails_with_one_line_and_changes_nothing(world, tmp_path, name):
    case = CASES[name]
    places = {**world, "tmp": tmp_path}

    def fill(text: str) -> str:
        for key, value in places.items():
            text = text.replace("{" + key + "}", str(value))
        return text

    for file, text in case.files.items():
        (tmp_path / file).write_text(fill(text))
    if case.setup:
        case.setup(world["run"], tmp_path)
    before = {key: digest(places[key]) for key in ("data", "run", "tmp")}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / case.script), *map(fill, case.args)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                               "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("error: ")
    for word in map(fill, case.expect):
        assert word in lines[0], (word, lines[0])
    assert digest(world["data"]) == before["data"]  # nothing added, changed or removed
    assert digest(world["run"]) == before["run"]
    after = digest(tmp_path)
    assert {k: after.get(k) for k in before["tmp"]} == before["tmp"]  # the case's own files are unchanged too
    assert not (tmp_path / "pwned").exists()


def test_no_code_path_can_execute_config_or_checkpoint_text():
    """A static guard for the promises above: no shell, no eval/exec, YAML only through safe_load, no pickle, and
    every torch.load with weights_only=True, anywhere in the product code (model/, train/, scripts/)."""
    import ast

    problems = []
    for path in sorted(p for folder in ("model", "train", "scripts") for p in (ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
            if (isinstance(func, ast.Name) and name in ("eval", "exec")) or name == "literal_eval" \
                    or (owner == "os" and name in ("system", "popen")) or keywords.get("shell") is True \
                    or (owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all")) \
                    or (owner in ("pickle", "dill") and name in ("load", "loads")) \
                    or (owner == "torch" and name == "load" and keywords.get("weights_only") is not True):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not problems, problems
