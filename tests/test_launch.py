"""Sweeps in parallel and on Slurm (train/launch.py, train/launch_slurm.py): `--jobs N` runs are bit-identical to the
same runs trained alone at the same thread count, a failing job is reported with its log while the others finish, Ctrl-C stops every child
with a checkpoint, submitit jobs (its LocalExecutor, the Slurm code path) give the sequential sweep's numbers,
--no-wait + --collect finish a tuning sweep, and bad Slurm options are one line, exit 2."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from train.compare import run_sweep
from train.config_load import load_config
from train.errors import ConfigError, UserError
from train.launch import LocalPool, auto_jobs, build_launcher
from train.launch_common import config_text, log_path, with_threads
from train.launch_slurm import SubmititLauncher, slurm_minutes, slurm_options, slurm_parameters
from train.plan import plan_sweep, run_finished

ROOT = Path(__file__).resolve().parents[1]
GELU = {"model.ffn.type": "dense", "model.ffn.activation": "gelu"}
SWIGLU = {"model.ffn.type": "glu", "model.ffn.activation": "silu"}
MOE = {"model.ffn.type": "moe", "model.ffn.n_experts": 4, "model.ffn.top_k": 2, "model.ffn.expert_type": "glu",
       "model.ffn.expert_activation": "silu"}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def tiny_base(tmp: Path, cache: Path, **train) -> Path:
    """tests/test_compare.py's tiny base: configs/tiny.yaml with two plays, a 320-token vocabulary, 6 steps."""
    return write_yaml(tmp / "tiny-base.yaml", {
        "extends": str(ROOT / "configs" / "tiny.yaml"),
        "data": {"val_plays": ["macbeth"], "max_documents": 2, "cache_dir": str(cache),
                 "tokenizer": {"vocab_size": 320}},
        "train": {"max_steps": 6, "warmup_steps": 2, "log_interval": 2, "eval_interval": 3, "eval_tokens": 2048,
                  "ckpt_interval": 3, "sample_max_new_tokens": 8, "sample_prompts": ["ROMEO:"], **train},
        "wandb": {"mode": "disabled"},
    })


def sweep_file(tmp: Path, variants: dict, name: str = "tiny-sweep", **extra) -> Path:
    data = {"name": name, "base": "tiny-base.yaml", "out_dir": str(tmp / "runs" / name), "seeds": [0],
            "baseline": "gelu", "variants": variants, **extra}
    return write_yaml(tmp / f"{name}.yaml", data)


@pytest.fixture
def tmp_sweep_dir(tmp_path, tmp_path_factory):
    tiny_base(tmp_path, tmp_path_factory.getbasetemp() / "compare-data")
    return tmp_path


def compare_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "compare.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(header, tensor bytes) of a safetensors file. The header's JSON order is not part of the comparison: safetensors
    writes its metadata map in a per-process hash order (the same weights saved by two processes can differ there)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def seed_losses(row: dict) -> list:
    """A report row's val_loss_per_seed as a list (a list, or a mapping seed -> loss)."""
    per_seed = row["val_loss_per_seed"]
    return list(per_seed.values()) if isinstance(per_seed, dict) else list(per_seed)


def final(run_dir: Path) -> dict:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in recs if r["type"] == "final"][-1]


# ---------------------------------------------------------------------------------------------------------------
# No training

def test_resolved_configs_load_back_unchanged_and_threads_are_split(tmp_sweep_dir):
    path = sweep_file(tmp_sweep_dir, {"gelu": GELU, "swiglu": SWIGLU, "moe": MOE},
                      tune={"train.lr": [2.0e-3, 4.0e-3]})
    plan = plan_sweep(path)
    for run in plan.all_runs:
        text = config_text(run.cfg)
        file = tmp_sweep_dir / f"{run.name}.yaml"
        file.write_text(text)
        assert load_config(file) == run.cfg  # what scripts/train.py --config reads is the planned run
    cfg = plan.runs[0].cfg
    assert cfg.train.num_threads == 1  # configs/tiny.yaml pins one thread
    assert with_threads(cfg, 4).train.num_threads == 1  # a config's own smaller count is kept
    unset = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_threads": None})})
    assert with_threads(unset, 3).train.num_threads == 3 and with_threads(unset, None) is unset
    assert [auto_jobs(c, []) for c in (1, 2, 3, 8, 16)] == [1, 1, 2, 2, 4] and auto_jobs(64, ["0", "1"]) == 2


def test_build_launcher_choices(tmp_sweep_dir):
    plan = plan_sweep(sweep_file(tmp_sweep_dir, {"gelu": GELU}, launcher={"slurm": {"time": "30"}}))
    assert build_launcher(plan) is None  # default: this process, one run after the other
    pool = build_launcher(plan, jobs=2)
    assert isinstance(pool, LocalPool) and pool.jobs == 2 and pool.threads == max(1, len(os.sched_getaffinity(0)) // 2)
    sub = build_launcher(plan, "slurm", slurm_cli=["partition=gpu"], wait=False)
    assert isinstance(sub, SubmititLauncher) and not sub.waits
    assert sub.params["time"] == 30 and sub.params["partition"] == "gpu" and sub.folder == plan.out_dir / "submitit"
    with pytest.raises(ConfigError, match="--jobs is for local runs"):
        build_launcher(plan, "slurm", jobs=2)
    with pytest.raises(ConfigError, match="--slurm options need --launcher slurm"):
        build_launcher(plan, slurm_cli=["time=30"])
    plan = plan_sweep(sweep_file(tmp_sweep_dir, {"gelu": GELU}))
    with pytest.raises(ConfigError, match="needs a time limit per run"):
        build_launcher(plan, "slurm")


def test_slurm_times_and_sbatch_lines():
    assert [slurm_minutes(t) for t in ("90", "1:30", "0:30", "2:00:00", "1-0", "1-12:30", "1-12:30:15")] == \
        [90, 2, 1, 120, 1440, 2190, 2191]
    for bad in ("0", "1:2:3:4", "1:61:00", "2-25", "ab", "-5", "1h"):
        with pytest.raises(ValueError):
            slurm_minutes(bad)
    from submitit.slurm.slurm import _make_sbatch_string
    opts = slurm_options({"slurm": {"partition": "gpu", "time": "2:00:00", "cpus_per_run": 8}},
                         ["gpus_per_run=1", "mem=32G", "account=proj", "qos=high", "cpus_per_run=4"])
    assert opts.cpus_per_run == 4  # the command line wins over the sweep file
    text = _make_sbatch_string(command="true", folder="/tmp/x", **slurm_parameters(opts, "tiny-sweep"))
    for line in ("--partition=gpu", "--time=120", "--cpus-per-task=4", "--gpus-per-node=1", "--mem=32G",
                 "--account=proj", "--qos=high", "--job-name=tiny-sweep", "--ntasks-per-node=1"):
        assert f"#SBATCH {line}\n" in text


@pytest.mark.parametrize("args, message", [
    (["--slurm", "cpus_per_run=-2"], "error: --slurm cpus_per_run: must be >= 1, got -2"),
    (["--slurm", "time=1:2:3:4"], "error: --slurm time: '1:2:3:4' is not a Slurm time"),
    (["--jobs", "0"], "error: --jobs expects a positive integer or 'auto', got '0'"),
    ([], "launcher.slurm.mem: '12X' is not a Slurm memory size"),
])
def test_bad_launcher_options_are_one_line_exit_2(tmp_sweep_dir, args, message):
    slurm = {"time": "10"} if args else {"time": "10", "mem": "12X"}
    path = sweep_file(tmp_sweep_dir, {"gelu": GELU}, launcher={"slurm": slurm})
    launcher = [] if args[:1] == ["--jobs"] else ["--launcher", "slurm"]
    proc = compare_script("--config", str(path), *launcher, *args, "--dry-run", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_sweep_dir / "runs").exists()  # nothing trained, nothing written


# ---------------------------------------------------------------------------------------------------------------
# Local jobs

def test_jobs_2_runs_are_bit_identical_to_each_run_alone(tmp_sweep_dir):
    """--jobs 2 through the script; each run equals the same run trained alone (here, in this process) at the thread
    count --jobs gave it: final val_loss, and model.safetensors' tensor bytes and header."""
    path = sweep_file(tmp_sweep_dir, {"gelu": GELU, "swiglu": SWIGLU})
    proc = compare_script("--config", str(path), "--jobs", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "launcher: 2 local jobs at once" in proc.stdout and proc.stdout.count("pid ") == 2
    out = tmp_sweep_dir / "runs" / "tiny-sweep"
    report = json.loads((out / "report.json").read_text())
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    from train.trainer import train
    for run in plan_sweep(path).runs:
        cfg = with_threads(run.cfg, threads)
        assert load_config(out / run.name / "config.yaml").train.num_threads == cfg.train.num_threads
        alone = tmp_sweep_dir / "alone" / run.name
        train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"out_dir": str(alone)})}))
        assert final(out / run.name)["val_loss"] == final(alone)["val_loss"]
        assert safetensors_parts(out / run.name / "model.safetensors") == safetensors_parts(alone / "model.safetensors")
        assert log_path(out / run.name).is_file()
        row = next(r for r in report["variants"] if r["name"] == run.variant)
        assert seed_losses(row) == [final(alone)["val_loss"]]


def test_a_failing_job_is_reported_with_its_log_and_the_others_finish(tmp_sweep_dir):
    path = sweep_file(tmp_sweep_dir, {"gelu": GELU, "swiglu": SWIGLU})
    out = tmp_sweep_dir / "runs" / "tiny-sweep"
    (out / "gelu-s0").mkdir(parents=True)
    (out / "gelu-s0" / "notes.txt").write_text("not a run")  # the trainer refuses a foreign directory: exit 2
    with pytest.raises(UserError) as e:
        run_sweep(plan_sweep(path), launcher=LocalPool(2, threads=1))
    log = log_path(out / "gelu-s0")
    msg = str(e.value)
    assert msg.startswith("1 run(s) failed: gelu-s0 (exit 2: error: run directory") and f"log {log})" in msg
    assert "\n" not in msg and "holds other files" in log.read_text()
    assert run_finished(plan_sweep(path).runs[1])  # swiglu-s0 trained all the same
    report = json.loads((out / "report.json").read_text())
    assert report["missing_runs"] == ["gelu-s0"]


def test_ctrl_c_stops_every_job_with_a_checkpoint_and_the_rerun_resumes(tmp_sweep_dir):
    path = sweep_file(tmp_sweep_dir, {"gelu": GELU, "swiglu": SWIGLU},
                      overrides={"train.max_steps": 200, "train.eval_interval": 100, "train.ckpt_interval": 1000})
    out = tmp_sweep_dir / "runs" / "tiny-sweep"

    def training(run: str) -> bool:  # past its first logged step: the stop handler is in place
        path = out / run / "metrics.jsonl"
        return path.is_file() and any(json.loads(x).get("type") == "train" for x in path.read_text().splitlines()
                                      if x.strip().endswith("}"))

    cmd = [sys.executable, str(ROOT / "scripts" / "compare.py"), "--config", str(path), "--jobs", "2"]
    # SIGINT back to its default in the child: a test session started in the background by a non-interactive shell
    # (`pytest &`) ignores SIGINT, and an ignored signal stays ignored across exec
    parent = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not (training("gelu-s0") and training("swiglu-s0")):
        assert parent.poll() is None and time.monotonic() < deadline, parent.communicate()
        time.sleep(0.1)
    parent.send_signal(signal.SIGINT)  # to the parent only: it has to stop its children itself
    stdout, stderr = parent.communicate(timeout=200)
    assert parent.returncode == 130, stdout + stderr
    assert "stopping 2 running job(s)" in stderr
    pids = [int(line.split("(pid ")[1].split(",")[0]) for line in stdout.splitlines() if "(pid " in line]
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    for run in ("gelu-s0", "swiglu-s0"):
        assert any((out / run / "checkpoints").iterdir()), f"{run}: no checkpoint written on stop"
        assert "checkpoint saved to" in log_path(out / run).read_text()  # the trainer's own clean stop
    proc = compare_script("--config", str(path), "--jobs", "2", "--variants", "gelu", timeout=600)  # one is enough
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming from step" in log_path(out / "gelu-s0").read_text() and run_finished(plan_sweep(path).runs[0])


# ---------------------------------------------------------------------------------------------------------------
# submitit (the Slurm code path, through its LocalExecutor)

def test_submitit_jobs_give_the_sequential_sweeps_numbers(tmp_sweep_dir):
    seq = run_sweep(plan_sweep(sweep_file(tmp_sweep_dir, {"gelu": GELU, "swiglu": SWIGLU}, name="seq")))
    path = sweep_file(tmp_sweep_dir, {"gelu": GELU, "swiglu": SWIGLU}, name="sub",
                      launcher={"slurm": {"time": "20", "cpus_per_run": 2}})
    plan = plan_sweep(path)
    launcher = build_launcher(plan, "submitit-local")
    launcher.poll_s = 0.2
    doc = run_sweep(plan, launcher=launcher)
    per_seed = lambda d: {r["name"]: seed_losses(r) for r in d["variants"]}  # noqa: E731
    assert per_seed(doc) == per_seed(seq) and all(len(v) == 1 for v in per_seed(doc).values())
    records = json.loads((plan.out_dir / "submitit" / "jobs.json").read_text())
    assert set(records) == {"gelu-s0", "swiglu-s0"} and all(r["cluster"] == "local" for r in records.values())
    assert load_config(plan.out_dir / "gelu-s0" / "config.yaml").train.num_threads == 1  # min(config's 1, 2 cpus)


def test_no_wait_then_collect_finishes_a_tuning_sweep(tmp_sweep_dir):
    path = sweep_file(tmp_sweep_dir, {"gelu": GELU}, name="tuned", seeds=[0, 1],
                      tune={"train.lr": [2.0e-3, 4.0e-3]}, launcher={"slurm": {"time": "20"}})
    out = tmp_sweep_dir / "runs" / "tuned"
    jobs = out / "submitit" / "jobs.json"

    def wait_for_jobs():
        deadline = time.monotonic() + 300
        for rec in json.loads(jobs.read_text()).values():
            while time.monotonic() < deadline:
                try:
                    os.kill(int(rec["job_id"]), 0)
                except ProcessLookupError:
                    break
                time.sleep(0.5)

    base = ["--config", str(path), "--launcher", "submitit-local"]
    proc = compare_script(*base, "--no-wait")
    assert proc.returncode == 0 and "submitted" in proc.stdout, proc.stdout + proc.stderr
    assert set(json.loads(jobs.read_text())) == {"gelu-lr0.002-s0", "gelu-lr0.004-s0"}
    assert not (out / "report.json").exists()
    wait_for_jobs()
    proc = compare_script(*base, "--collect")  # tuning done: report so far, and the chosen point's seed 1 submitted
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(json.loads(jobs.read_text())) == 3
    assert "1 run(s) queued or running: --collect again" in proc.stdout or (out / "gelu-lr0.004-s1").is_dir()
    wait_for_jobs()
    proc = compare_script(*base, "--collect")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["missing_runs"] == [] and len(seed_losses(report["variants"][0])) == 2
    assert len(json.loads(jobs.read_text())) == 3  # nothing submitted twice
