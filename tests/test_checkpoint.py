"""Checkpoint layer, metrics file, schedule and optimizer groups, without training (fast, no data needed)."""
import errno
import json
import math
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from train import checkpoint as ck
from train import train_state
from train.config import TrainConfig
from train.errors import CheckpointError
from train.optim import build_optimizer, lr_at, plan_budget
from train.rundir import RunLock
from train.runs import read_metrics
from train.tracking import MetricsLog


class Tied(torch.nn.Module):
    """Embedding tied to the output layer, a norm and a biased layer: the cases that matter for saving and decay."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.proj = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 11, bias=False)
        self.head.weight = self.embed.weight


def _save(run_dir, step, model, keep_last=3):
    state = {"step": step, "rng": [train_state.capture_rng()], "note": "x"}
    return ck.save_checkpoint(run_dir, step, model, state, {"model": {"hidden_size": 4}}, keep_last)


def test_save_writes_complete_checkpoint_and_tied_weights_load_with_safetensors_alone(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    path = _save(tmp_path, 7, model)
    assert path == tmp_path / "checkpoints" / "step_000007"
    tensors = load_file(str(path / "model.safetensors"))  # plain safetensors, no project code
    assert torch.equal(tensors["embed.weight"], model.embed.weight)
    assert "head.weight" not in tensors  # stored once
    state = torch.load(path / "state.pt", weights_only=True)
    assert state["step"] == 7 and state["note"] == "x"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["files"]["model.safetensors"]["size"] == (path / "model.safetensors").stat().st_size
    # the top-level copies are the latest checkpoint's files
    assert (tmp_path / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()
    fresh = Tied()
    train_state.load_weights(fresh, tmp_path / "model.safetensors")
    assert torch.equal(fresh.head.weight, model.embed.weight)
    assert fresh.head.weight.data_ptr() == fresh.embed.weight.data_ptr()  # still tied


def test_keep_last_and_resume_picks_newest(tmp_path):
    model = Tied()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4]
    assert ck.find_resumable(tmp_path, say=lambda m: None).name == "step_000004"


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_state_byte", "delete_manifest"])
def test_damaged_checkpoint_falls_back_to_previous(tmp_path, damage):
    model = Tied()
    _save(tmp_path, 1, model)
    newest = _save(tmp_path, 2, model)
    if damage == "truncate_weights":
        with open(newest / "model.safetensors", "r+b") as f:
            f.truncate(100)
    elif damage == "flip_state_byte":
        data = bytearray((newest / "state.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (newest / "state.pt").write_bytes(bytes(data))
    else:
        (newest / "manifest.json").unlink()
    said = []
    found = ck.find_resumable(tmp_path, say=said.append)
    assert found.name == "step_000001"
    assert any("step_000002" in m and "unusable" in m for m in said)
    assert any("falling back" in m for m in said)


def test_all_checkpoints_damaged_is_an_error(tmp_path):
    path = _save(tmp_path, 1, Tied())
    (path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        ck.find_resumable(tmp_path, say=lambda m: None)


def test_failed_write_keeps_previous_checkpoint_and_names_path_and_cause(tmp_path, monkeypatch):
    model = Tied()
    good = _save(tmp_path, 1, model)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    real_write = ck._write_bytes

    def disk_full(path, data):
        if path.name == "state.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, data)

    monkeypatch.setattr(ck, "_write_bytes", disk_full)
    with pytest.raises(CheckpointError) as err:
        _save(tmp_path, 2, model)
    assert "step_000002" in str(err.value) and "No space left on device" in str(err.value)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    ck.verify_checkpoint(good)


def test_saving_the_same_step_again_keeps_an_intact_copy_and_replaces_a_damaged_one(tmp_path):
    model = Tied()
    first = _save(tmp_path, 5, model)
    written = (first / "manifest.json").read_bytes()
    _save(tmp_path, 5, model)
    assert (first / "manifest.json").read_bytes() == written  # intact: left as it was
    (first / "state.pt").write_bytes(b"damaged")
    with torch.no_grad():
        model.proj.bias.fill_(3.0)
    path = _save(tmp_path, 5, model)
    ck.verify_checkpoint(path)
    assert torch.equal(load_file(str(path / "model.safetensors"))["proj.bias"], torch.full((4,), 3.0))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000005"]


def test_malicious_state_file_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = tmp_path / "checkpoints" / "step_000001"
    ckpt.mkdir(parents=True)
    torch.save({"step": 1, "payload": Exploit()}, ckpt / "state.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        ck.load_state(ckpt)
    assert not marker.exists()
    with open(ckpt / "state.pt", "wb") as f:  # a raw pickle, not even a torch zip file
        pickle.dump(Exploit(), f)
    with pytest.raises(CheckpointError):
        ck.load_state(ckpt)
    assert not marker.exists()


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = train_state.capture_rng()
    a = (torch.rand(3), np.random.rand(3), random.random())
    train_state.restore_rng(torch.load(_roundtrip(state), weights_only=True))
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


def _roundtrip(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_lock_refuses_a_second_holder_and_is_freed_when_the_holder_dies(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(CheckpointError, match=f"in use by another training process \\(pid {os.getpid()}\\)"):
            RunLock(tmp_path).acquire()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from train.rundir import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
    finally:
        holder.kill()
    lock = RunLock(tmp_path).acquire()  # the dead holder's lock file is still there: taken over
    lock.release()


def test_metrics_truncate_keeps_lines_up_to_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.reset()
    for step in (5, 10, 15):
        log.write({"type": "train", "step": step, "loss": 1.0 / step})
    log.write({"type": "eval", "step": 10, "val_loss": float("nan")})
    log.write({"type": "final", "step": 10})
    with open(log.path, "a") as f:
        f.write('{"type": "train", "step": 2')  # cut short by a kill
    log.truncate_after(10)
    rows = read_metrics(log.path)
    assert [(r["type"], r["step"]) for r in rows] == [("train", 5), ("train", 10), ("eval", 10)]
    assert rows[2]["val_loss"] is None  # NaN written as null: the file stays strict JSON


def test_lr_schedule_warmup_then_cosine_to_min_lr():
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    assert lr_at(0, t, 14) == pytest.approx(0.25)
    assert lr_at(3, t, 14) == pytest.approx(1.0)
    assert lr_at(4, t, 14) == pytest.approx(1.0)
    assert lr_at(9, t, 14) == pytest.approx(0.55)  # halfway through the cosine: (1 + 0.1) / 2
    assert lr_at(14, t, 14) == pytest.approx(0.1)
    assert lr_at(100, t, 14) == pytest.approx(0.1)


def test_budget_max_tokens_wins():
    t = TrainConfig(micro_batch_size=4, grad_accum=2, max_steps=10, max_tokens=1000)
    assert plan_budget(t, seq_len=64) == (math.ceil(1000 / 512), 512)
    assert plan_budget(TrainConfig(micro_batch_size=4, max_steps=10), seq_len=64) == (10, 256)


def test_weight_decay_only_on_matrices():
    model = Tied()
    decay, no_decay = build_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.proj.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model.embed.weight), id(model.norm.weight),
                                                   id(model.norm.bias), id(model.proj.bias)}
    decay, _ = build_optimizer(model, TrainConfig(decay_embeddings=True)).param_groups
    assert id(model.embed.weight) in {id(p) for p in decay["params"]}


# ----------------------------------------------------------------------------------------------------------------
# Resume never silently changes a run (train/rundir.py: check_same_training, run by open_run_dir)

def _run_with_checkpoint(tmp_path, *overrides):
    """A run directory holding one checkpoint (step 5) written with the config `overrides` give; -> its digest."""
    from train.config_load import load_config

    cfg = load_config(None, [f"train.out_dir={tmp_path / 'run'}", "train.max_steps=20", *overrides])
    (tmp_path / "run").mkdir()
    ck.save_checkpoint(tmp_path / "run", 5, Tied(), {"step": 5}, cfg.to_dict(), keep_last=2)
    return _digest(tmp_path / "run")


def _digest(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _resume(tmp_path, *overrides):
    from train.config_load import load_config
    from train.rundir import open_run_dir

    lock, found = open_run_dir(load_config(None, [f"train.out_dir={tmp_path / 'run'}", "train.max_steps=20",
                                                  *overrides]))
    lock.release()
    return found


def test_resume_with_another_lr_is_refused_naming_the_key_and_both_values(tmp_path):
    from train.errors import ConfigError

    before = _run_with_checkpoint(tmp_path, "train.lr=0.003")
    with pytest.raises(ConfigError) as info:
        _resume(tmp_path, "train.lr=0.001")
    msg = str(info.value)
    assert "\n" not in msg and f"resuming {tmp_path / 'run'} would change the run" in msg
    assert "train.lr=0.001 (checkpoint: 0.003)" in msg and "train.min_lr" not in msg
    assert _digest(tmp_path / "run") == before  # nothing written
    RunLock(tmp_path / "run").acquire().release()  # and the lock was given back


def test_resume_names_every_changed_key(tmp_path):
    from train.errors import ConfigError

    _run_with_checkpoint(tmp_path)
    with pytest.raises(ConfigError) as info:
        _resume(tmp_path, "train.seed=3", "train.micro_batch_size=4", "train.dtype=bf16", "train.eval_tokens=64",
                "train.max_steps=10", "train.log_interval=1")
    msg = str(info.value)
    for part in ("train.seed=3 (checkpoint: 0)", "train.micro_batch_size=4 (checkpoint: 16)",
                 "train.dtype='bf16' (checkpoint: 'auto')", "train.eval_tokens=64 (checkpoint: 131072)",
                 "train.max_steps=10 (checkpoint: 20)", "the budget may only grow"):
        assert part in msg, (part, msg)
    assert "log_interval" not in msg  # allowed to change


@pytest.mark.parametrize("overrides", [
    ["train.max_steps=50"],  # a longer run
    ["train.max_tokens=2000000"],  # the same budget in tokens, larger: 977 steps of 2048 tokens
    ["train.stop_at_step=8", "train.num_threads=1", "train.log_interval=1", "train.eval_interval=5",
     "train.ckpt_interval=1", "train.keep_last=5", "train.compile=true", "train.device=cpu", "train.resume=true",
     "train.nan_policy=skip", "train.peak_flops=1e12", "train.sample_prompts=[Hi]", "train.sample_top_k=null"],
], ids=["larger-max_steps", "larger-max_tokens", "mechanics"])
def test_resume_may_extend_the_budget_and_change_mechanics(tmp_path, overrides):
    _run_with_checkpoint(tmp_path)
    found = _resume(tmp_path, *overrides)
    assert found == tmp_path / "run" / "checkpoints" / "step_000005"


def test_the_allowed_keys_are_train_keys():
    from train.rundir import BUDGET_KEYS, RESUMABLE_TRAIN_KEYS

    assert (RESUMABLE_TRAIN_KEYS | set(BUDGET_KEYS)) < set(TrainConfig.model_fields)
    assert not {"seed", "lr", "min_lr", "micro_batch_size", "grad_accum", "dtype", "eval_tokens"} & \
        RESUMABLE_TRAIN_KEYS


# ----------------------------------------------------------------------------------------------------------------
# Exact resume under train.optimizer=muon (Muon + AdamW state, MoE expert stacks: per-expert momentum buffers)

def test_exact_resume_under_muon_is_bitwise(tiny_data_cache, tmp_path):
    from train.config_load import load_config
    from train.trainer import TrainingInterrupted, train

    def tiny(out, *overrides):
        return load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"),
                           [f"data.cache_dir={tiny_data_cache}", f"train.out_dir={out}", "train.optimizer=muon",
                            "train.muon_lr=0.004", "model.ffn.type=moe", "train.max_steps=10",
                            "train.log_interval=2", "train.eval_interval=10", "train.ckpt_interval=10",
                            "train.sample_max_new_tokens=2", "wandb.mode=disabled", *overrides])

    train(tiny(tmp_path / "full"))
    # step 5 leaves a logging window open (log_interval 2): the checkpoint must carry its routing counters
    with pytest.raises(TrainingInterrupted, match="at step 5"):
        train(tiny(tmp_path / "run", "train.stop_at_step=5"))
    assert set(torch.load(tmp_path / "run" / "state.pt", weights_only=True)["optimizer"]) == {"muon", "adamw"}
    train(tiny(tmp_path / "run"))  # the same command again resumes
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [read_metrics(tmp_path / d / "metrics.jsonl") for d in ("full", "run")]
    same = [[(r["type"], r["step"], r.get("loss"), r.get("lr"), r.get("val_loss"), r.get("expert_load"),
              r.get("moe_max_vio"), r.get("moe_router_entropy"), r.get("moe_active_ffn_params")) for r in rs]
            for rs in rows]
    assert same[0] == same[1]
    assert any(r.get("moe_max_vio") for r in rows[1])  # the health lines were there to compare
