"""Reporting a comparison: loss curves (PNG) and the results table."""

from __future__ import annotations

from pathlib import Path

from .measure import fmt_bytes

__all__ = ["plot_losses", "results_table", "json_default"]


def _ema(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average with bias correction (so the start is not pulled to 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = alpha * avg + (1 - alpha) * v
        out.append(avg / (1 - alpha ** i))
    return out


def plot_losses(records: list[dict], path: Path, title: str):
    """Save smoothed train-loss and eval-loss curves of every run to ``path`` (PNG).

    Returns ``path``, or ``None`` without matplotlib (an optional dependency: the run
    still succeeds, without a plot).
    """
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run"] for r in records))
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(runs):
        rows = [r for r in records if r["run"] == run]
        color = f"C{i}"
        steps = [r["step"] for r in rows]
        alpha = 1 - 1 / max(2.0, len(rows) / 20)
        ax.plot(steps, _ema([r["loss"] for r in rows], alpha), color=color, lw=1.5, label=f"{run} train")
        ev = [(r["step"], r["eval_curve"]) for r in rows if "eval_curve" in r]
        if ev:
            ax.plot(*zip(*ev), color=color, ls="--", marker="o", ms=4, label=f"{run} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def results_table(summary: dict) -> str:
    """The final comparison as a plain-text table with aligned columns."""
    head = ["run", "eval loss", "eval ppl", "train loss", "tokens/s", "compile s", "peak mem", "opt state", "params",
            "steps"]
    rows = [[name, f"{s['eval_loss']:.4f}", f"{s['eval_ppl']:.1f}", f"{s['train_loss']:.4f}",
             f"{s['tokens_per_s']:,.0f}", _compile_cell(s), fmt_bytes(s["peak_mem_bytes"]),
             fmt_bytes(s["optimizer_state_bytes"]), f"{s['params']:,}", str(s["steps"])]
            for name, s in summary.items()]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _compile_cell(s: dict) -> str:
    if s.get("backend", "eager") == "eager":
        return "-"  # not compiled
    return f"{s.get('compile_s', 0.0):.1f}"


def json_default(obj):
    """JSON for the odd non-builtin value (paths, numpy/torch scalars)."""
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
