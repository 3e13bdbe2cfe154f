"""Sweep plots (matplotlib, Agg backend: no display needed).

One line per variant = the mean over seeds; the shaded band spans min..max over seeds (interpolated onto common x
points where the seeds' x values differ, e.g. wall-clock). For MoE variants a heat map of the fraction of routed token
slots per expert, per layer, over training (first seed). When variants carry a `family`, final loss vs FFN parameters
and vs training FLOPs with one line per family (width/expansion sweeps).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _seed_curves(runs, key_x: str, key_y: str, source: str, x_scale: float = 1.0) -> list[tuple[np.ndarray, np.ndarray]]:
    curves = []
    for r in runs:
        points = [(p[key_x] * x_scale, p[key_y]) for p in getattr(r, source)
                  if p.get(key_x) is not None and p.get(key_y) is not None]
        if points:
            xs, ys = zip(*sorted(points))
            curves.append((np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)))
    return curves


def _band(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, lo, hi) over seeds. Same x everywhere -> exact; else interpolated on the overlapping range."""
    if all(len(c[0]) == len(curves[0][0]) and np.allclose(c[0], curves[0][0]) for c in curves):
        x = curves[0][0]
        ys = np.stack([c[1] for c in curves])
    else:
        lo_x = max(c[0][0] for c in curves)
        hi_x = min(c[0][-1] for c in curves)
        if hi_x <= lo_x:  # no overlap: show the first seed only
            return curves[0][0], curves[0][1], curves[0][1], curves[0][1]
        x = np.linspace(lo_x, hi_x, max(len(c[0]) for c in curves))
        ys = np.stack([np.interp(x, cx, cy) for cx, cy in curves])
    return x, ys.mean(0), ys.min(0), ys.max(0)


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    """Centered moving average over k points (k odd), the window shrinking at the ends; no lag, unlike an EMA."""
    half = k // 2
    c = np.concatenate([[0.0], np.cumsum(y)])
    idx = np.arange(len(y))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(y))
    return (c[hi] - c[lo]) / (hi - lo)


def _line_plot(groups: dict, path: Path, xlabel: str, ylabel: str, title: str, baseline: str | None) -> Path | None:
    if not any(groups.values()):
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    lows, highs = [], []
    for i, (name, curves) in enumerate(groups.items()):
        if not curves:
            continue
        x, mean, lo, hi = _band(curves)
        color = f"C{i % 10}"
        width = 2.4 if name == baseline else 1.5
        label = f"{name} (baseline)" if name == baseline else name
        ax.plot(x, mean, color=color, lw=width, label=label + (f" ({len(curves)} seeds)" if len(curves) > 1 else ""))
        if len(curves) > 1:
            ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)
        lows.append(float(np.nanmin(lo)))
        highs.append(float(np.nanmax(hi[max(1, len(hi) // 6):] if len(hi) > 2 else hi)))
    # Zoom on the part of the curves where the variants differ: skip the first ~1/6 of the points (huge early losses).
    if lows:
        y_lo, y_hi = min(lows), max(highs)
        pad = 0.05 * max(y_hi - y_lo, 1e-3)
        ax.set_ylim(y_lo - pad, y_hi + pad)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def expert_load_heatmap(run, path: Path) -> Path | None:
    """Per MoE layer: expert (rows) × training step (columns), color = fraction of routed slots."""
    records = [p for p in run.expert_load if p.get("load")]
    if not records:
        return None
    steps = [p["step"] for p in records]
    loads = np.asarray([p["load"] for p in records], dtype=float)  # (snapshots, layers, experts)
    n_layers, n_experts = loads.shape[1], loads.shape[2]
    fig, axes = plt.subplots(n_layers, 1, figsize=(7.5, 1.1 + 1.0 * n_layers * max(1, n_experts / 8)),
                             squeeze=False, sharex=True)
    vmax = max(2.0 / n_experts, float(loads.max()))
    for layer in range(n_layers):
        ax = axes[layer][0]
        im = ax.imshow(loads[:, layer, :].T, aspect="auto", cmap="viridis", vmin=0, vmax=vmax,
                       extent=(-0.5, len(steps) - 0.5, n_experts - 0.5, -0.5), interpolation="nearest")
        ax.set_ylabel(f"layer {layer}\nexpert", fontsize=8)
        ax.tick_params(labelsize=7)
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)
    axes[-1][0].set_xticks(ticks, [str(steps[t]) for t in ticks])
    axes[-1][0].set_xlabel("optimizer step")
    fig.colorbar(im, ax=[a[0] for a in axes], label=f"load (uniform = {1 / n_experts:.3f})", shrink=0.8)
    fig.suptitle(f"Expert load per layer — {run.variant} seed {run.seed}", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _family_plot(rows: list[dict], key_x: str, path: Path, xlabel: str) -> Path | None:
    families: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("family") and r.get("val_loss_mean") is not None and r.get(key_x):
            families.setdefault(r["family"], []).append(r)
    if not any(len(v) >= 2 for v in families.values()):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (fam, members) in enumerate(sorted(families.items())):
        members.sort(key=lambda r: r[key_x])
        x = [r[key_x] for r in members]
        y = [r["val_loss_mean"] for r in members]
        err = [r["val_loss_std"] or 0 for r in members]
        ax.errorbar(x, y, yerr=err, marker="o", color=f"C{i}", capsize=3, label=fam)
        for r in members:
            ax.annotate(r["name"], (r[key_x], r["val_loss_mean"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    return _save_log_plot(fig, ax, path, xlabel, "final validation loss")


def _save_log_plot(fig, ax, path: Path, xlabel: str, ylabel: str, title: str | None = None) -> Path:
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling_plot(doc: dict, path: Path) -> Path | None:
    """Final reporting loss vs training FLOPs, log-log: seed means with std error bars and each variant's fit."""
    entries = [s for s in doc.get("scaling") or [] if s["points"]]
    if not entries:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for i, s in enumerate(entries):
        pts = sorted(s["points"], key=lambda p: p["flops"])
        x = np.array([p["flops"] for p in pts])
        ax.errorbar(x, [p["loss_mean"] for p in pts], yerr=[p["loss_std"] or 0 for p in pts], fmt="o",
                    color=f"C{i}", capsize=3, label=s["variant"] + (" (baseline)" if s["variant"] == doc["baseline"]
                                                                       else ""))
        if s["E"] is not None:
            grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
            ax.plot(grid, s["E"] + s["A"] * grid ** (-s["alpha"]), color=f"C{i}", lw=1, alpha=0.8)
    ax.set_yscale("log")
    return _save_log_plot(fig, ax, path, "training FLOPs", "final validation loss (reporting blocks)",
                          f"{doc['sweep']}: loss vs compute, fits L = E + A·C^-α")


def tuning_plot(doc: dict, path: Path) -> Path | None:
    """Tuning loss vs the (first) tuned value, one panel per size, one line per variant; the chosen point ringed."""
    tuning = [t for t in doc.get("tuning") or [] if t["points"]]
    if not tuning:
        return None
    key = next(iter(tuning[0]["points"][0]["values"]))
    sizes = list(dict.fromkeys((t["size"], t.get("level")) for t in tuning))  # one panel per (size, factor level)
    variants = list(dict.fromkeys(t["variant"] for t in tuning))
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.8), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for t in (t for t in tuning if (t["size"], t.get("level")) == size):
            pts = sorted((p["values"][key], p["tune_loss"]) for p in t["points"] if p["tune_loss"] is not None)
            if not pts:
                continue
            color = f"C{variants.index(t['variant'])}"
            ax.plot(*zip(*pts), marker="o", color=color, label=t["variant"])
            if t["chosen"]:
                best = next(loss for v, loss in pts if v == t["chosen"][key])
                ax.plot([t["chosen"][key]], [best], "o", ms=11, mfc="none", color=color)
        ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_title(" ".join(str(p) for p in size if p) or "tuning", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("final tuning loss")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(doc: dict, results: list, out_dir: Path) -> list[Path]:
    """Write the sweep's PNGs into out_dir; returns the paths written (plots without data are skipped)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {r["name"]: r for r in doc["variants"]}
    by_variant: dict[str, list] = {name: [] for name in rows}
    for r in results:
        if r.variant in by_variant:
            by_variant[r.variant].append(r)
    base = doc.get("baseline")
    sweep = doc["sweep"]
    paths = [
        _line_plot({v: _seed_curves(rs, "tokens", "val_loss", "evals") for v, rs in by_variant.items()},
                   out_dir / "val_loss_vs_tokens.png", "training tokens", "validation loss (nats/token)",
                   f"{sweep}: validation loss vs tokens", base),
        _line_plot({v: _seed_curves(rs, "wall_s", "val_loss", "evals") for v, rs in by_variant.items()},
                   out_dir / "val_loss_vs_wallclock.png", "wall-clock seconds (incl. evaluation)",
                   "validation loss (nats/token)", f"{sweep}: validation loss vs wall-clock", base),
        _line_plot({v: _seed_curves(rs, "tokens", "val_loss", "evals", float(rows[v]["flops_per_token"] or 0))
                    for v, rs in by_variant.items()},
                   out_dir / "val_loss_vs_flops.png", "training FLOPs (≈ tokens × FLOPs/token)",
                   "validation loss (nats/token)", f"{sweep}: validation loss vs training compute", base),
    ]
    train_curves = {v: _seed_curves(rs, "tokens", "loss", "train") for v, rs in by_variant.items()}
    longest = max((len(x) for curves in train_curves.values() for x, _ in curves), default=0)
    k = max(1, longest // 10) | 1  # each point is already a mean over train.log_interval steps
    smoothed = {v: [(x, _smooth(y, k)) for x, y in curves] for v, curves in train_curves.items()}
    paths.append(_line_plot(smoothed, out_dir / "train_loss_smoothed.png", "training tokens",
                            f"train loss (centered mean of {k} log points)", f"{sweep}: smoothed training loss", base))
    for v, rs in by_variant.items():
        if rs and any(r.expert_load for r in rs):
            first = sorted(rs, key=lambda r: r.seed)[0]
            paths.append(expert_load_heatmap(first, out_dir / f"expert_load_{v}.png"))
    paths.append(_family_plot(doc["variants"], "params_ffn", out_dir / "final_loss_vs_ffn_params.png",
                              "FFN parameters"))
    paths.append(_family_plot(doc["variants"], "train_flops", out_dir / "final_loss_vs_train_flops.png",
                              "training FLOPs"))
    paths.append(scaling_plot(doc, out_dir / "scaling_loss_vs_flops.png"))
    paths.append(tuning_plot(doc, out_dir / "tuning_loss_vs_value.png"))
    return [p for p in paths if p is not None]
