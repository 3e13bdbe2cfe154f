"""report.md from the report document (train/report.py builds the document; this file only formats it)."""
from __future__ import annotations

import math
from pathlib import Path


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


def _fmt_x(x) -> str:
    if x is None:
        return "–"
    return "∞" if math.isinf(x) else f"{x:.2f}×"


def _fmt_ci(ci, fmt=lambda v: f"{v:+.4f}") -> str:
    return "" if not ci else f" [{fmt(ci[0])}, {fmt(ci[1])}]"


def _fmt_p(p) -> str:
    if p is None:
        return "–"
    return f"{p:.2g}" if p >= 0.001 else "<0.001"


def delta_note(row: dict, baseline: str) -> str:
    """Δ with its 95% CI, the Holm-adjusted p and the verdict (with the MDE and seeds needed when not resolved)."""
    if row["name"] == baseline:
        return "baseline" if row["val_loss_mean"] is not None else ""
    if row["delta_vs_baseline"] is None:
        return ""
    text = f"{row['delta_vs_baseline']:+.4f}{_fmt_ci(row['ci95'])}"
    verdict = row["verdict"]
    if verdict in ("better", "worse"):
        return f"{text}; p_Holm {_fmt_p(row['p_holm'])}: **{verdict}**"
    if verdict == "not resolved":
        need = f", needs ~{row['seeds_needed']} seeds" if row.get("seeds_needed") else ""
        mde = f"MDE {row['mde']:.3f}" if row.get("mde") is not None else "MDE –"
        return f"{text}; p_Holm {_fmt_p(row['p_holm'])}: not resolved ({mde}{need})"
    return f"{text}: {verdict}"


def _table(rows: list[dict], baseline: str) -> list[str]:
    lines = ["| rank | variant | FFN | matched on | FFN params | total params | active params | FLOPs/token | "
             "tokens | tokens/s | wall time | val loss | val bpb | Δ loss vs baseline [95% CI]; verdict |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        matched = r["matched_on"] if r["matched_on"] != "-" else "not matched"
        if r["param_rel_diff"] is not None and r["name"] != baseline:
            matched += f" ({r['param_rel_diff']:+.1%})"
        lines.append(
            f"| {r['rank'] or '–'} | {r['name']} | {r['ffn']} | {matched} | {_fmt_int(r['params_ffn'])} | "
            f"{_fmt_int(r['params_total'])} | {_fmt_int(r['params_active'])} | {_fmt_int(r['flops_per_token'])} | "
            f"{_fmt_int(r['tokens'])} | {_fmt_int(r['tokens_per_s'])} | {_fmt_time(r['wall_time_s'])} | "
            f"{_fmt_pm(r['val_loss_mean'], r['val_loss_std'])} | {_fmt_pm(r['val_bpb_mean'], r['val_bpb_std'])} | "
            f"{delta_note(r, baseline)} |")
    return lines


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


def _levels(doc: dict) -> list[str]:
    """The rankings of every factor level side by side, and whether they agree."""
    if not doc.get("levels"):
        return []
    levels = doc["levels"]
    lines = ["## Rankings by factor level", "",
             f"Each level is its own sub-sweep (variants ranked, tuned and judged within it), size `{levels[0]['size']}`"
             if levels[0].get("size") else "Each level is its own sub-sweep (variants ranked, tuned and judged "
             "within it).", "", "| rank | " + " | ".join(f"`{lv['level']}`" for lv in levels) + " |",
             "|---:|" + "---|" * len(levels)]
    ranked = [[r for r in lv["variants"] if r["rank"]] for lv in levels]
    for i in range(max(len(r) for r in ranked)):
        cells = []
        for rows in ranked:
            r = rows[i] if i < len(rows) else None
            cells.append(f"{r['name']} {r['val_loss_mean']:.4f} ({r['verdict'] or 'baseline'})" if r else "")
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines.append("")
    for a in doc.get("agreement") or []:
        tau = "–" if a["kendall_tau"] is None else f"{a['kendall_tau']:+.2f} (p {_fmt_p(a['p_value'])}, n {a['n']})"
        flips = ", ".join(f"{x} ↔ {y}" for x, y in a["order_flips"]) or "none"
        changes = "; ".join(f"{c['variant']}: {c[a['levels'][0]]} → {c[a['levels'][1]]}"
                            for c in a["verdict_changes"]) or "none"
        lines.append(f"- `{a['levels'][0]}` vs `{a['levels'][1]}`: Kendall τ {tau}; order flips: {flips}; verdicts "
                     f"that change: {changes}")
    return lines + [""]


_HEALTH = (("moe_max_vio", "MaxVio", "{:.3f}"), ("moe_drop_frac", "dropped", "{:.2%}"),
           ("moe_router_entropy", "router entropy (nats)", "{:.3f}"), ("moe_bias_abs", "mean |bias|", "{:.4f}"),
           ("moe_active_ffn_params", "active FFN params / token", "{:,.0f}"))


def _health(doc: dict) -> list[str]:
    """MoE routing health beside the loss: each metric at the last logging window and averaged over training."""
    cells = doc.get("sizes") or doc.get("levels") or [{"variants": doc["variants"]}]
    rows = [(cell, r) for cell in cells for r in cell["variants"] if r.get("health")]
    if not rows:
        return []
    lines = ["## MoE routing health", "",
             "Means over seeds and MoE layers; *end* = the last logging window, *avg* = averaged over all windows "
             "of training. MaxVio = max expert load / mean load − 1 per optimizer step (0 = balanced).", "",
             "| variant | val loss | " + " | ".join(f"{title} end / avg" for _, title, _ in _HEALTH) + " |",
             "|---|---:|" + "---:|" * len(_HEALTH)]
    for cell, r in rows:
        where = " ".join(f"{cell[k]}" for k in ("size", "level") if cell.get(k))
        name = f"{r['name']} ({where})" if where and len(cells) > 1 else r["name"]
        values = []
        for key, _, fmt in _HEALTH:
            h = r["health"].get(key)
            values.append(f"{fmt.format(h['final'])} / {fmt.format(h['mean'])}" if h else "–")
        lines.append(f"| {name} | {_fmt_pm(r['val_loss_mean'], r['val_loss_std'])} | " + " | ".join(values) + " |")
    return lines + [""]


def _tuning(doc: dict) -> list[str]:
    if not doc.get("tuning"):
        return []
    lines = ["## Tuning", "", "Each variant (at each size) trained once per grid point at the tuning seed; the point "
             "with the lowest loss on the *tuning* validation blocks was chosen, and every reported number above "
             "comes from the separate *reporting* blocks. An edge choice means the optimum may lie outside the grid.",
             "", "| variant | size | level | tuning loss per grid point | chosen | note |", "|---|---|---|---|---|---|"]
    for t in doc["tuning"]:
        cells = ", ".join(f"{'/'.join(f'{v:g}' if isinstance(v, float) else str(v) for v in p['values'].values())}:"
                          f" {p['tune_loss']:.4f}" if p["tune_loss"] is not None else
                          f"{'/'.join(str(v) for v in p['values'].values())}: –" for p in t["points"])
        chosen = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in (t["chosen"] or {}).items()) or "pending"
        note = f"**on the grid's edge ({', '.join(t['on_edge'])}): widen the grid**" if t["on_edge"] else ""
        lines.append(f"| {t['variant']} | {t['size'] or '–'} | {t.get('level') or '–'} | {cells} | {chosen} | {note} |")
    return lines + [""]


def _scaling(doc: dict) -> list[str]:
    if not doc.get("scaling"):
        return []
    lines = ["## Scaling: compute multipliers", "",
             "L(C) = E + A·C^(−α) fitted per variant to the mean final loss at each size (C = training FLOPs). "
             "Compute multiplier = how much more compute the baseline's fitted curve needs to reach the variant's "
             "fitted loss at the variant's largest budget (> 1: the variant is better); per second: the same with "
             "training wall-clock seconds instead of FLOPs. 95% CIs: bootstrap over seeds (resampled per size).", "",
             "| variant | level | E | A | α | compute multiplier [95% CI] | per-second multiplier [95% CI] | note |",
             "|---|---|---:|---:|---:|---|---|---|"]
    for s in doc["scaling"]:
        fit = (f"{s['E']:.3f} | {s['A']:.3g} | {s['alpha']:.3f}" if s["E"] is not None else "– | – | –")
        lines.append(f"| {s['variant']} | {s.get('level') or '–'} | {fit} | {_fmt_x(s['compute_multiplier'])}{_fmt_ci(s['ci95'], _fmt_x)} | "
                     f"{_fmt_x(s['time_multiplier'])}{_fmt_ci(s['time_ci95'], _fmt_x)} | {s['note'] or ''} |")
    lines += ["", "| variant | size | non-emb. params | tokens | training FLOPs | train seconds | loss (mean ± std, n) |",
              "|---|---|---:|---:|---:|---:|---|"]
    for s in doc["scaling"]:
        for p in s["points"]:
            lines.append(f"| {s['variant']} | {p['size']} | {_fmt_int(p['params_non_embedding'])} | "
                         f"{_fmt_int(p['tokens'])} | {p['flops']:.3g} | {_fmt_time(p['seconds'])} | "
                         f"{_fmt_pm(p['loss_mean'], p['loss_std'])} ({p['n']}) |")
    return lines + [""]


def render_markdown(doc: dict) -> str:
    rows = doc["variants"]
    n_seeds = sorted({len(r["seeds"]) for r in rows if r["seeds"]})
    m = doc["machine"]
    lines = [f"# Sweep `{doc['sweep']}`", ""]
    if doc.get("description"):
        lines += [doc["description"], ""]
    lines += [
        f"- Date: {doc['created']}; machine: {m['cpu']}, {m['threads']} torch threads"
        f"{', ' + m['gpu'] if m.get('gpu') else ''}, {m['platform']}; torch {m['torch']}, Python {m['python']}",
        f"- Command: `{doc['command']}`" if doc["command"] else "- Command: (not recorded)",
        f"- Sweep file: `{doc['sweep_file']}`; base config: `{doc['base_config']}`",
        f"- Baseline: `{doc['baseline']}`; parameter match on **{doc['match_on']}** params (sparse blocks on "
        f"**active** params), tolerance {doc['param_tolerance']:.0%}; seeds per variant: "
        f"{', '.join(map(str, n_seeds)) or '–'}",
        "- Loss is the mean next-token cross-entropy (nats) on the fixed *reporting* validation blocks; bpb = bits "
        "per UTF-8 byte.",
        f"- {doc['stats_rule']}",
    ]
    if doc.get("parent"):
        p = doc["parent"]
        loss = f"{p['val_loss_mean']:.4f}" if p["val_loss_mean"] is not None else "–"
        lines.append(f"- Parent runs (trained first; variants with `parent` continue or upcycle their seed's; not in "
                     f"the tables): {', '.join(f'`{r}`' for r in p['runs'])}; final validation loss mean {loss} "
                     f"({p['finished']}/{len(p['runs'])} finished)")
    if doc["missing_runs"] or doc.get("pending_runs"):
        pending = f"; {doc['pending_runs']} run(s) wait for tuning" if doc.get("pending_runs") else ""
        lines.append(f"- **Incomplete**: no final metrics for {', '.join(doc['missing_runs']) or '–'}{pending}")
    cells = doc.get("sizes") or doc.get("levels") or [{"size": doc.get("size"), "variants": rows}]
    for cell in cells:
        title = ", ".join(f"{k} `{cell[k]}`" for k in ("size", "level") if cell.get(k))
        if title:
            lines += ["", f"### {title[0].upper()}{title[1:]}"]
        lines += [""] + _table(cell["variants"], doc["baseline"])
    lines += ["", "FFN params are summed over layers (MoE: all experts + routers); FLOPs/token ≈ 6·N_active + "
              "attention, for training (forward + backward). tokens/s = training throughput of the optimizer steps; "
              "wall time = the run's training wall-clock including periodic evaluation (both means over seeds).", ""]
    lines += _levels(doc) + _health(doc) + _scaling(doc) + _tuning(doc) + _variant_notes(doc)
    plots = doc.get("plots", [])
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    with_samples = [r for r in rows if r["samples"]]
    if with_samples:
        lines += ["## Samples", "", "Generated by the trainer at the end of each variant's first seed (same prompts, "
                  "sampling seed and settings for every variant).", ""]
        for r in with_samples:
            lines += [f"### {r['name']}", ""]
            for s in r["samples"]:
                text = s.get("text", "").replace("```", "'''")
                lines += [f"Prompt `{s.get('prompt', '')}`:", "", "```", text.strip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"
