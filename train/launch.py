"""Training a sweep's runs outside the sweep's own process: several at once on this machine (`--jobs N`), or as
Slurm jobs through submitit (`--launcher slurm`). The sequential in-process loop stays in train/compare.py, which
decides what to train, when (the tuning grid, then the chosen points) and what to report; a launcher only trains the
runs it is handed and says which failed.

- Local jobs (`LocalPool`): each run is `python scripts/train.py --config <its resolved config>` in a child process,
  the config dumped from the planned `RunConfig` (and checked to load back equal), so a run trained this way is the
  same computation as the same run trained alone: bit-identical on CPU at the same `train.num_threads`. That thread
  count is `cores // jobs` (or the config's own, if smaller) for every run of the sweep, whatever is left to train,
  so a resumed sweep keeps it. With GPUs, one GPU per job (`CUDA_VISIBLE_DEVICES`). A child's stdout and stderr go
  to its run's `launch.log`; a failed child (non-zero exit) is reported with that path and the others go on; Ctrl-C
  or SIGTERM stops every child cleanly (SIGTERM: a checkpoint at the step boundary; SIGKILL after a grace period).
- Slurm (`SubmititLauncher`, train/launch_slurm.py): each run is one submitit job (one job array per phase) calling
  `train_job(yaml text)`, a module-level function: only the config's text is pickled, never code. Jobs are recorded
  in `<sweep>/submitit/jobs.json`, so a rerun of the same command waits for (or, with --no-wait, leaves) jobs still
  queued or running instead of submitting them twice, and `--collect` can report and submit the next phase later.
  `cluster="local"` runs the same path through submitit's LocalExecutor on this machine (the tests use it).

Data is tokenized once, by the launching process, before any job starts (two jobs building one cache would race).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from train.errors import ConfigError
from train.launch_common import (ROOT, config_text, final_loss_text, last_error_line, log_path, prepare_once,
                                 with_threads)
from train.launch_slurm import SubmititLauncher, slurm_options

if TYPE_CHECKING:
    from train.plan import PlannedRun, SweepPlan

TRAIN_SCRIPT = ROOT / "scripts" / "train.py"
STOP_GRACE_S = 120.0  # after Ctrl-C / SIGTERM: how long a child may take to write its checkpoint before SIGKILL


class LaunchInterrupted(KeyboardInterrupt):
    """SIGTERM to the launching process: handled like Ctrl-C (children stopped, exit 130)."""


# ----------------------------------------------------------------------------------------------------------------
# How many jobs, on which devices

def cpu_count() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's or a Slurm allocation's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def visible_gpus(runs: list["PlannedRun"]) -> list[str]:
    """The CUDA devices the runs would use (none when every run is pinned to the CPU, or there is no GPU)."""
    if all(r.cfg.train.device == "cpu" for r in runs):
        return []
    import torch
    n = torch.cuda.device_count()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:n] if listed else [str(i) for i in range(n)]


def auto_jobs(cores: int, gpus: list[str]) -> int:
    """`--jobs auto`: one job per GPU; on CPU 1 job at <= 2 cores (two runs at once on 2 idle cores measured no
    faster than one after the other), else ~4 threads per job (cores // 4, at least 2)."""
    if gpus:
        return len(gpus)
    return 1 if cores <= 2 else max(2, cores // 4)


def parse_jobs(text: str) -> Optional[int]:
    """--jobs N | auto -> N, or None for auto (resolved against the machine by `build_launcher`)."""
    if text.strip().lower() == "auto":
        return None
    try:
        jobs = int(text)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise ConfigError(f"--jobs expects a positive integer or 'auto', got '{text}'")
    return jobs



# ----------------------------------------------------------------------------------------------------------------
# Local jobs: child processes on this machine

class LocalPool:
    """Train runs as up to `jobs` child processes at once, `threads` CPU threads each, one GPU each when `gpus`."""

    waits = True

    def __init__(self, jobs: int, threads: int, gpus: Optional[list[str]] = None):
        gpus = list(gpus or [])
        if gpus and jobs > len(gpus):
            raise ConfigError(f"--jobs {jobs}: only {len(gpus)} GPU(s) visible ({','.join(gpus)}); one GPU per job")
        self.jobs, self.threads, self.gpus = jobs, threads, gpus

    def describe(self) -> str:
        where = f", one GPU each ({','.join(self.gpus)})" if self.gpus else ""
        return f"{self.jobs} local jobs at once, {self.threads} CPU thread(s) each{where}"

    def train(self, todo: list[tuple[str, "PlannedRun"]]) -> dict[str, str]:
        """Train every (tag, run) of `todo`; returns {run name: why it failed} for the ones that failed."""
        if not todo:
            return {}
        prepare_once([run for _, run in todo])
        failures: dict[str, str] = {}
        queue = list(todo)
        running: dict[subprocess.Popen, tuple] = {}  # child -> (tag, run, gpu, start time, log file)
        free_gpus = list(self.gpus)
        tmp = Path(tempfile.mkdtemp(prefix="minimind-launch-"))
        old_term = _on_sigterm_raise()
        try:
            while queue or running:
                while queue and len(running) < self.jobs:
                    tag, run = queue.pop(0)
                    gpu = free_gpus.pop(0) if self.gpus else None
                    child, log = self._start(tag, run, gpu, tmp)
                    running[child] = (tag, run, gpu, time.monotonic(), log)
                time.sleep(0.2)
                for child in [c for c in running if c.poll() is not None]:
                    tag, run, gpu, start, log = running.pop(child)
                    log.close()
                    if gpu is not None:
                        free_gpus.append(gpu)
                    self._finished(tag, run, child.returncode, time.monotonic() - start, failures)
        except BaseException:
            _stop_children(list(running))
            raise
        finally:
            for *_, log in running.values():
                log.close()
            signal.signal(signal.SIGTERM, old_term)
            shutil.rmtree(tmp, ignore_errors=True)
        return failures

    def _start(self, tag: str, run: "PlannedRun", gpu: Optional[str], tmp: Path) -> tuple[subprocess.Popen, Any]:
        cfg = with_threads(run.cfg, self.threads)
        path = tmp / f"{run.name}.yaml"
        path.write_text(config_text(cfg), encoding="utf-8")
        log = log_path(cfg.out_dir)
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(cfg.train.num_threads)}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        f = open(log, "ab")
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {run.name}: {cfg.train.num_threads} thread(s)"
                f"{', GPU ' + gpu if gpu is not None else ''} ===\n".encode())
        f.flush()
        child = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), "--config", str(path)], stdin=subprocess.DEVNULL,
                                 stdout=f, stderr=subprocess.STDOUT, env=env)
        print(f"{tag} {run.name}: training -> {cfg.out_dir} (pid {child.pid}, log {log})", flush=True)
        return child, f

    @staticmethod
    def _finished(tag: str, run: "PlannedRun", code: int, seconds: float, failures: dict[str, str]) -> None:
        log = log_path(run.cfg.out_dir)
        if code == 0:
            print(f"{tag} {run.name}: done in {seconds:.0f} s{final_loss_text(run.cfg.out_dir)}", flush=True)
            return
        line = last_error_line(log)
        failures[run.name] = f"exit {code}{': ' + line if line else ''}; log {log}"
        print(f"warning: {run.name} failed (exit {code}{': ' + line if line else ''}); log {log}; the sweep goes "
              "on without it", file=sys.stderr, flush=True)


def _on_sigterm_raise():
    """Turn SIGTERM into LaunchInterrupted (children are then stopped like on Ctrl-C); returns the old handler."""
    def handler(signum, frame):
        raise LaunchInterrupted()
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return signal.getsignal(signal.SIGTERM)


def _stop_children(children: list[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every child still running (the trainer then writes a checkpoint at the step boundary and exits), wait
    up to grace_s, then SIGKILL; a second Ctrl-C while waiting kills at once."""
    alive = [c for c in children if c.poll() is None]
    if not alive:
        return
    print(f"stopping {len(alive)} running job(s): a checkpoint each, then exit", file=sys.stderr, flush=True)
    for c in alive:
        c.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    try:
        while any(c.poll() is None for c in alive) and time.monotonic() < deadline:
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        for c in alive:
            if c.poll() is None:
                c.kill()
        for c in alive:
            c.wait()


# ----------------------------------------------------------------------------------------------------------------

def build_launcher(plan: "SweepPlan", kind: str = "local", jobs: Optional[int] = 1, slurm_cli: list[str] = (),
                   wait: bool = True):
    """The launcher for `scripts/compare.py`'s flags: None (train in this process, one run after the other), a
    LocalPool (--jobs N > 1) or a SubmititLauncher (--launcher slurm | submitit-local). Options are validated here,
    before anything trains."""
    opts = slurm_options(plan.sweep.launcher, slurm_cli, str(plan.sweep_path))
    if kind == "local":
        if slurm_cli:
            raise ConfigError("--slurm options need --launcher slurm")
        if not wait:
            raise ConfigError("--no-wait needs --launcher slurm (local jobs are children of this process)")
        if jobs == 1:
            return None
        gpus = visible_gpus(plan.all_runs)
        cores = cpu_count()
        n = auto_jobs(cores, gpus) if jobs is None else jobs
        if n == 1:
            return None
        return LocalPool(n, max(1, cores // n), gpus)
    if kind not in ("slurm", "submitit-local"):
        raise ConfigError(f"--launcher must be local, slurm or submitit-local, got '{kind}'")
    if jobs != 1:
        raise ConfigError("--jobs is for local runs; with --launcher slurm every run is its own job "
                          "(launcher.slurm.array_parallelism caps how many run at once)")
    return SubmititLauncher(plan, opts, cluster="slurm" if kind == "slurm" else "local", wait=wait)
