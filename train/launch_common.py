"""What both launchers (train/launch.py's local jobs, train/launch_slurm.py's Slurm jobs) do the same way: the
resolved config a job trains, its thread count, its log file, data prepared once, and the lines reported back."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import yaml

from train.config import RunConfig
from train.config_load import validate_config
from train.rundir import LAUNCH_LOG

if TYPE_CHECKING:
    from train.plan import PlannedRun

ROOT = Path(__file__).resolve().parents[1]


def config_text(cfg: RunConfig) -> str:
    """The run's resolved config as YAML, checked to load back into the same RunConfig (what a job trains is exactly
    what was planned)."""
    text = cfg.to_yaml()
    if validate_config(yaml.safe_load(text), source="resolved config") != cfg:
        raise RuntimeError(f"the resolved config of {cfg.run_name} does not load back unchanged")
    return text


def with_threads(cfg: RunConfig, threads: Optional[int]) -> RunConfig:
    """cfg with train.num_threads = threads (or the config's own count when it is smaller); threads None: as is."""
    if threads is None:
        return cfg
    own = cfg.train.num_threads
    n = threads if own is None else min(own, threads)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_threads": n})})


def log_path(run_dir: Path) -> Path:
    """Where a launched run's stdout/stderr go: `<run_dir>/launch.log` (train/rundir.py knows the file: it never
    makes a run directory count as foreign or not empty)."""
    return Path(run_dir) / LAUNCH_LOG


def prepare_once(runs: list["PlannedRun"]) -> None:
    """Tokenize each distinct data config once, here, before jobs start (the data cache has no lock)."""
    from train.data import prepare_data
    seen = []
    for run in runs:
        if run.cfg.data not in seen:
            seen.append(run.cfg.data)
            prepare_data(run.cfg.data, progress=sys.stderr.isatty())


def last_error_line(path: Path) -> str:
    """The most telling line of a failed run's log: its last `error: ...` line, else its last line."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            lines = [x.strip() for x in f.read().decode("utf-8", "replace").splitlines() if x.strip()]
    except OSError:
        return ""
    errors = [x for x in lines if x.startswith("error:")]
    line = (errors or lines or [""])[-1]
    return line if len(line) <= 200 else line[:197] + "..."


def final_loss_text(run_dir: Path) -> str:
    from train.runs import read_final
    final = read_final(run_dir) or {}
    return f", val_loss {final['val_loss']:.4f}" if isinstance(final.get("val_loss"), (int, float)) else ""

