"""Seed statistics of ``benchmarks/finetune.py``: mean ± standard error, paired differences.

A method's runs differ only in their seed (heads' init, batch order, dropout stream), and
every method sees the same seeds, so a difference between two methods is taken seed by
seed (paired) over the seeds both have; its standard error is that of the per-seed
differences (``std(ddof=1) / sqrt(n)``), which removes the variance the seeds share.
"""

from __future__ import annotations

import math

BASELINES = ("adamw", "lora8")


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """(mean, standard error of the mean); the error is None for fewer than two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _key(record: dict) -> str:
    return record["method"] if record["method"] != "grass" else f"grass (r {record['rank']})"


def summary(records: list[dict]) -> list[dict]:
    """One entry per method (and lr): accuracy mean ± s.e. over seeds, paired differences
    (in accuracy points, x100) against each baseline of :data:`BASELINES` that ran."""
    by_method: dict[str, dict[int, dict]] = {}
    for r in records:
        by_method.setdefault(f"{_key(r)} lr {r['lr']:g}", {})[r["seed"]] = r
    base_runs = {}
    for name, runs in by_method.items():
        method = next(iter(runs.values()))["method"]
        if method in BASELINES and method not in base_runs:
            base_runs[method] = runs
    out = []
    for name, runs in by_method.items():
        first = next(iter(runs.values()))
        mean, se = mean_se([r["accuracy"] for r in runs.values()])
        entry = {"name": name, "method": first["method"], "lr": first["lr"], "seeds": sorted(runs),
                 "accuracy_mean": mean, "accuracy_se": se, "trainable_params": first["trainable_params"],
                 "opt_state_bytes": max(r["opt_state_bytes"] for r in runs.values()), "paired": {}}
        for base, base_by_seed in base_runs.items():
            shared = sorted(set(runs) & set(base_by_seed))
            if not shared or base_by_seed is runs:
                continue
            diffs = [100 * (runs[s]["accuracy"] - base_by_seed[s]["accuracy"]) for s in shared]
            d_mean, d_se = mean_se(diffs)
            entry["paired"][base] = {"seeds": shared, "per_seed_points": [round(d, 2) for d in diffs],
                                     "mean_points": d_mean, "se_points": d_se}
        out.append(entry)
    return out


def _pm(mean: float, se: float | None, scale: float = 1.0, digits: int = 2) -> str:
    text = f"{mean * scale:+.{digits}f}" if scale == 1.0 else f"{mean * scale:.{digits}f}"
    return text if se is None else f"{text} ± {se * scale:.{digits}f}"


def summary_table(entries: list[dict]) -> str:
    """The summary as text: accuracy in percent, paired differences in points."""
    head = ["method", "seeds", "accuracy %", *(f"Δ vs {b} (pts)" for b in BASELINES), "trainable", "opt state"]
    rows = []
    for e in entries:
        paired = [_pm(e["paired"][b]["mean_points"], e["paired"][b]["se_points"]) if b in e["paired"] else "-"
                  for b in BASELINES]
        rows.append([e["name"], str(len(e["seeds"])), _pm(e["accuracy_mean"], e["accuracy_se"], 100.0), *paired,
                     f"{e['trainable_params']:,}", f"{e['opt_state_bytes'] / 2**20:.2f} MiB"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
