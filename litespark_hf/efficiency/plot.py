"""PNG plots (matplotlib's Agg canvas directly: the global backend of the caller is left alone)."""

from __future__ import annotations

__all__ = ["plot_timeline", "plot_bench"]


def _figure(rows: int, cols: int, size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def plot_timeline(report: dict, path: str) -> str:
    """Throughput, MFU and power against the step, from an efficiency report's ``timeline``."""
    tl = report.get("timeline") or []
    fig, axes = _figure(3, 1, (7, 7.5))
    series = [("tokens_per_second", "tokens/s", 1.0), ("mfu", "MFU (%)", 100.0), ("power_w", "power (W, node sum)", 1.0)]
    for ax, (key, label, scale) in zip(axes[:, 0], series):
        pts = [(t["step"], t[key] * scale) for t in tl if t.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3)
        else:
            ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    hw = report.get("hardware", {}).get("hardware_used", "")
    est = " (energy estimated)" if (report.get("energy") or {}).get("is_estimate") else ""
    fig.suptitle(f"Training efficiency: {hw}{est}", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def plot_bench(result: dict, path: str) -> str:
    """Bar charts of a train_bench result: tokens/s, MFU and energy per token per variant."""
    rows = [r for r in result["variants"] if r.get("status") == "ok"]
    fig, axes = _figure(1, 3, (15, 4.8))
    names = [r["name"] for r in rows]
    panels = [("tokens_per_second", "tokens/s", 1.0), ("mfu", "MFU (%)", 100.0),
              ("joules_per_token", "energy per token (J)", 1.0)]
    for ax, (key, label, scale) in zip(axes[0], panels):
        vals = [(r.get(key) or 0.0) * scale for r in rows]
        bars = ax.bar(range(len(rows)), vals, color=["#888888" if r.get("baseline") else "#3b75af" for r in rows])
        for b, v in zip(bars, vals):
            if v:
                text = f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
                ax.annotate(text, (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        if not any(vals):
            ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    failed = [f"{r['name']}: {r.get('status')}" for r in result["variants"] if r.get("status") != "ok"]
    cfg = result.get("config", {})
    title = f"train_bench {cfg.get('name', '')} on {result.get('device', '')}"
    if failed:
        title += "  |  not run / failed: " + "; ".join(failed)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    return path
