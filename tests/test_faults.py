"""Fault injection against the real training script: kill -9 at random moments (and inside checkpoint writes),
SIGTERM / Ctrl-C, a full disk and a read-only directory, damaged checkpoints and shards, two runs on one directory,
non-finite losses and gradients, wandb failures. Nothing finished may be lost, nothing marked complete may be
unreadable, and a run that was disturbed and resumed must end bitwise identical to one that never was.

Runs are forked from a zygote that imported torch once (tests/faultkit.py), so each starts in a fraction of a second;
the read-only and shard-write cases start a fresh interpreter (they drop capabilities at exec / run another script).
"""
import ctypes
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from faultkit import ROOT, Zygote

STEPS = 36
# Log every 2 steps, checkpoint every 3, evaluate every 10: the windows never line up, so a resume must restore the
# open logging window as well as weights, optimizer and RNG. An MoE with aux-loss-free balancing adds the most state
# (router biases, expert-load counters). fp32, one thread: bitwise reproducible on CPU.
RUN_ARGS = ["--config", str(ROOT / "configs" / "tiny.yaml"), f"train.max_steps={STEPS}", "train.log_interval=2",
            "train.ckpt_interval=3", "train.eval_interval=10", "train.keep_last=2", "train.dtype=fp32",
            "train.num_threads=1", "train.peak_flops=1e9", "train.sample_max_new_tokens=4", "model.ffn.type=moe",
            "model.ffn.n_experts=4", "model.ffn.top_k=2", "model.ffn.balancing=aux_free"]
COMPARED = ("type", "step", "tokens", "loss", "lr", "grad_norm", "val_loss", "val_bpb", "skipped")


# ----------------------------------------------------------------------------------------------------------------
# Checks

def tiny_corpus(cache: Path) -> Path:
    """configs/tiny.yaml's corpus folder in the shared session cache (other tests may add folders beside it)."""
    (folder,) = cache.glob("shakespeare-*")
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): sha256(p) for p in sorted(Path(path).rglob("*")) if p.is_file()}


def check_checkpoints(run: Path) -> list[int]:
    """Every checkpoint marked complete (a `step_*` folder) matches the sizes and sha256s its manifest recorded at
    write time and loads with plain safetensors and torch.load(weights_only=True); so do the top-level copies.
    Returns the steps."""
    import torch
    from safetensors.torch import load_file

    steps = []
    for path in sorted((run / "checkpoints").glob("step_*")):
        step = int(path.name.removeprefix("step_"))
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["step"] == step and set(manifest["files"]) == {"model.safetensors", "state.pt"}
        for name, info in manifest["files"].items():
            data = (path / name).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (info["size"], info["sha256"]), path / name
        assert load_file(str(path / "model.safetensors"))
        assert torch.load(path / "state.pt", weights_only=True)["step"] == step
        steps.append(step)
    if (run / "model.safetensors").exists():
        assert load_file(str(run / "model.safetensors"))
    if (run / "state.pt").exists():
        assert torch.load(run / "state.pt", weights_only=True)["step"] in steps
    return steps


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in COMPARED if k in r} for r in rows]  # everything but timings


def assert_same(a, b, where: str = "state") -> None:
    import torch

    if isinstance(a, torch.Tensor):  # bit for bit (torch.equal would take -0.0 for 0.0)
        assert isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert a.numpy().tobytes() == b.numpy().tobytes(), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_result(run: Path, reference: Path) -> None:
    """Bitwise the uninterrupted run: final weights, optimizer/RNG/logging state, metrics, samples. (Not the weights
    file's bytes: safetensors writes its metadata map in a random order.)"""
    import torch
    from safetensors import safe_open

    last = Path("checkpoints") / f"step_{STEPS:06d}"
    files = [safe_open(str(r / last / "model.safetensors"), "pt") for r in (run, reference)]
    assert_same(*({k: f.get_tensor(k) for k in f.keys()} for f in files), where="weights")
    assert files[0].metadata() == files[1].metadata()
    a, b = (torch.load(r / last / "state.pt", weights_only=True) for r in (run, reference))
    for key in ("elapsed", "wandb_id"):  # wall time and a random id
        a.pop(key), b.pop(key)
    assert_same(a, b)
    assert metrics(run) == metrics(reference)
    assert (run / "samples.json").read_text() == (reference / "samples.json").read_text()


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


def run_fresh(script: str, *args, preexec_fn=None) -> subprocess.CompletedProcess:
    """A fresh interpreter running one of the scripts (not forked from the zygote)."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, preexec_fn=preexec_fn)


def _file_size_limit(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _obey_file_permissions() -> None:
    """Root ignores permission bits; drop the capabilities that allow it from this process's bounding set (they go
    at exec), so a read-only directory is read-only for the training process. A no-op for other users."""
    if os.geteuid() != 0:
        return
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


# ----------------------------------------------------------------------------------------------------------------
# Fixtures

@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    server = Zygote(tmp_path_factory.mktemp("zygote"), RUN_ARGS)
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference(zygote, tiny_data_cache, tmp_path_factory) -> Path:
    """One undisturbed run that every disturbed run must reproduce bit for bit."""
    run = tmp_path_factory.mktemp("reference") / "run"
    child = zygote.run(f"data.cache_dir={tiny_data_cache}", f"train.out_dir={run}")
    assert child.rc == 0, child.stderr()
    assert check_checkpoints(run) == [STEPS - 3, STEPS]
    return run


@pytest.fixture
def run_args(tiny_data_cache, tmp_path):
    return f"data.cache_dir={tiny_data_cache}", f"train.out_dir={tmp_path / 'run'}"


# ----------------------------------------------------------------------------------------------------------------
# Kills and stop signals

KILL_POINTS = ("weights_half", "state_half", "config_half", "manifest_written", "renamed", "published_weights",
               "pruning", "metrics_half_line")


def test_kill_9_at_ten_random_moments_then_resume_is_bitwise(zygote, reference, run_args, tmp_path):
    rng = random.Random(int(os.environ.get("FAULT_SEED", "7")))  # FAULT_SEED=n explores other moments
    run = tmp_path / "run"
    plan = [(p, rng.randint(1, 2)) for p in rng.sample(KILL_POINTS, 4)] + [("startup", 0)] * 2 + [("step", 0)] * 4
    rng.shuffle(plan)
    history = []
    for kind, nth in plan:
        done = max([0, *check_checkpoints(run)])
        if kind in KILL_POINTS:  # the child kills itself at that point of its nth checkpoint write / log line
            child = zygote.start(*run_args, fault={"kind": kind, "nth": nth})
        elif kind == "startup":  # a moment before the first log line: loading, resuming, the first steps
            child = zygote.start(*run_args)
            child.kill_after(rng.uniform(0, 0.4), or_once=f"/{STEPS} loss")
        else:  # a moment after a step's log line, before the next one: in a checkpoint write or in a step
            child = zygote.start(*run_args)
            target = done // 2 * 2 + 2 * rng.randint(1, 3)
            assert target < STEPS - 2, f"the plan ran out of steps: {history}"
            child.wait_for(f"step {target}/{STEPS} ")
            child.kill_after(rng.uniform(0, 0.15), or_once=f"step {target + 2}/{STEPS} ")
        assert child.wait() == -signal.SIGKILL, f"{kind} kill did not land: {history} {child.stderr()[-800:]}"
        history.append((kind, nth, done))
        check_checkpoints(run)  # after every kill: no complete checkpoint is unreadable
    final = zygote.run(*run_args)
    assert final.rc == 0, final.stderr()
    assert check_checkpoints(run) == [STEPS - 3, STEPS]
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # stale temp dirs gone
    assert_same_result(run, reference)


def test_kill_9_while_building_the_data_cache_then_it_is_rebuilt_exactly(zygote, tiny_data_cache, tmp_path):
    cache = tmp_path / "data"
    args = (f"data.cache_dir={cache}", f"train.out_dir={tmp_path / 'run'}", "train.max_steps=6")  # the data matter
    for fault in ({"kind": "data_val_half"}, {"kind": "data_before_meta"}, None):
        child = zygote.start(*args, fault=fault)
        if fault is None:  # a random moment while building the cache again (or in the first steps)
            child.kill_after(random.Random(3).uniform(0.2, 1.5), or_once="/6 loss")
        assert child.wait() == -signal.SIGKILL, child.stderr()[-800:]
        for folder in cache.iterdir():  # either complete (meta.json and every file as recorded) or not looking so
            if (folder / "meta.json").exists():
                files = json.loads((folder / "meta.json").read_text())["files"]
                assert all(sha256(folder / name) == info["sha256"] for name, info in files.items())
    child = zygote.run(*args)
    assert child.rc == 0, child.stderr()
    (folder,), original = list(cache.iterdir()), tiny_corpus(tiny_data_cache)
    assert folder.name == original.name and not [p.name for p in folder.iterdir() if ".tmp" in p.name]
    for name in ("tokenizer.json", "train.bin", "val.bin"):
        assert sha256(folder / name) == sha256(original / name), name


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_stop_signal_saves_a_checkpoint_and_exits_130_with_one_line(zygote, reference, run_args, tmp_path, sig):
    run = tmp_path / "run"
    child = zygote.start(*run_args)
    child.wait_for(f"step 8/{STEPS} ")
    child.kill(sig)
    assert child.wait() == 130
    m = re.fullmatch(r"interrupted at step (\d+): checkpoint saved to (\S+); run the same command again to resume",
                     one_line(child.stderr()))
    assert m, child.stderr()
    step = int(m[1])
    assert step >= 8 and Path(m[2]) == run / "checkpoints" / f"step_{step:06d}" and step in check_checkpoints(run)
    resumed = zygote.run(*run_args)
    assert resumed.rc == 0 and f"resuming from step {step} " in resumed.stdout()
    assert_same_result(run, reference)


# ----------------------------------------------------------------------------------------------------------------
# Full disk, read-only directory, damaged artefacts

def _stopped_at_10(zygote, run_args, run: Path) -> dict:
    child = zygote.run(*run_args, "train.stop_at_step=10")
    assert child.rc == 130 and check_checkpoints(run) == [9, 10], child.stderr()
    return tree_digest(run / "checkpoints")


@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_failed_checkpoint_write_keeps_the_previous_one(zygote, reference, run_args, tmp_path, fault):
    run = tmp_path / "run"
    before = _stopped_at_10(zygote, run_args, run)
    if fault == "disk full":  # a file-size limit below the size of the weights file: the write fails with EFBIG
        child = zygote.run(*run_args, file_size_limit=100_000)
        rc, stderr, cause = child.rc, child.stderr(), "File too large"
    else:
        (run / "checkpoints").chmod(0o555)
        try:
            proc = run_fresh("train.py", *RUN_ARGS, *run_args, preexec_fn=_obey_file_permissions)
        finally:
            (run / "checkpoints").chmod(0o755)
        rc, stderr, cause = proc.returncode, proc.stderr, "Permission denied"
    assert rc == 2
    assert one_line(stderr) == f"error: cannot write checkpoint {run / 'checkpoints' / 'step_000012'}: {cause}"
    assert tree_digest(run / "checkpoints") == before and check_checkpoints(run) == [9, 10]
    resumed = zygote.run(*run_args)  # room again: the run continues from step 10 as if nothing happened
    assert resumed.rc == 0, resumed.stderr()
    assert_same_result(run, reference)


def test_failed_shard_write_names_the_file_and_leaves_no_finished_looking_cache(tiny_data_cache, tmp_path):
    cache = tmp_path / "data"
    shutil.copytree(tiny_data_cache, cache)
    before = tree_digest(cache)
    # another vocabulary size is another cache folder, built under a file-size limit smaller than its train.bin
    proc = run_fresh("prepare_data.py", "--config", ROOT / "configs" / "tiny.yaml", f"data.cache_dir={cache}",
                     "data.tokenizer.vocab_size=300", preexec_fn=_file_size_limit(100_000))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-2000:]
    (folder,) = [p for p in cache.iterdir() if "-v300-" in p.name]
    assert re.fullmatch(rf"error: cannot write {re.escape(str(folder))}/train\.bin: File too large.*", errors[0])
    assert not (folder / "meta.json").exists() and not [p for p in folder.iterdir() if ".tmp" in p.name]
    assert {k: v for k, v in tree_digest(cache).items() if k in before} == before


@pytest.mark.parametrize("damage", ["truncated weights", "flipped state byte"])
def test_damaged_newest_checkpoint_falls_back_and_loses_nothing(zygote, reference, run_args, tmp_path, damage):
    run = tmp_path / "run"
    _stopped_at_10(zygote, run_args, run)
    newest = run / "checkpoints" / "step_000010"
    if damage == "truncated weights":
        size = json.loads((newest / "manifest.json").read_text())["files"]["model.safetensors"]["size"]
        with open(newest / "model.safetensors", "r+b") as f:
            f.truncate(1000)
        why = f"has 1000 bytes, {size} were written (truncated or replaced)"
    else:
        data = bytearray((newest / "state.pt").read_bytes())
        data[len(data) // 2] ^= 0x01
        (newest / "state.pt").write_bytes(bytes(data))
        why = "does not match its recorded sha256 (damaged)"
    resumed = zygote.run(*run_args)
    assert resumed.rc == 0, resumed.stderr()
    out = resumed.stdout()
    assert f"warning: checkpoint step_000010 is unusable: {newest}/" in out and why in out
    assert f"falling back to the previous good checkpoint {run / 'checkpoints' / 'step_000009'}" in out
    assert "resuming from step 9 " in out
    assert_same_result(run, reference)


def test_shard_that_no_longer_matches_its_meta_is_rebuilt_with_a_message(zygote, tiny_data_cache, tmp_path):
    original = tiny_corpus(tiny_data_cache)
    cache, folder = tmp_path / "data", tmp_path / "data" / original.name
    shutil.copytree(original, folder)
    recorded = json.loads((folder / "meta.json").read_text())["files"]  # sizes and sha256s written with the shards
    size = (folder / "train.bin").stat().st_size
    with open(folder / "train.bin", "r+b") as f:
        f.truncate(size // 2)
    child = zygote.run(f"data.cache_dir={cache}", f"train.out_dir={tmp_path / 'run'}", "train.max_steps=3")
    assert child.rc == 0, child.stderr()
    assert (f"data: {folder / 'train.bin'} has {size // 2} bytes but meta.json says {size}; rebuilding {folder}"
            in child.stderr())
    for name, info in recorded.items():
        assert sha256(folder / name) == info["sha256"], name  # rebuilt exactly as before


# ----------------------------------------------------------------------------------------------------------------
# Two runs, non-finite values, wandb

def test_second_run_on_the_same_directory_is_refused(zygote, reference, run_args, tmp_path):
    run = tmp_path / "run"
    first = zygote.start(*run_args)
    first.wait_for(f"step 2/{STEPS} ")
    second = zygote.run(*run_args)
    assert second.rc == 2
    assert one_line(second.stderr()) == (f"error: run directory {run} is in use by another training process (pid "
                                         f"{first.pid}); wait for it to finish or choose another train.out_dir")
    assert first.wait() == 0, first.stderr()
    assert_same_result(run, reference)  # nothing interleaved


def test_inf_loss_stops_at_that_step_and_keeps_the_last_checkpoint(zygote, reference, run_args, tmp_path):
    run = tmp_path / "run"
    child = zygote.run(*run_args, fault={"kind": "inf_loss", "nth": 8})  # step 8's only micro-batch
    assert child.rc == 2
    assert one_line(child.stderr()) == (
        f"error: non-finite loss/grad norm at step 8 (loss=inf, grad_norm=nan); stopped, the last good checkpoint is "
        f"{run / 'checkpoints' / 'step_000006'} (step 6); lower train.lr or set train.nan_policy=skip")
    assert check_checkpoints(run) == [3, 6]
    assert max(r["step"] for r in metrics(run)) == 6
    resumed = zygote.run(*run_args)  # e.g. after a fix: nothing before the bad step was lost
    assert resumed.rc == 0, resumed.stderr()
    assert_same_result(run, reference)


def test_inf_gradient_with_nan_policy_skip_skips_exactly_that_step(zygote, run_args, tmp_path):
    child = zygote.run(*run_args, "train.nan_policy=skip", fault={"kind": "inf_grad", "nth": 5})
    assert child.rc == 0 and child.stderr() == "", child.stderr()
    warnings = [line for line in child.stdout().splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and re.fullmatch(r"warning: non-finite loss/grad norm at step 5 \(loss=[0-9.]+, "
                                               r"grad_norm=(inf|nan)\); step skipped \(train.nan_policy=skip\)",
                                               warnings[0]), warnings
    rows = metrics(tmp_path / "run")
    assert [r.get("skipped") for r in rows if r["type"] == "train"] == [None, None, 1] + [None] * (STEPS // 2 - 3)
    assert rows[-1]["type"] == "final" and all(isinstance(r.get("loss", 0.0), float) for r in rows)


@pytest.mark.parametrize("failure", ["online, no API key", "online, server unreachable", "fails mid-run"])
def test_wandb_failure_never_stops_training(zygote, reference, run_args, tmp_path, failure):
    env = {"WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_DIR": str(tmp_path),
           "HOME": str(tmp_path)}  # no ~/.netrc, no settings file: no stored key
    args, fault = ["wandb.mode=online", "wandb.init_timeout=3"], None
    if failure == "online, server unreachable":
        env["WANDB_API_KEY"] = "0" * 40
    elif failure == "fails mid-run":
        env["WANDB_MODE"], args, fault = "offline", ["wandb.mode=offline"], {"kind": "wandb_log_fails", "nth": 3}
    unset = ["WANDB_SILENT"] + (["WANDB_API_KEY"] if "WANDB_API_KEY" not in env else [])
    child = zygote.run(*run_args, *args, env=env, unset=unset, fault=fault)
    assert child.rc == 0, child.stderr()
    warning = one_line(child.stderr())
    expected = {"online, no API key": r"warning: wandb could not start online \(online: .*API key.*\); logging "
                                      r"offline instead \(upload later with `wandb sync .*`\)",
                "online, server unreachable": r"warning: wandb could not start online \(online: .*127\.0\.0\.1:9.*",
                "fails mid-run": r"warning: wandb failed mid-run \(network went away\); it is switched off, "
                                 r"metrics\.jsonl stays complete"}[failure]
    assert re.fullmatch(expected, warning), warning
    run = tmp_path / "run"
    assert metrics(run) == metrics(reference)  # every train/eval/final line, same values
    assert check_checkpoints(run) == [STEPS - 3, STEPS]
    if failure != "fails mid-run":  # the fallback really logged offline
        assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
