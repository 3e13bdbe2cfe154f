"""Sweep report: read every run directory of a sweep, aggregate over seeds, judge each variant against the baseline,
fit the scaling ladder, write report.json, report.md and the plots.

Numbers in the tables and verdicts come from the *reporting* validation blocks (`val_loss`) of the runs at each
variant's chosen tuning point; the tuning section lists the *tuning* losses (`tune_loss`) that chose it.
Statistics (train/stats.py, stated in the report itself):
- mean ± sample std (ddof=1) over seeds; rank by mean final validation loss (1 = best);
- vs baseline: paired differences over common seeds (same seed = same data order) -> mean Δ, Student-t 95% CI,
  two-sided p, Holm-adjusted across the sweep's variants, the minimum detectable effect (α 0.05, power 0.8);
  `better` / `worse` when the Holm-adjusted p < 0.05, else `not resolved`; fewer than 3 seeds: `needs ≥ 3 seeds`;
- ladder: L(C) = E + A·C^(−α) per variant over training FLOPs, the compute multiplier vs the baseline at the largest
  budget with a bootstrap 95% CI over seeds, and the same over training wall-clock seconds.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Optional

from train import stats
from train.runs import RunResult, read_run

STATS_RULE = ("Δ = mean over common seeds of (variant − baseline) final validation loss (same seed = same data "
              "order); 95% CI from Student's t (df = n−1); p two-sided paired t, Holm-adjusted across the sweep's "
              "variants; verdict `better`/`worse` when the adjusted p < 0.05, else `not resolved` (MDE = smallest |Δ| "
              "detectable with 80% power at this n and paired std); fewer than 3 common seeds: `needs ≥ 3 seeds`.")

__all__ = ["RunResult", "build_report", "summarize", "write_report", "STATS_RULE"]


def build_report(plan, command: str = "") -> dict:
    """Read the plan's run directories, write report.json, report.md and the PNGs into the sweep directory, log a
    wandb summary table; returns the report document."""
    from train.plan import check_param_match, count_params, run_finished
    from train.config_load import read_yaml, validate_config
    from train.plots import make_plots
    from train.report_render import render_markdown
    results = []
    for run in plan.all_runs:
        if run.reported:
            result = read_run(run.variant, run.seed, run.cfg.out_dir)
            result.finished = result.finished and run_finished(run)
            result.size, result.level = run.size, run.level_name
            results.append(result)
    # Exact counts from a finished run's resolved config (the plan's may use an estimated vocabulary size).
    for size, infos in plan.ladder.items():
        for name, info in infos.items():
            done = next((r for r in results if r.variant == name and r.size == size and r.finished), None)
            if done is not None and (done.dir / "config.yaml").is_file():
                cfg = validate_config(read_yaml(done.dir / "config.yaml"), source=str(done.dir / "config.yaml"))
                info.counts, info.flops_per_token, info.vocab_estimated = count_params(cfg)
        check_param_match(plan, infos, size, refuse=False)
    doc = summarize(plan, results, command)
    largest, first = plan.sweep.size_names[-1], _level_names(plan.sweep)[0]
    shown = [r for r in results if r.size == largest and r.level == first]
    doc["plots"] = [p.name for p in make_plots(doc, shown, plan.out_dir)]
    write_report(doc, plan.out_dir, render_markdown(doc))
    log_wandb_summary(plan, doc)
    expected = len([r for r in plan.all_runs if r.reported]) + plan.pending
    print(f"report: {plan.out_dir / 'report.md'} ({len(results) - len(doc['missing_runs'])}/{expected} runs "
          "finished)", flush=True)
    return doc


REPORT_COLUMNS = ["name", "ffn", "rank", "matched_on", "params_ffn", "params_total", "params_active",
                  "flops_per_token", "tokens", "tokens_per_s", "wall_time_s", "val_loss_mean", "val_loss_std",
                  "val_bpb_mean", "val_bpb_std", "delta_vs_baseline", "p_holm", "verdict"]


def log_wandb_summary(plan, doc: dict) -> None:
    """A short wandb run in the sweep's group holding the report table and plots; a failure is one warning."""
    cfg = plan.all_runs[0].cfg
    if cfg.wandb.mode == "disabled":
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb
        run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, group=plan.sweep.name,
                         name=f"{plan.sweep.name}-summary", job_type="summary", tags=[plan.sweep.name, "summary"],
                         mode=cfg.wandb.mode, dir=os.environ.get("WANDB_DIR") or str(plan.out_dir),
                         config={"report": str(plan.out_dir)}, settings=wandb.Settings(console="off"))
        rows = [[str(row.get(c)) if c == "verdict" else row.get(c) for c in REPORT_COLUMNS]
                for row in doc["variants"]]
        run.log({"report": wandb.Table(columns=REPORT_COLUMNS, data=rows),
                 **{f"plots/{Path(p).stem}": wandb.Image(str(plan.out_dir / p)) for p in doc.get("plots", [])}})
        run.finish()
    except Exception as e:  # the report on disk is complete; wandb is a convenience
        print(f"warning: wandb summary not logged ({' '.join(str(e).split())[:200] or type(e).__name__})",
              file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Aggregation

def mean_std(values: list) -> tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) >= 2 else None)


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean = statistics.fmean(values)
    return int(mean) if all(isinstance(v, int) for v in values) and mean.is_integer() else mean


def _rows(plan, infos: dict, results: list[RunResult]) -> list[dict]:
    """One row per variant of one size: counts, throughput and seed statistics of its reported runs."""
    from model.registry import ffn_class
    sweep = plan.sweep
    rows = []
    for name, info in infos.items():
        runs = sorted((r for r in results if r.variant == name and r.finished), key=lambda r: r.seed)
        loss = {r.seed: r.final["val_loss"] for r in runs}
        bpb = {r.seed: r.final.get("val_bpb") for r in runs}
        (loss_mean, loss_std), (bpb_mean, bpb_std) = mean_std(list(loss.values())), mean_std(list(bpb.values()))
        ffn = info.cfg.model.ffn
        tokens = _mean([r.final.get("tokens") for r in runs])
        tps = _mean([r.final.get("tokens_per_s") for r in runs])
        rows.append({
            "name": name, "size": info.size, "ffn": ffn_class(ffn.type).label(ffn),
            "description": sweep.variants[name].description, "family": sweep.variants[name].family,
            "seeds": [r.seed for r in runs], "runs": [str(r.dir) for r in runs],
            "tuned": next((r.dir.name for r in runs), None) if sweep.tune else None,
            "matched_on": info.matched_on, "param_rel_diff": info.rel_diff,
            "params_total": info.counts.get("total"), "params_active": info.counts.get("active"),
            "params_ffn": info.counts.get("ffn"), "params_ffn_active": info.counts.get("ffn_active"),
            "params_non_embedding": info.counts.get("non_embedding"), "flops_per_token": info.flops_per_token,
            "tokens": tokens, "tokens_per_s": tps, "wall_time_s": _mean([r.final.get("wall_time_s") for r in runs]),
            "train_flops": (tokens or 0) * info.flops_per_token or None,
            "train_seconds": tokens / tps if tokens and tps else None,
            "val_loss_mean": loss_mean, "val_loss_std": loss_std, "val_bpb_mean": bpb_mean, "val_bpb_std": bpb_std,
            "val_loss_per_seed": {str(s): v for s, v in loss.items()},
            "val_bpb_per_seed": {str(s): v for s, v in bpb.items()},
            "samples": runs[0].samples[:sweep.sample_count] if runs else [],
            "health": _health(runs),
        })
    for i, row in enumerate(sorted((r for r in rows if r["val_loss_mean"] is not None),
                                   key=lambda r: r["val_loss_mean"]), 1):
        row["rank"] = i
    base = next(r for r in rows if r["name"] == sweep.baseline)
    per_seed = {r["name"]: {int(s): v for s, v in r["val_loss_per_seed"].items()} for r in rows}
    judged = stats.verdicts(per_seed, sweep.baseline)
    for row in rows:
        row.setdefault("rank", None)
        v = judged.get(row["name"])
        row["delta_vs_baseline"] = v["delta"] if v else None
        b = {int(s): x for s, x in base["val_bpb_per_seed"].items() if x is not None}
        a = {int(s): x for s, x in row["val_bpb_per_seed"].items() if x is not None}
        common = sorted(set(a) & set(b))
        row["delta_bpb_vs_baseline"] = (statistics.fmean(a[s] - b[s] for s in common)
                                        if v and common else None)
        for key in ("ci95", "p_value", "p_holm", "mde", "seeds_needed", "verdict"):
            row[key] = v[key] if v else None
    return sorted(rows, key=lambda r: (r["rank"] is None, r["rank"] or 0))


def _health(runs: list[RunResult]) -> dict[str, dict[str, float]]:
    """MoE routing health over the seeds: moe_<name> -> {"final", "mean"} means (empty for dense blocks)."""
    keys = sorted({k for r in runs for k in r.health})
    return {k: {when: statistics.fmean(r.health[k][when] for r in runs if k in r.health) for when in ("final", "mean")}
            for k in keys}


def _level_names(sweep) -> list[Optional[str]]:
    from train.plan import tag
    return [tag(level) or None for level in sweep.levels]


def _verdicts(rows: list[dict], baseline: str) -> list[dict]:
    return [{"variant": r["name"], "delta": r["delta_vs_baseline"],
             **{k: r[k] for k in ("ci95", "p_value", "p_holm", "mde", "seeds_needed", "verdict")}}
            for r in rows if r["name"] != baseline]


def summarize(plan, results: list[RunResult], command: str = "") -> dict:
    """The report.json document: one row per variant for every (size, factor level) cell; the headline `variants`
    and `verdicts` are the largest size at the first level; tuning, scaling and factor-agreement sections when the
    sweep has them."""
    sweep = plan.sweep
    levels = _level_names(sweep)
    cells = {(size, level): _rows(plan, infos, [r for r in results if getattr(r, "size", None) == size
                                                and getattr(r, "level", None) == level])
             for size, infos in plan.ladder.items() for level in levels}
    largest = sweep.size_names[-1]
    top = cells[(largest, levels[0])]
    expected = {r.name for r in plan.all_runs if r.reported}
    done = {r.dir.name for r in results if r.finished}
    doc = {
        "sweep": sweep.name, "description": sweep.description, "sweep_file": str(plan.sweep_path),
        "base_config": str(plan.base_path), "baseline": sweep.baseline, "match_on": sweep.match_on,
        "param_tolerance": sweep.param_tolerance, "stats_rule": STATS_RULE,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "command": command,
        "machine": machine_info(), "missing_runs": sorted(expected - done), "pending_runs": plan.pending,
        "size": largest, "level": levels[0], "variants": top, "verdicts": _verdicts(top, sweep.baseline),
    }
    if sweep.sizes:
        doc["sizes"] = [{"size": s, "level": lv, "variants": rows} for (s, lv), rows in cells.items()]
        doc["scaling"] = [entry for lv in levels for entry in
                          scaling({s: cells[(s, lv)] for s in sweep.size_names}, sweep.baseline, lv)]
    if sweep.factors:
        doc["levels"] = [{"level": lv, "values": values, "size": largest, "variants": cells[(largest, lv)],
                          "verdicts": _verdicts(cells[(largest, lv)], sweep.baseline)}
                         for lv, values in zip(levels, sweep.levels)]
        doc["agreement"] = agreement(doc["levels"])
    if getattr(plan, "parents", None):
        doc["parent"] = parent_summary(plan.parents)
    if sweep.tune:
        doc["tuning"] = [{"variant": sel.variant, "size": sel.size, "level": sel.level,
                          "points": [{"values": p, "tune_loss": loss} for p, loss in zip(sel.points, sel.tune_losses)],
                          "chosen": sel.points[sel.chosen] if sel.chosen is not None else None,
                          "on_edge": sel.on_edge} for sel in plan.selections.values()]
    return doc


def parent_summary(parents: list) -> dict:
    """The sweep's parent runs (trained first, not in the tables): their directories and mean final val loss."""
    from train.runs import read_final
    finals = [read_final(p.cfg.out_dir) or {} for p in parents]
    losses = [f["val_loss"] for f in finals if f.get("val_loss") is not None]
    return {"runs": [str(p.cfg.out_dir) for p in parents], "finished": len(losses),
            "val_loss_mean": statistics.fmean(losses) if losses else None}


def agreement(levels: list[dict]) -> list[dict]:
    """For every pair of factor levels: Kendall's τ between the variants' rankings (mean loss), the pairs whose
    order flips, and the variants whose verdict vs the baseline changes."""
    out = []
    for i, a in enumerate(levels):
        for b in levels[i + 1:]:
            mean_a = {r["name"]: r["val_loss_mean"] for r in a["variants"]}
            mean_b = {r["name"]: r["val_loss_mean"] for r in b["variants"]}
            verdict_a = {v["variant"]: v["verdict"] for v in a["verdicts"]}
            verdict_b = {v["variant"]: v["verdict"] for v in b["verdicts"]}
            changed = [{"variant": n, a["level"]: verdict_a[n], b["level"]: verdict_b.get(n)}
                       for n in verdict_a if verdict_a[n] != verdict_b.get(n)]
            out.append({"levels": [a["level"], b["level"]], **stats.rank_agreement(mean_a, mean_b),
                        "verdict_changes": changed})
    return out


def scaling(by_size: dict, baseline: str, level: Optional[str] = None) -> list[dict]:
    """Per variant: the fitted L(C) over the ladder (C = training FLOPs), the compute multiplier vs the baseline at
    the variant's largest budget with a bootstrap 95% CI over seeds, and the same over training seconds."""
    points: dict[str, list[dict]] = {}
    for size, rows in by_size.items():
        for r in rows:
            if r["val_loss_mean"] is None or not r["train_flops"]:
                continue
            points.setdefault(r["name"], []).append({
                "size": size, "flops": r["train_flops"], "tokens": r["tokens"], "seconds": r["train_seconds"],
                "params_non_embedding": r["params_non_embedding"], "loss_mean": r["val_loss_mean"],
                "loss_std": r["val_loss_std"], "n": len(r["seeds"]),
                "losses": [r["val_loss_per_seed"][str(s)] for s in r["seeds"]]})
    fits = {name: _fit(pts) for name, pts in points.items()}
    out = []
    for name, pts in points.items():
        entry = {"variant": name, "level": level, "E": None, "A": None, "alpha": None, "compute_multiplier": None,
                 "ci95": None,
                 "time_multiplier": None, "time_ci95": None, "note": None,
                 "points": [{k: v for k, v in p.items() if k != "losses"} for p in pts]}
        fit, base_fit = fits.get(name), fits.get(baseline)
        if fit is None or fit[0] is None:
            entry["note"] = "fewer than 3 sizes with results: no fit"
            out.append(entry)
            continue
        f_flops, f_time = fit
        entry.update(E=f_flops.E, A=f_flops.A, alpha=f_flops.alpha)
        if base_fit is not None and base_fit[0] is not None:
            c_max = max(p["flops"] for p in pts)
            entry["compute_multiplier"] = _finite(stats.compute_multiplier(base_fit[0], f_flops, c_max))
            entry["ci95"] = _interval(stats.bootstrap_multiplier(
                _boot(points[baseline], "flops"), _boot(pts, "flops"), c_max))
            if f_time is not None and base_fit[1] is not None:
                t_max = max(p["seconds"] for p in pts)
                entry["time_multiplier"] = _finite(stats.compute_multiplier(base_fit[1], f_time, t_max))
                entry["time_ci95"] = _interval(stats.bootstrap_multiplier(
                    _boot(points[baseline], "seconds"), _boot(pts, "seconds"), t_max))
        out.append(entry)
    return out


def _fit(pts: list[dict]):
    if len(pts) < 3:
        return None
    flops = stats.fit_power_law([p["flops"] for p in pts], [p["loss_mean"] for p in pts])
    secs = [p["seconds"] for p in pts]
    timed = stats.fit_power_law(secs, [p["loss_mean"] for p in pts]) if all(secs) else None
    return flops, timed


def _boot(pts: list[dict], key: str) -> dict[float, list[float]]:
    return {p[key]: p["losses"] for p in pts}


def _finite(x: Optional[float]) -> Optional[float]:
    return x if x is None or math.isfinite(x) else float("inf")


def _interval(ci) -> Optional[list]:
    return None if ci is None else [float(ci[0]), float(ci[1])]


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


def write_report(doc: dict, out_dir: Path, markdown: str) -> tuple[Path, Path]:
    from train.fsutil import write_atomic
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    write_atomic(json_path, json.dumps(doc, indent=2) + "\n")  # an unbounded multiplier is written as Infinity
    write_atomic(md_path, markdown)
    return md_path, json_path
