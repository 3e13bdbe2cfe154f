"""Sweep runs as Slurm jobs through submitit (`scripts/compare.py --launcher slurm | submitit-local`): the
`launcher.slurm` options (sweep file and `--slurm key=value`), the job function and `SubmititLauncher`. See
train/launch.py's docstring for how this fits with local jobs."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError, field_validator

from train.config_load import validate_config
from train.errors import ConfigError, UserError
from train.fsutil import write_atomic
from train.launch_common import ROOT, config_text, final_loss_text, last_error_line, prepare_once, with_threads

if TYPE_CHECKING:
    from train.plan import PlannedRun, SweepPlan

# ----------------------------------------------------------------------------------------------------------------
# Slurm options

_NAME = re.compile(r"^[A-Za-z0-9_.,:+-]+$")
_MEM = re.compile(r"^[1-9][0-9]*[KMGT]?$")
_TIME_FORMS = "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"


def slurm_minutes(text: str) -> int:
    """A Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes, rounded up."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(f"'{text}' is not a Slurm time ({_TIME_FORMS})")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        h, mi, s = a, b or 0, c or 0
        if h >= 24 or mi >= 60 or s >= 60:
            raise ValueError(f"'{text}' is not a Slurm time ({_TIME_FORMS})")
        seconds = ((days * 24 + h) * 60 + mi) * 60 + s
    elif c is not None:  # HH:MM:SS
        if b >= 60 or c >= 60:
            raise ValueError(f"'{text}' is not a Slurm time ({_TIME_FORMS})")
        seconds = (a * 60 + b) * 60 + c
    elif b is not None:  # MM:SS
        if b >= 60:
            raise ValueError(f"'{text}' is not a Slurm time ({_TIME_FORMS})")
        seconds = a * 60 + b
    else:
        seconds = a * 60
    if seconds <= 0:
        raise ValueError(f"'{text}' must be a positive time limit")
    return math.ceil(seconds / 60)


class SlurmOptions(BaseModel):
    """Per-run resources of a Slurm job. They decide where and how fast a run trains, never what it computes — except
    cpus_per_run, which becomes the run's train.num_threads (or the config's own count, if smaller)."""
    model_config = ConfigDict(extra="forbid")
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: Optional[str] = None  # the time limit of one run (required on Slurm)
    cpus_per_run: Optional[StrictInt] = None
    gpus_per_run: StrictInt = 0
    mem: Optional[str] = None  # per run, Slurm --mem: 16G, 4000M, ...
    array_parallelism: Optional[StrictInt] = None  # at most this many runs of a job array at once

    @field_validator("partition", "account", "qos", "mem", mode="before")
    @classmethod
    def _scalar_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("time", mode="before")
    @classmethod
    def _time_text(cls, value: Any) -> Any:
        # YAML reads 2:00:00 as the base-60 integer 7200, indistinguishable from 7200 minutes: only text is taken
        if not isinstance(value, str) and value is not None:
            raise ValueError(f"write the time limit as quoted text, e.g. '2:00:00' (YAML reads an unquoted "
                             f"H:MM:SS as a number), got {value!r}")
        return value

    @field_validator("partition", "account", "qos")
    @classmethod
    def _name(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not _NAME.match(value):
            raise ValueError(f"'{value}' is not a Slurm name (letters, digits, _ . , : + -)")
        return value

    @field_validator("time")
    @classmethod
    def _time(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            slurm_minutes(value)
        return value

    @field_validator("mem")
    @classmethod
    def _mem(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not _MEM.match(value):
            raise ValueError(f"'{value}' is not a Slurm memory size (a positive integer with K, M, G or T, e.g. 16G)")
        return value

    @field_validator("cpus_per_run", "array_parallelism")
    @classmethod
    def _positive(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return value

    @field_validator("gpus_per_run")
    @classmethod
    def _gpus(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"must be >= 0, got {value}")
        return value

    @property
    def minutes(self) -> Optional[int]:
        return None if self.time is None else slurm_minutes(self.time)


def _validate_slurm(data: Any, where: str, prefix: str) -> SlurmOptions:
    """Validate one source of Slurm options; errors read `<prefix><key>: <what is wrong>`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of Slurm options ({', '.join(SlurmOptions.model_fields)}), "
                          f"got {type(data).__name__}")
    try:
        return SlurmOptions.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            msg = f"unknown key (valid: {', '.join(SlurmOptions.model_fields)})"
        else:
            msg = " ".join(first["msg"].removeprefix("Value error, ").split())
            if first["type"].endswith("_type") or first["type"].startswith(("int_", "string_")):
                msg += f", got {first.get('input')!r}"
        raise ConfigError(f"{prefix}{key}: {msg}") from None


def slurm_options(launcher_block: Optional[dict], cli: list[str] = (), sweep_path: str = "sweep file") -> SlurmOptions:
    """The sweep file's `launcher: {slurm: {...}}` with the command line's `--slurm key=value` on top; each source is
    validated on its own, so an error names where the bad value came from (one line, exit 2)."""
    block = launcher_block or {}
    if not isinstance(block, dict) or set(block) - {"slurm"}:
        raise ConfigError(f"{sweep_path}: launcher: expected {{slurm: {{...}}}}, got {block!r}")
    from_file = block.get("slurm") or {}
    _validate_slurm(from_file, f"{sweep_path}: launcher.slurm", f"{sweep_path}: launcher.slurm.")
    from_cli: dict[str, Any] = {}
    for text in cli:  # values stay text (a time like 2:00:00 must not become a number), integers excepted
        key, sep, raw = text.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not re.fullmatch(r"[a-z_]+", key):
            raise ConfigError(f"--slurm expects key=value (keys: {', '.join(SlurmOptions.model_fields)}), got "
                              f"'{text}'")
        from_cli[key] = int(raw) if re.fullmatch(r"[+-]?\d+", raw) and key != "time" else raw
    _validate_slurm(from_cli, "--slurm", "--slurm ")
    return SlurmOptions.model_validate({**from_file, **from_cli})


def slurm_parameters(opts: SlurmOptions, job_name: str) -> dict:
    """submitit SlurmExecutor parameters (sbatch options) of one run's job."""
    if opts.minutes is None:
        raise ConfigError("--launcher slurm needs a time limit per run: launcher.slurm.time in the sweep file or "
                          "--slurm time=HH:MM:SS")
    params: dict[str, Any] = {"job_name": job_name, "time": opts.minutes, "nodes": 1, "ntasks_per_node": 1,
                              "stderr_to_stdout": True}
    for key, value in (("partition", opts.partition), ("account", opts.account), ("qos", opts.qos),
                       ("cpus_per_task", opts.cpus_per_run), ("mem", opts.mem),
                       ("array_parallelism", opts.array_parallelism)):
        if value is not None:
            params[key] = value
    if opts.gpus_per_run:
        params["gpus_per_node"] = opts.gpus_per_run
    return params


# ----------------------------------------------------------------------------------------------------------------
# Slurm jobs through submitit

def train_job(config_yaml: str, cwd: str) -> dict:
    """What a submitit job runs: train the run whose resolved config is `config_yaml` (YAML text: data, never code),
    in the submitting directory `cwd` (relative paths in the config are relative to it). Returns its final metrics."""
    from train.trainer import train
    before = os.getcwd()
    os.chdir(cwd)
    try:  # a job process is ours alone, but the local executor's tests call this in-process: leave the cwd as found
        cfg = validate_config(yaml.safe_load(config_yaml), source="submitted config")
        return train(cfg)
    finally:
        os.chdir(before)


class SubmititLauncher:
    """One submitit job per run (a job array per phase) on Slurm, or on this machine with cluster="local"."""

    def __init__(self, plan: "SweepPlan", opts: SlurmOptions, cluster: str = "slurm", wait: bool = True,
                 poll_s: Optional[float] = None):
        if cluster not in ("slurm", "local"):
            raise ValueError(f"cluster must be slurm or local, got {cluster!r}")
        self.opts, self.cluster, self.waits = opts, cluster, wait
        self.folder = plan.out_dir / "submitit"
        self.records_path = self.folder / "jobs.json"
        self.job_name = plan.sweep.name
        self.params = slurm_parameters(opts, self.job_name) if cluster == "slurm" else None
        self.poll_s = poll_s if poll_s is not None else (1.0 if cluster == "local" else 15.0)
        self._executor = None
        self._jobs: dict[str, Any] = {}  # run name -> Job submitted or adopted by this process

    def describe(self) -> str:
        if self.cluster == "local":
            return f"submitit LocalExecutor on this machine (jobs in {self.folder})"
        shown = ", ".join(f"{k}={v}" for k, v in self.params.items() if k not in ("job_name", "nodes",
                                                                                 "ntasks_per_node",
                                                                                 "stderr_to_stdout"))
        return f"Slurm via submitit ({shown}; jobs in {self.folder})"

    # -- records -----------------------------------------------------------------------------------------------

    def records(self) -> dict[str, dict]:
        try:
            data = json.loads(self.records_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _record(self, jobs: dict[str, Any]) -> None:
        data = self.records()
        for name, job in jobs.items():
            data[name] = {"job_id": str(job.job_id), "cluster": self.cluster,
                          "submitted": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.records_path, json.dumps(data, indent=1, sort_keys=True) + "\n")

    def _job(self, name: str) -> Optional[Any]:
        """The job of a run: the one this process holds, else the recorded one (None: never submitted)."""
        if name in self._jobs:
            return self._jobs[name]
        rec = self.records().get(name)
        if not rec or rec.get("cluster") != self.cluster:
            return None
        import submitit
        cls = submitit.LocalJob if self.cluster == "local" else submitit.SlurmJob
        return cls(self.folder, str(rec["job_id"]))

    def active(self, job: Any) -> bool:
        """Whether a job is still queued or running (no result file yet, and its process or Slurm job is alive)."""
        if job.paths.result_pickle.exists():
            return False
        if self.cluster == "local":
            proc = getattr(job, "_process", None)  # set for the jobs this process submitted
            alive = proc.poll() is None if proc is not None else _pid_alive(int(job.job_id))
        else:
            alive = not job.done()  # sacct, rate-limited by submitit
        return alive and not job.paths.result_pickle.exists()

    def outcome(self, run: "PlannedRun", job: Any) -> Optional[str]:
        """None when the ended job trained its run (read from the run directory, never from a pickle), else why
        not: the job log's last error line and its path."""
        from train.plan import run_finished
        if run_finished(run):
            return None
        log = Path(job.paths.stdout)
        line = last_error_line(log)
        state = "" if self.cluster == "local" or job.paths.result_pickle.exists() else f", Slurm state {job.state}"
        return f"job {job.job_id}{state}: {line or 'ended without finishing the run'}; log {log}"

    def ended_failures(self, runs: list["PlannedRun"]) -> dict[str, str]:
        """{run name: why} for the runs whose recorded job ended without training them."""
        out = {}
        for run in runs:
            job = self._job(run.name)
            if job is not None and not self.active(job):
                why = self.outcome(run, job)
                if why is not None:
                    out[run.name] = why
        return out

    def submitted(self, name: str) -> bool:
        return self._job(name) is not None

    # -- submitting and waiting --------------------------------------------------------------------------------

    def _make_executor(self):
        if self._executor is not None:
            return self._executor
        import submitit
        if self.cluster == "local":
            ex = submitit.LocalExecutor(self.folder)
            ex.update_parameters(timeout_min=self.opts.minutes or 24 * 60, gpus_per_node=self.opts.gpus_per_run,
                                 stderr_to_stdout=True)
        else:
            try:
                ex = submitit.SlurmExecutor(self.folder, max_num_timeout=0)
            except RuntimeError as e:
                raise UserError(f"--launcher slurm: no Slurm here ({e}); run on a login node, or without "
                                "--launcher for local runs") from None
            ex.update_parameters(**self.params)
        self._executor = ex
        return ex

    def train(self, todo: list[tuple[str, "PlannedRun"]]) -> dict[str, str]:
        """Submit every run of `todo` that has no queued or running job (adopting those that have one), then wait for
        all of them (or, without waiting, return at once). Returns {run name: why it failed}."""
        if not todo:
            return {}
        submit = []
        for tag, run in todo:
            job = self._job(run.name)
            if job is not None and self.active(job):
                self._jobs[run.name] = job
                print(f"{tag} {run.name}: job {job.job_id} is still queued or running; not submitted again",
                      flush=True)
            else:
                submit.append((tag, run))
        if submit:
            self._submit(submit)
        if not self.waits:
            return {}
        return self._wait(todo)

    def _submit(self, todo: list[tuple[str, "PlannedRun"]]) -> None:
        ex = self._make_executor()  # first: no Slurm here is one line before anything else happens
        prepare_once([run for _, run in todo])
        texts = [config_text(with_threads(run.cfg, self.opts.cpus_per_run)) for _, run in todo]
        cwd = os.getcwd()
        # The job's python must import this module: the project root goes on its path, in the environment that
        # LocalExecutor's processes inherit and sbatch exports at submission — for the submission only (this
        # process's own children, e.g. scripts run later by a caller, keep the environment they had).
        old_path = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *[p for p in (old_path or "").split(os.pathsep) if p]])
        try:
            with ex.batch():
                jobs = [ex.submit(train_job, text, cwd) for text in texts]
        except (OSError, subprocess.CalledProcessError, RuntimeError) as e:
            raise UserError(f"submitting {len(todo)} job(s) failed: {' '.join(str(e).split())[:300]}") from None
        finally:
            if old_path is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old_path
        new = {run.name: job for (_, run), job in zip(todo, jobs)}
        self._jobs.update(new)
        self._record(new)
        for (tag, run), job in zip(todo, jobs):
            print(f"{tag} {run.name}: submitted as job {job.job_id} -> {run.cfg.out_dir} (log {job.paths.stdout})",
                  flush=True)

    def _wait(self, todo: list[tuple[str, "PlannedRun"]]) -> dict[str, str]:
        failures: dict[str, str] = {}
        pending = {run.name: (tag, run) for tag, run in todo}
        start = time.monotonic()
        try:
            while pending:
                for name in list(pending):
                    job = self._jobs[name]
                    if self.active(job):
                        continue
                    tag, run = pending.pop(name)
                    why = self.outcome(run, job)
                    if why is None:
                        print(f"{tag} {name}: done after {time.monotonic() - start:.0f} s"
                              f"{final_loss_text(run.cfg.out_dir)}", flush=True)
                    else:
                        failures[name] = why
                        print(f"warning: {name} failed ({why}); the sweep goes on without it", file=sys.stderr,
                              flush=True)
                if pending:
                    time.sleep(self.poll_s)
        except KeyboardInterrupt:
            ids = " ".join(str(self._jobs[n].job_id) for n in pending)
            cancel = f"; cancel them with `scancel {ids}`" if self.cluster == "slurm" else ""
            print(f"{len(pending)} unfinished job(s) not cancelled ({ids}): rerun the same command to wait for them, "
                  f"or --collect later for the report{cancel}", file=sys.stderr, flush=True)
            raise
        return failures


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

