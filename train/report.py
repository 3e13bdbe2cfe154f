"""Sweep report: read every run directory of a sweep, aggregate over seeds, write report.md and report.json.

Statistics (stated in the report itself):
- mean ± sample standard deviation (ddof=1) over seeds; with one seed the std and the noise are unknown.
- rank by mean final validation loss (1 = best).
- Δ vs baseline = mean(variant) - mean(baseline). Runs with the same seed see the same batches in the same order, so
  when both variants have >= 2 common seeds the standard error comes from the per-seed paired differences
  (SE = std(d_s)/sqrt(n)); otherwise, with >= 2 seeds each, SE = sqrt(s_a²/n_a + s_b²/n_b). A difference is
  "within seed noise" when |Δ| < 2·SE (roughly a 95% interval; lenient for very few seeds, so treat "beyond noise"
  with 2-3 seeds as suggestive, not conclusive).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

NOISE_RULE = ("Δ is 'within seed noise' when |Δ| < 2·SE, SE from the per-seed paired differences (same seed = same "
              "data order) when there are >= 2 common seeds, else sqrt(s_a²/n_a + s_b²/n_b); with one seed the noise "
              "is unknown.")


@dataclass
class RunResult:
    """One finished (or partial) run, read back from its directory."""
    variant: str
    seed: int
    dir: Path
    finished: bool
    final: dict  # val_loss, val_bpb, tokens, wall_time_s, tokens_per_s
    evals: list[dict] = field(default_factory=list)  # step, tokens, wall_s, val_loss, val_bpb
    train: list[dict] = field(default_factory=list)  # step, tokens, wall_s, loss
    expert_load: list[dict] = field(default_factory=list)  # step, tokens, load: [layer][expert] fractions
    samples: list[dict] = field(default_factory=list)  # prompt, text


# ----------------------------------------------------------------------------------------------------------------
# Reading runs

def read_run(variant: str, seed: int, run_dir: Path) -> RunResult:
    """Curves, final metrics and samples of one run directory as written by train/trainer.py."""
    from train.compare import read_final
    run_dir = Path(run_dir)
    evals, train, load, train_recs = [], [], [], []
    path = run_dir / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        kind = rec.get("type") if isinstance(rec, dict) else None
        if kind == "eval":
            evals.append({"step": rec["step"], "tokens": rec["tokens"], "wall_s": rec.get("time"),
                          "val_loss": rec.get("val_loss"), "val_bpb": rec.get("val_bpb")})
        elif kind == "train":
            train.append({"step": rec["step"], "tokens": rec["tokens"], "wall_s": rec.get("time"),
                          "loss": rec.get("loss")})
            train_recs.append(rec)
            if rec.get("expert_load"):
                load.append({"step": rec["step"], "tokens": rec["tokens"], "load": rec["expert_load"]})
    final = read_final(run_dir) or {}
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
    summary = {"val_loss": final.get("val_loss"), "val_bpb": final.get("val_bpb"), "tokens": final.get("tokens"),
               "wall_time_s": final.get("time"), "tokens_per_s": tok_per_s, "step": final.get("step")}
    return RunResult(variant, seed, run_dir, bool(final) and final.get("val_loss") is not None, summary, evals,
                     train, load, samples)


def build_report(plan, command: str = "") -> dict:
    """Read the plan's run directories, write report.json, report.md and the PNGs into the sweep directory, log
    a wandb summary table; returns the report document."""
    from train.compare import check_param_match, count_params, is_finished
    from train.config import read_yaml, validate_config
    from train.plots import make_plots
    results = []
    for run in plan.runs + plan.reference_runs:
        result = read_run(run.variant, run.seed, run.cfg.out_dir)
        result.finished = result.finished and is_finished(run)
        results.append(result)
    # Exact counts from a finished run's resolved config (the plan's may use an estimated vocabulary size).
    for name, info in plan.variants.items():
        done = next((r for r in results if r.variant == name and r.finished), None)
        if done is not None and (done.dir / "config.yaml").is_file():
            cfg = validate_config(read_yaml(done.dir / "config.yaml"), source=str(done.dir / "config.yaml"))
            info.counts, info.flops_per_token, info.vocab_estimated = count_params(cfg)
    check_param_match(plan, refuse=False)
    doc = summarize(plan, results, command)
    doc["plots"] = [p.name for p in make_plots(doc, results, plan.out_dir)]
    md_path, _ = write_report(doc, plan.out_dir)
    log_wandb_summary(plan, doc)
    print(f"report: {md_path} ({len(results) - len(doc['missing_runs'])}/{len(results)} runs finished)", flush=True)
    return doc


REPORT_COLUMNS = ["name", "ffn", "rank", "matched_on", "params_ffn", "params_total", "params_active",
                  "flops_per_token", "tokens", "tokens_per_s", "wall_time_s", "val_loss_mean", "val_loss_std",
                  "val_bpb_mean", "val_bpb_std", "delta_vs_baseline", "within_noise"]


def log_wandb_summary(plan, doc: dict) -> None:
    """A short wandb run in the sweep's group holding the report table and plots; a failure is one warning."""
    cfg = plan.runs[0].cfg
    if cfg.wandb.mode == "disabled":
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb
        run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, group=plan.sweep.name,
                         name=f"{plan.sweep.name}-summary", job_type="summary", tags=[plan.sweep.name, "summary"],
                         mode=cfg.wandb.mode, dir=os.environ.get("WANDB_DIR") or str(plan.out_dir), config={"report": str(plan.out_dir)},
                         settings=wandb.Settings(console="off"))
        rows = [[row.get(c) if c != "within_noise" else str(row.get(c)) for c in REPORT_COLUMNS]
                for row in doc["variants"]]
        run.log({"report": wandb.Table(columns=REPORT_COLUMNS, data=rows),
                 **{f"plots/{Path(p).stem}": wandb.Image(str(plan.out_dir / p)) for p in doc.get("plots", [])}})
        run.finish()
    except Exception as e:  # the report on disk is complete; wandb is a convenience
        print(f"warning: wandb summary not logged ({' '.join(str(e).split())[:200] or type(e).__name__})",
              file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Statistics

def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) >= 2 else None)


def delta_vs(a: dict[int, float], b: dict[int, float]) -> tuple[Optional[float], Optional[float]]:
    """(Δ = mean(a) - mean(b), its standard error or None), a/b map seed -> value."""
    if not a or not b:
        return None, None
    delta = statistics.fmean(a.values()) - statistics.fmean(b.values())
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        diffs = [a[s] - b[s] for s in common]
        return delta, statistics.stdev(diffs) / math.sqrt(len(diffs))
    if len(a) >= 2 and len(b) >= 2:
        return delta, math.sqrt(statistics.variance(a.values()) / len(a) + statistics.variance(b.values()) / len(b))
    return delta, None


def within_noise(delta: Optional[float], se: Optional[float]) -> Optional[bool]:
    if delta is None or se is None:
        return None
    return abs(delta) < 2 * se


# ----------------------------------------------------------------------------------------------------------------
# Aggregation

def summarize(plan, results: list[RunResult], command: str = "") -> dict:
    """The report.json document: one entry per variant of the plan, with numbers aggregated over its seeds."""
    sweep = plan.sweep
    by_variant: dict[str, list[RunResult]] = {}
    for r in results:
        if r.finished:
            by_variant.setdefault(r.variant, []).append(r)
    rows = []
    for name, info in plan.variants.items():
        runs = sorted(by_variant.get(name, []), key=lambda r: r.seed)
        loss = {r.seed: r.final["val_loss"] for r in runs}
        bpb = {r.seed: r.final.get("val_bpb") for r in runs}
        loss_mean, loss_std = mean_std(list(loss.values()))
        bpb_mean, bpb_std = mean_std(list(bpb.values()))
        counts = info.counts
        ffn = info.cfg.model.ffn
        rows.append({
            "name": name,
            "ffn": _ffn_text(ffn),
            "description": sweep.variants[name].description,
            "family": sweep.variants[name].family,
            "seeds": [r.seed for r in runs],
            "runs": [str(r.dir) for r in runs],
            "matched_on": info.matched_on,
            "param_rel_diff": info.rel_diff,
            "params_total": counts.get("total"),
            "params_active": counts.get("active"),
            "params_ffn": counts.get("ffn"),
            "params_ffn_active": counts.get("ffn_active"),
            "params_non_embedding": counts.get("non_embedding"),
            "flops_per_token": info.flops_per_token,
            "tokens": _mean([r.final.get("tokens") for r in runs]),
            "tokens_per_s": _mean([r.final.get("tokens_per_s") for r in runs]),
            "wall_time_s": _mean([r.final.get("wall_time_s") for r in runs]),
            "train_flops": (_mean([r.final.get("tokens") for r in runs]) or 0) * info.flops_per_token or None,
            "val_loss_mean": loss_mean, "val_loss_std": loss_std,
            "val_bpb_mean": bpb_mean, "val_bpb_std": bpb_std,
            "val_loss_per_seed": {str(s): v for s, v in loss.items()},
            "val_bpb_per_seed": {str(s): v for s, v in bpb.items()},
            "_loss": loss, "_bpb": bpb,
            "samples": runs[0].samples[:sweep.sample_count] if runs else [],
        })
    ranked = sorted((r for r in rows if r["val_loss_mean"] is not None), key=lambda r: r["val_loss_mean"])
    for i, row in enumerate(ranked, 1):
        row["rank"] = i
    base = next((r for r in rows if r["name"] == sweep.baseline), None)
    for row in rows:
        row.setdefault("rank", None)
        d, se = delta_vs(row["_loss"], base["_loss"]) if base else (None, None)
        db, seb = delta_vs({k: v for k, v in row["_bpb"].items() if v is not None},
                           {k: v for k, v in base["_bpb"].items() if v is not None}) if base else (None, None)
        is_base = row["name"] == sweep.baseline
        row["delta_vs_baseline"] = None if is_base else d
        row["delta_se"] = None if is_base else se
        row["delta_bpb_vs_baseline"] = None if is_base else db
        row["within_noise"] = None if is_base else within_noise(d, se)
    for row in rows:
        del row["_loss"], row["_bpb"]
    expected = {f"{r.variant}-s{r.seed}" for r in plan.runs}
    done = {f"{r.variant}-s{r.seed}" for r in results if r.finished}
    return {
        "sweep": sweep.name,
        "description": sweep.description,
        "sweep_file": str(plan.sweep_path),
        "base_config": str(plan.base_path),
        "baseline": sweep.baseline,
        "match_on": sweep.match_on,
        "param_tolerance": sweep.param_tolerance,
        "noise_rule": NOISE_RULE,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(),
        "missing_runs": sorted(expected - done),
        "variants": sorted(rows, key=lambda r: (r["rank"] is None, r["rank"] or 0)),
    }


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean = statistics.fmean(values)
    return int(mean) if all(isinstance(v, int) for v in values) and mean.is_integer() else mean


def _ffn_text(ffn) -> str:
    if ffn.type == "none":
        return "none"
    if ffn.type == "moe":
        shared = f" + {ffn.n_shared_experts} shared" if ffn.n_shared_experts else ""
        return f"moe {ffn.n_experts}e top-{ffn.top_k}{shared} ({ffn.expert_type} {ffn.expert_activation})"
    return f"{ffn.type} {ffn.activation}"


def machine_info() -> dict:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = f"{names[0]} ({len(names)} logical CPUs)" if names else cpu
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cpu": cpu, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ----------------------------------------------------------------------------------------------------------------
# Writing

def _fmt_int(n) -> str:
    if n is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_pm(mean, std, digits=4) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _fmt_time(s) -> str:
    if s is None:
        return "–"
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


def _delta_note(row: dict) -> str:
    if row["delta_vs_baseline"] is None:
        return "baseline" if row["val_loss_mean"] is not None else ""
    text = f"{row['delta_vs_baseline']:+.4f}"
    if row["within_noise"] is None:
        return text + " (noise unknown)"
    return text + (" (within seed noise)" if row["within_noise"] else f" (beyond noise, 2·SE={2 * row['delta_se']:.4f})")


def _variant_notes(doc: dict) -> list[str]:
    """The sweep file's variant descriptions, and for each variant outside the parameter match how far it is off."""
    base = next((r for r in doc["variants"] if r["name"] == doc["baseline"]), None)
    notes = []
    for r in doc["variants"]:
        text = r.get("description") or ""
        if (r["matched_on"] == "-" and r is not base and base and base.get("params_total")
                and r.get("params_total") is not None):
            diff = r["params_total"] / base["params_total"] - 1
            text += (("; " if text else "") + f"**not parameter-matched** (`match: false`): {r['params_total']:,} "
                     f"total / {r['params_active']:,} active params vs the baseline's {base['params_total']:,} / "
                     f"{base['params_active']:,} ({diff:+.1%} total)")
        if text:
            notes.append(f"- `{r['name']}`: {text}")
    return (["## Variants", ""] + notes + [""]) if notes else []


def render_markdown(doc: dict) -> str:
    rows = doc["variants"]
    n_seeds = sorted({len(r["seeds"]) for r in rows if r["seeds"]})
    lines = [f"# Sweep `{doc['sweep']}`", ""]
    if doc.get("description"):
        lines += [doc["description"], ""]
    lines += [
        f"- Date: {doc['created']}; machine: {doc['machine']['cpu']}, {doc['machine']['threads']} torch threads"
        f"{', ' + doc['machine']['gpu'] if doc['machine'].get('gpu') else ''}, {doc['machine']['platform']}; "
        f"torch {doc['machine']['torch']}, Python {doc['machine']['python']}",
        f"- Command: `{doc['command']}`" if doc["command"] else "- Command: (not recorded)",
        f"- Sweep file: `{doc['sweep_file']}`; base config: `{doc['base_config']}`",
        f"- Baseline: `{doc['baseline']}`; parameter match on **{doc['match_on']}** params (MoE variants on "
        f"**active** params), tolerance {doc['param_tolerance']:.0%}; seeds per variant: "
        f"{', '.join(map(str, n_seeds)) or '–'}",
        f"- Loss is the mean next-token cross-entropy (nats) on the fixed validation blocks; bpb = bits per UTF-8 byte.",
        f"- {NOISE_RULE}",
    ]
    if doc["missing_runs"]:
        lines.append(f"- **Incomplete**: no final metrics for {', '.join(doc['missing_runs'])}")
    lines += ["", "| rank | variant | FFN | matched on | FFN params | total params | active params | FLOPs/token | "
              "tokens | tokens/s | wall time | val loss | val bpb | Δ loss vs baseline |",
              "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        matched = r["matched_on"] if r["matched_on"] != "-" else "not matched"
        if r["param_rel_diff"] is not None and r["name"] != doc["baseline"]:
            matched += f" ({r['param_rel_diff']:+.1%})"
        lines.append(
            f"| {r['rank'] or '–'} | {r['name']} | {r['ffn']} | {matched} | {_fmt_int(r['params_ffn'])} | "
            f"{_fmt_int(r['params_total'])} | {_fmt_int(r['params_active'])} | {_fmt_int(r['flops_per_token'])} | "
            f"{_fmt_int(r['tokens'])} | {_fmt_int(r['tokens_per_s'])} | {_fmt_time(r['wall_time_s'])} | "
            f"{_fmt_pm(r['val_loss_mean'], r['val_loss_std'])} | {_fmt_pm(r['val_bpb_mean'], r['val_bpb_std'])} | "
            f"{_delta_note(r)} |")
    lines += ["", "FFN params are summed over layers (MoE: all experts + routers); FLOPs/token ≈ 6·N_active + "
              "attention, for training (forward + backward). tokens/s = training throughput of the optimizer steps; "
              "wall time = the run's training wall-clock including periodic evaluation (both means over seeds).", ""]
    lines += _variant_notes(doc)
    plots = doc.get("plots", [])
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    with_samples = [r for r in rows if r["samples"]]
    if with_samples:
        lines += ["## Samples", "", "Generated by the trainer at the end of each variant's first seed (same prompts, "
                  "sampling seed and settings for every variant).", ""]
        for r in with_samples:
            lines.append(f"### {r['name']}")
            lines.append("")
            for s in r["samples"]:
                text = s.get("text", "").replace("```", "'''")
                lines += [f"Prompt `{s.get('prompt', '')}`:", "", "```", text.strip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(doc: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    _atomic_write(json_path, json.dumps(doc, indent=2) + "\n")
    _atomic_write(md_path, render_markdown(doc))
    return md_path, json_path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
