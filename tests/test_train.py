"""End-to-end training on the tiny config (CPU, fp32, a Shakespeare slice): learning, exact resume, DDP, wandb
offline, metrics, NaN guard and the run-directory rules."""
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.checkpoint import list_checkpoints, load_run, verify_checkpoint
from train.rundir import RunLock
from train.config_load import load_config
from train.errors import CheckpointError, ConfigError
from train.runs import read_metrics
from train.tracking import read_wandb_history
from train.trainer import TrainingDiverged, TrainingInterrupted, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
COMPARED = ("type", "step", "tokens", "loss", "lr", "grad_norm", "val_loss", "val_bpb")  # not timings


def tiny(cache, out_dir, *overrides):
    return load_config(TINY, [f"data.cache_dir={cache}", f"train.out_dir={out_dir}", *overrides])


def same_values(row):
    return {k: row[k] for k in COMPARED if k in row}


def run_cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def full_run(tiny_data_cache, tmp_path_factory):
    """One uninterrupted tiny run (30 steps), shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("full") / "run"
    result = train(tiny(tiny_data_cache, out))
    return out, result


def test_loss_goes_down_on_shakespeare(full_run):
    out, result = full_run
    rows = read_metrics(out / "metrics.jsonl")
    train_losses = [r["loss"] for r in rows if r["type"] == "train"]
    evals = [r["val_loss"] for r in rows if r["type"] == "eval"]
    chance = math.log(512)  # a uniform guess over the 512-token vocabulary
    assert train_losses[0] > chance - 1.0  # starts near chance ...
    assert train_losses[-1] < train_losses[0] - 0.8  # ... and learns within 30 steps
    assert evals[-1] < evals[0] < chance - 0.5
    assert result["val_loss"] == evals[-1] and 0 < result["val_bpb"] < result["val_loss"] / math.log(2)


def test_metrics_jsonl_is_complete(full_run):
    out, result = full_run
    rows = read_metrics(out / "metrics.jsonl")
    trains = [r for r in rows if r["type"] == "train"]
    assert [r["step"] for r in trains] == list(range(5, 31, 5))
    for r in trains:
        assert r["tokens"] == r["step"] * 8 * 64
        for key in ("time", "loss", "lr", "grad_norm", "tok_per_s", "mfu"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
    assert [r["step"] for r in rows if r["type"] == "eval"] == [15, 30]
    assert all(r["val_tokens"] == 4096 and r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
               for r in rows if r["type"] == "eval")
    assert rows[-1]["type"] == "final" and rows[-1]["step"] == 30 and rows[-1]["val_loss"] == result["val_loss"]
    samples = json.loads((out / "samples.json").read_text())["samples"]
    assert [s["prompt"] for s in samples] == ["ROMEO:", "To be, or not to be"]
    assert "ROMEO:" in (out / "samples.md").read_text()


def test_run_files_load_with_safetensors_alone_and_load_run(full_run):
    out, _ = full_run
    assert [s for s, _ in list_checkpoints(out)] == [15, 30]
    weights = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 30 and state["tokens"] == 30 * 512
    model, tokenizer, cfg = load_run(out)
    assert cfg.model.vocab_size == 512 and tokenizer.get_vocab_size() == 512
    for name, tensor in weights.items():
        assert torch.equal(model.state_dict()[name], tensor)


def test_exact_resume_is_bitwise(full_run, tiny_data_cache, tmp_path):
    out, _ = full_run
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="at step 13"):
        train(tiny(tiny_data_cache, run, "train.stop_at_step=13"))
    assert [s for s, _ in list_checkpoints(run)] == [13]
    train(tiny(tiny_data_cache, run))  # the same command again resumes
    a, b = load_file(str(out / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = read_metrics(out / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [same_values(r) for r in rows_a] == [same_values(r) for r in rows_b]


def test_two_process_ddp_matches_one_process(tiny_data_cache, tmp_path):
    common = ["train.grad_accum=4", "train.micro_batch_size=2", "train.max_steps=6", "train.log_interval=1",
              "train.eval_interval=6", "train.ckpt_interval=6", "train.sample_max_new_tokens=2"]
    single = train(tiny(tiny_data_cache, tmp_path / "one", *common))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "scripts" / "train.py"), "--config", str(TINY),
                           f"data.cache_dir={tiny_data_cache}", f"train.out_dir={tmp_path / 'two'}", *common],
                          cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r["type"] == "train"]
    two = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]  # same global batch
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3, abs=1e-5)
    final_two = read_metrics(tmp_path / "two" / "metrics.jsonl")[-1]
    assert final_two["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)


def test_wandb_offline_run_holds_the_logged_metrics(tiny_data_cache, tmp_path):
    result = train(tiny(tiny_data_cache, tmp_path / "run", "wandb.mode=offline", "train.max_steps=10",
                        "train.eval_interval=10", "train.ckpt_interval=10", "train.sample_max_new_tokens=4",
                        "model.ffn.type=moe"))
    files = list(Path(result["wandb_dir"]).glob("run-*.wandb"))
    assert result["wandb_id"] and len(files) == 1 and result["wandb_id"] in files[0].name
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["type"] == "train"]
    # The wandb service process writes the file on its own schedule: under a loaded machine (the full suite on 2
    # cores) its records once were not in the file yet when finish() returned. Wait for them (up to 60 s).
    deadline = time.monotonic() + 60
    while True:
        history = read_wandb_history(files[0])
        logged = {row["_step"]: row for row in history if "train/loss" in row}
        if (sorted(logged) == [5, 10] and any("val/loss" in row for row in history)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(logged) == [r["step"] for r in rows] == [5, 10]
    for r in rows:
        assert logged[r["step"]]["train/loss"] == pytest.approx(r["loss"])
        assert logged[r["step"]]["train/lr"] == pytest.approx(r["lr"])
        # routing health: one scalar per MoE layer and the layer mean (wandb charts scalars, not lists)
        for name in ("max_vio", "router_entropy", "active_ffn_params"):
            per_layer = r[f"moe_{name}"]
            assert len(per_layer) == 2
            assert [logged[r["step"]][f"moe/{name}_l{i}"] for i in range(2)] == pytest.approx(per_layer)
            assert logged[r["step"]][f"moe/{name}"] == pytest.approx(sum(per_layer) / 2)
    assert any("val/loss" in row for row in history)
    assert any(row.get("samples/_type") == "table-file" for row in history)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["wandb_id"] == result["wandb_id"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data_cache, tmp_path, monkeypatch):
    import train.trainer as train_module

    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(tiny(tiny_data_cache, run, "train.stop_at_step=10"))
    before = tree_digest(run / "checkpoints")
    with pytest.raises(TrainingDiverged, match=r"non-finite loss/grad norm at step 1[12] .*step_000010 \(step 10\)"):
        # a resume may not change train.lr (refused), so the schedule itself is made to explode the weights
        monkeypatch.setattr(train_module, "lr_at", lambda *a: 1e30)
        train(tiny(tiny_data_cache, run))
    assert tree_digest(run / "checkpoints") == before
    verify_checkpoint(run / "checkpoints" / "step_000010")
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) <= 11


def test_nan_policy_skip_skips_the_step(tiny_data_cache, tmp_path, monkeypatch):
    from model.model_minimind import MiniMindForCausalLM

    real_forward, calls = MiniMindForCausalLM.forward, []

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) == 3:  # the 3rd training micro-batch = step 3
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MiniMindForCausalLM, "forward", forward)
    result = train(tiny(tiny_data_cache, tmp_path / "run", "train.nan_policy=skip", "train.max_steps=5",
                        "train.eval_interval=5", "train.ckpt_interval=5", "train.sample_max_new_tokens=2"))
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert first["step"] == 5 and first["skipped"] == 1 and math.isfinite(first["loss"])
    assert math.isfinite(result["val_loss"])
    calls.clear()
    with pytest.raises(TrainingDiverged, match="at step 3 "):
        train(tiny(tiny_data_cache, tmp_path / "run2", "train.max_steps=5"))


def test_refuses_to_overwrite_a_non_empty_run_dir(full_run, tiny_data_cache):
    out, _ = full_run
    before = tree_digest(out)
    proc = run_cli("--config", TINY, f"data.cache_dir={tiny_data_cache}", f"train.out_dir={out}",
                   "train.resume=false")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "not empty" in proc.stderr and "train.resume=false" in proc.stderr
    assert tree_digest(out) == before


def test_resume_true_without_checkpoint_is_an_error(tiny_data_cache, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(tiny(tiny_data_cache, tmp_path / "empty", "train.resume=true"))
    assert not (tmp_path / "empty").exists()


def test_resume_with_another_model_shape_names_the_key(full_run, tiny_data_cache):
    out, _ = full_run
    before = tree_digest(out)
    with pytest.raises(ConfigError, match=r"model\.hidden_size=32 differs .*model\.hidden_size=64"):
        train(tiny(tiny_data_cache, out, "model.hidden_size=32", "train.max_steps=50"))
    with pytest.raises(ConfigError, match=r"model\.ffn\.type='dense' differs"):
        train(tiny(tiny_data_cache, out, "model.ffn.type=dense", "train.max_steps=50"))
    assert tree_digest(out) == before


def test_a_locked_run_dir_is_refused(full_run, tiny_data_cache):
    out, _ = full_run
    with RunLock(out):
        with pytest.raises(CheckpointError, match="in use by another training process"):
            train(tiny(tiny_data_cache, out, "train.max_steps=50"))


def test_rerunning_a_finished_run_does_nothing(full_run, tiny_data_cache):
    out, result = full_run
    before = tree_digest(out)
    again = train(tiny(tiny_data_cache, out))
    assert again["val_loss"] == result["val_loss"]
    assert tree_digest(out) == before


def test_wandb_failing_mid_run_is_switched_off_with_one_warning(capsys):
    from train.config import RunConfig
    from train.tracking import WandbTracker

    class BrokenRun:
        def log(self, *args, **kwargs):
            raise ConnectionError("network went away")

    tracker = WandbTracker(RunConfig(wandb={"mode": "disabled"}), Path("."), None, {}, {})
    tracker.run = BrokenRun()
    tracker.log({"type": "train", "step": 1, "loss": 1.0}, step=1)  # must not raise
    tracker.log({"type": "train", "step": 2, "loss": 0.5}, step=2)
    tracker.finish()
    err = capsys.readouterr().err
    assert tracker.run is None
    assert err.count("warning:") == 1 and "network went away" in err and "metrics.jsonl" in err


def test_wandb_offline_fallback_survives_a_run_id_left_in_use(monkeypatch, tmp_path, capsys):
    """A timed-out online init can leave its run id registered in wandb's service; the offline fallback under that
    id then fails with 'run ID ... is in use' (seen under load). The tracker must still log offline, under a new id."""
    import sys
    import types
    from train.config import RunConfig
    from train.tracking import WandbTracker

    held, calls = set(), []

    class FakeRun:
        def __init__(self, run_id):
            self.dir = str(tmp_path / f"offline-run-x-{run_id}" / "files")
            self.summary = {}

    def init(*, id, mode, **kwargs):
        calls.append((mode, id))
        if mode == "online":
            held.add(id)  # the timed-out init keeps the id, teardown does not release it
            raise TimeoutError("Run initialization has timed out after 3 sec (127.0.0.1:9)")
        if id in held:
            raise RuntimeError(f"run ID {id} is in use")
        return FakeRun(id)

    fake = types.SimpleNamespace(init=init, teardown=lambda: None, Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracker = WandbTracker(RunConfig(wandb={"mode": "online"}), tmp_path, "abc12345", {}, {})
    assert [m for m, _ in calls] == ["online", "offline", "offline"]
    assert calls[0][1] == calls[1][1] == "abc12345" and calls[2][1] not in held
    assert tracker.run is not None and tracker.id == calls[2][1]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "logging offline instead" in err


def test_wandb_offline_fallback_keeps_the_run_id_when_it_is_free(monkeypatch, tmp_path):
    import sys
    import types
    from train.config import RunConfig
    from train.tracking import WandbTracker

    calls = []

    def init(*, id, mode, **kwargs):
        calls.append((mode, id))
        if mode == "online":
            raise TimeoutError("Run initialization has timed out")
        return types.SimpleNamespace(dir=str(tmp_path / "offline-run" / "files"), summary={})

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, teardown=lambda: None,
                                                                     Settings=lambda **kw: kw))
    tracker = WandbTracker(RunConfig(wandb={"mode": "online"}), tmp_path, "abc12345", {}, {})
    assert calls == [("online", "abc12345"), ("offline", "abc12345")] and tracker.id == "abc12345"
