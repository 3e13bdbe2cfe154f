"""Reading a run directory back: its metrics.jsonl records, its final numbers, whether it finished, its curves.

The one parser of `metrics.jsonl` (written by train/tracking.py: one JSON object per line, `type` train | eval |
final). Readers tolerate a last line cut short by a kill; `strict=True` raises instead (for the trainer's own checks).
Compare, report, the trainer and the tests all read runs through here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

METRICS = "metrics.jsonl"


def iter_records(path: str | Path, strict: bool = False) -> Iterator[tuple[str, dict]]:
    """(raw line, record) for every JSON object line of a metrics file; a missing file yields nothing."""
    path = Path(path)
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8", errors="strict" if strict else "replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if strict:
                raise
            continue  # a line cut short by a kill
        if isinstance(rec, dict):
            yield line, rec


def read_metrics(path: str | Path, strict: bool = True) -> list[dict]:
    """Every record of a metrics.jsonl file, in order."""
    return [rec for _, rec in iter_records(path, strict)]


def read_final(run_dir: str | Path) -> Optional[dict]:
    """The last `final` record of run_dir/metrics.jsonl, or None."""
    final = None
    for _, rec in iter_records(Path(run_dir) / METRICS):
        if rec.get("type") == "final":
            final = rec
    return final


def is_finished(run_dir: str | Path, max_steps: int) -> bool:
    """A run is finished when its final record is at the planned last step and carries a validation loss."""
    final = read_final(run_dir)
    return final is not None and final.get("step") == max_steps and final.get("val_loss") is not None


@dataclass
class RunResult:
    """One finished (or partial) run, read back from its directory."""
    variant: str
    seed: int
    dir: Path
    finished: bool
    final: dict  # val_loss, val_bpb, tune_loss, tokens, wall_time_s, tokens_per_s, step
    evals: list[dict] = field(default_factory=list)  # step, tokens, wall_s, val_loss, val_bpb
    train: list[dict] = field(default_factory=list)  # step, tokens, wall_s, loss
    expert_load: list[dict] = field(default_factory=list)  # step, tokens, load: [layer][expert] fractions
    samples: list[dict] = field(default_factory=list)  # prompt, text
    health: dict = field(default_factory=dict)  # MoE routing health: moe_<name> -> {"final", "mean"} (layer means)
    size: Optional[str] = None  # the ladder size it belongs to (set by the report)
    level: Optional[str] = None  # the factor level it belongs to (set by the report)


def read_run(variant: str, seed: int, run_dir: str | Path) -> RunResult:
    """Curves, final metrics and samples of one run directory."""
    run_dir = Path(run_dir)
    evals, train, load, train_recs, final = [], [], [], [], None
    for _, rec in iter_records(run_dir / METRICS):
        kind = rec.get("type")
        if kind == "eval":
            evals.append({"step": rec["step"], "tokens": rec["tokens"], "wall_s": rec.get("time"),
                          "val_loss": rec.get("val_loss"), "val_bpb": rec.get("val_bpb")})
        elif kind == "train":
            train.append({"step": rec["step"], "tokens": rec["tokens"], "wall_s": rec.get("time"),
                          "loss": rec.get("loss")})
            train_recs.append(rec)
            if rec.get("expert_load"):
                load.append({"step": rec["step"], "tokens": rec["tokens"], "load": rec["expert_load"]})
        elif kind == "final":
            final = rec
    final = final or {}
    # Training throughput over all sessions of the run (the final line's tok_per_s covers the last session only):
    # total tokens / total optimizer-step time, the latter rebuilt from each logging window's tokens and rate.
    windows = [(b["tokens"] - a["tokens"], b["tok_per_s"]) for a, b in zip([{"tokens": 0}] + train_recs, train_recs)
               if b.get("tok_per_s")]
    step_time = sum(n / rate for n, rate in windows)
    tok_per_s = sum(n for n, _ in windows) / step_time if step_time > 0 else final.get("tok_per_s")
    samples = []
    try:
        doc = json.loads((run_dir / "samples.json").read_text(encoding="utf-8"))
        samples = [{"prompt": s["prompt"], "text": s["prompt"] + s["completion"]} for s in doc.get("samples", [])]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    summary = {"val_loss": final.get("val_loss"), "val_bpb": final.get("val_bpb"),
               "tune_loss": final.get("tune_loss"), "tokens": final.get("tokens"), "wall_time_s": final.get("time"),
               "tokens_per_s": tok_per_s, "step": final.get("step")}
    return RunResult(variant, seed, run_dir, bool(final) and final.get("val_loss") is not None, summary, evals,
                     train, load, samples, routing_health(train_recs))


def routing_health(train_recs: list[dict]) -> dict[str, dict[str, float]]:
    """Each per-layer `moe_*` series of the train lines (model/moe_balance.RoutingStats) as its mean over layers at
    the last logging window ("final") and over all windows ("mean")."""
    series: dict[str, list[float]] = {}
    for rec in train_recs:
        for key, per_layer in rec.items():
            if key.startswith("moe_") and isinstance(per_layer, list) and per_layer:
                series.setdefault(key, []).append(sum(per_layer) / len(per_layer))
    return {key: {"final": values[-1], "mean": sum(values) / len(values)} for key, values in series.items()}
