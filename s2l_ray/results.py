"""The sweep's grid and its results table: pure, Ray-free, array/list in and out.

A trial is one (method, budget, seed) cell. A budget that takes the whole data set is the same
experiment for every method, so it runs once per seed under the method name `full`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

FULL = "full"  # method name of the all-data trials


@dataclass(frozen=True)
class Trial:
    name: str  # folder and Tune grid value, e.g. "s2l-b0.1-s0"
    method: str
    budget: int | float  # as configured
    size: int  # examples it trains on
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def budget_label(budget: int | float) -> str:
    return f"{budget:g}" if isinstance(budget, float) else str(budget)


def plan_trials(methods: list[str], budgets: list[int | float], seeds: list[int],
                n: int) -> list[Trial]:
    """Every trial of the grid, in a stable order; full-data budgets collapse to `full`."""
    from s2l_ray.selection import resolve_budget

    trials: list[Trial] = []
    seen: set[tuple[str, int, int]] = set()
    for b in budgets:
        size = resolve_budget(b, n, key="sweep.budgets")
        for m in methods:
            method = FULL if size == n else m
            for s in seeds:
                if (method, size, s) in seen:
                    continue
                seen.add((method, size, s))
                trials.append(Trial(f"{method}-b{budget_label(b)}-s{s}", method, b, size, s))
    return trials


def summarize(rows: list[dict[str, Any]], metric: str = "macro_em") -> list[dict[str, Any]]:
    """One row per (method, size): mean, std (ddof=1; 0 with one seed), min, max over seeds.

    Rows lacking the metric (or NaN) are left out of the statistics and counted in `missing`.
    """
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["size"]), []).append(r)
    out = []
    for (method, size), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        vals = np.array([r[metric] for r in rs if _finite(r.get(metric))], dtype=float)
        loss = np.array([r["eval_loss"] for r in rs if _finite(r.get("eval_loss"))], float)
        out.append({
            "method": method, "size": size, "budget": rs[0]["budget"],
            "fraction": rs[0].get("fraction"), "seeds": len(vals),
            "missing": len(rs) - len(vals),
            f"{metric}_mean": float(vals.mean()) if len(vals) else float("nan"),
            f"{metric}_std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
            f"{metric}_min": float(vals.min()) if len(vals) else float("nan"),
            f"{metric}_max": float(vals.max()) if len(vals) else float("nan"),
            "eval_loss_mean": float(loss.mean()) if len(loss) else float("nan"),
        })
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def markdown_summary(summary: list[dict[str, Any]], metric: str = "macro_em",
                     title: str = "Sweep results") -> str:
    """A table a person reads: per budget, each method's mean ± std over seeds, and the gap to
    random at the same budget where random was run."""
    lines = [f"## {title}", "",
             f"{metric} (mean ± std over seeds [min, max]) and held-out loss, per budget.", "",
             "| budget | examples | method | seeds | " + metric + " | vs random | eval loss |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    random_at = {r["size"]: r[f"{metric}_mean"] for r in summary if r["method"] == "random"}
    for r in summary:
        mean, std = r[f"{metric}_mean"], r[f"{metric}_std"]
        cell = (f"{mean:.3f} ± {std:.3f} [{r[f'{metric}_min']:.3f}, {r[f'{metric}_max']:.3f}]"
                if _finite(mean) else "n/a")
        rnd = random_at.get(r["size"])
        gap = (f"{mean - rnd:+.3f}" if r["method"] not in ("random", FULL) and _finite(rnd)
               and _finite(mean) else "")
        frac = f" ({r['fraction']:.0%})" if _finite(r.get("fraction")) else ""
        seeds = f"{r['seeds']} (+{r['missing']} missing)" if r["missing"] else str(r["seeds"])
        lines.append(f"| {budget_label(r['budget'])} | {r['size']}{frac} | {r['method']} | "
                     f"{seeds} | {cell} | {gap} | {r['eval_loss_mean']:.4f} |")
    return "\n".join(lines) + "\n"
