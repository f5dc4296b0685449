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
    from s2l_ray.core.selection import resolve_budget
    from s2l_ray.errors import config_keys

    trials: list[Trial] = []
    seen: set[tuple[str, int, int]] = set()
    for b in budgets:
        with config_keys("sweep", {"budget": "sweep.budgets"}):
            size = resolve_budget(b, n)
        for m in methods:
            method = FULL if size == n else m
            for s in seeds:
                if (method, size, s) in seen:
                    continue
                seen.add((method, size, s))
                trials.append(Trial(f"{method}-b{budget_label(b)}-s{s}", method, b, size, s))
    return trials


METRICS = ("macro_em", "macro_loss")  # what the summary and the plots compare


def summarize(rows: list[dict[str, Any]],
              metrics: tuple[str, ...] = METRICS) -> list[dict[str, Any]]:
    """One row per (method, size) and per metric: mean, std (ddof=1; 0 with one seed), min, max
    over seeds. Rows lacking a metric (or NaN) are left out of its statistics, counted in
    `missing`."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["size"]), []).append(r)
    out = []
    for (method, size), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row: dict[str, Any] = {"method": method, "size": size, "budget": rs[0]["budget"],
                               "fraction": rs[0].get("fraction"), "runs": len(rs)}
        for m in metrics:
            vals = np.array([r[m] for r in rs if _finite(r.get(m))], dtype=float)
            row.update({
                f"{m}_seeds": len(vals),
                f"{m}_mean": float(vals.mean()) if len(vals) else float("nan"),
                f"{m}_std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                f"{m}_min": float(vals.min()) if len(vals) else float("nan"),
                f"{m}_max": float(vals.max()) if len(vals) else float("nan")})
        out.append(row)
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def markdown_summary(summary: list[dict[str, Any]], metrics: tuple[str, ...] = METRICS,
                     title: str = "Sweep results") -> str:
    """A table a person reads: per budget and method, each metric's mean ± std over seeds
    [min, max], and its gap to random at the same budget where random was run."""
    head = "| budget | examples | method | seeds |"
    for m in metrics:
        head += f" {m} | vs random |"
    lines = [f"## {title}", "", "Mean ± std over seeds [min, max]; `vs random`: the difference "
             "of means at the same budget (higher is better for *_em, lower for *_loss).", "",
             head, "|" + " --- |" * (4 + 2 * len(metrics))]
    rnd = {r["size"]: r for r in summary if r["method"] == "random"}
    for r in summary:
        frac = f" ({r['fraction']:.0%})" if _finite(r.get("fraction")) else ""
        n = r[f"{metrics[0]}_seeds"]
        seeds = f"{n} (+{r['runs'] - n} missing)" if r["runs"] > n else str(n)
        line = f"| {budget_label(r['budget'])} | {r['size']}{frac} | {r['method']} | {seeds} |"
        for m in metrics:
            mean, std = r[f"{m}_mean"], r[f"{m}_std"]
            cell = (f"{mean:.3f} ± {std:.3f} [{r[f'{m}_min']:.3f}, {r[f'{m}_max']:.3f}]"
                    if _finite(mean) else "n/a")
            base = rnd.get(r["size"], {}).get(f"{m}_mean")
            gap = (f"{mean - base:+.3f}" if r["method"] not in ("random", FULL)
                   and _finite(base) and _finite(mean) else "")
            line += f" {cell} | {gap} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# the data generator's marks: what kind of problem each row is, and whether its answer is wrong
#
# Contract: a marks table maps id -> (kind, wrong), kind a string (None: unmarked), wrong a bool
# (None: unmarked). `marks_from_raw` reads it from the rows' original JSON (ingest's `raw`);
# the tables below use only that mapping.

def _dotted(row: dict[str, Any], key: str) -> Any:
    """row['a']['b'] for key 'a.b'; None when any step is missing."""
    v: Any = row
    for part in key.split("."):
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    return v


def marks_from_raw(ids: list[str], raws: list[str], kind_key: str = "kind",
                   wrong_key: str = "wrong") -> dict[str, tuple[str | None, bool | None]]:
    """id -> (kind, wrong) from each row's original JSON; dotted keys reach nested fields."""
    import json

    if len(ids) != len(raws):
        raise ValueError(f"{len(ids)} ids for {len(raws)} raw rows")
    out: dict[str, tuple[str | None, bool | None]] = {}
    for i, raw in zip(ids, raws):
        row = json.loads(raw) if raw else {}
        kind, wrong = _dotted(row, kind_key), _dotted(row, wrong_key)
        out[i] = (None if kind is None else str(kind), None if wrong is None else bool(wrong))
    return out


def subset_composition(selected: list[str],
                       marks: dict[str, tuple[str | None, bool | None]]) -> dict[str, Any]:
    """What a subset holds by the marks: rows, wrong rows and their share among the rows whose
    wrongness is marked (None when none is), and rows per kind ('(unmarked)' for None)."""
    missing = [i for i in selected if i not in marks]
    if missing:
        raise ValueError(f"{len(missing)} selected ids have no marks (e.g. {missing[:3]})")
    marked = [marks[i][1] for i in selected if marks[i][1] is not None]
    kinds: dict[str, int] = {}
    for i in selected:
        k = marks[i][0] if marks[i][0] is not None else "(unmarked)"
        kinds[k] = kinds.get(k, 0) + 1
    return {"rows": len(selected), "wrong": int(sum(marked)), "wrong_marked": len(marked),
            "wrong_share": (sum(marked) / len(marked)) if marked else None,
            "kinds": dict(sorted(kinds.items()))}


def per_kind_accuracy(ids: list[str], correct: list[bool],
                      marks: dict[str, tuple[str | None, bool | None]]) -> dict[str, float]:
    """Exact match per kind of held-out row: kind -> share correct (unmarked rows left out)."""
    if len(ids) != len(correct):
        raise ValueError(f"{len(ids)} ids for {len(correct)} results")
    hit: dict[str, list[int]] = {}
    for i, ok in zip(ids, correct):
        kind = marks.get(i, (None, None))[0]
        if kind is not None:
            hit.setdefault(kind, []).append(int(bool(ok)))
    return {k: sum(v) / len(v) for k, v in sorted(hit.items())}


def mean_table(rows: list[dict[str, Any]], prefix: str, title: str,
               fmt: str = "{:.2f}") -> str:
    """Markdown: per (budget, method), the mean over seeds of every `<prefix><name>` column."""
    cols = sorted({k[len(prefix):] for r in rows for k in r if k.startswith(prefix)})
    if not cols:
        return f"{title}: no `{prefix}*` values (the data carries no such marks).\n"
    lines = [title, "", "| budget | method | " + " | ".join(c or prefix for c in cols) + " |",
             "| --- | --- | " + " | ".join("---" for _ in cols) + " |"]
    keys = sorted({(r["size"], r["budget"], r["method"]) for r in rows})
    for size, budget, method in keys:
        rs = [r for r in rows if (r["size"], r["budget"], r["method"]) == (size, budget, method)]
        cells = []
        for c in cols:
            vals = [r[prefix + c] for r in rs if _finite(r.get(prefix + c))]
            cells.append(fmt.format(sum(vals) / len(vals)) if vals else "")
        lines.append(f"| {budget} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _method_label(method: str) -> str:
    return {"s2l": "S2L", FULL: "all data"}.get(method, method)


def _groups(rows: list[dict[str, Any]]) -> list[tuple[str, int, float | None, list[dict]]]:
    """(method, size, fraction, trials) per cell, smallest budget first, `full` last."""
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["method"], r["size"]), []).append(r)
    order = sorted(cells, key=lambda k: (k[0] == FULL, k[1], k[0] != "s2l", k[0]))
    return [(m, n, cells[(m, n)][0].get("fraction"), cells[(m, n)]) for m, n in order]


def _mean(rs: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rs if _finite(r.get(key))]
    return float(np.mean(vals)) if vals else float("nan")


def _cell(rs: list[dict[str, Any]], key: str) -> str:
    vals = [r[key] for r in rs if _finite(r.get(key))]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}"


def result_table(rows: list[dict[str, Any]], title: str = "Result") -> str:
    """The demo's headline table: per (method, budget), the held-out macro exact match, exact
    match per kind (the eval set's `source`), and held-out macro loss; `± std` over seeds when
    there are several. Then one sentence that reads it (`headline`)."""
    kinds = sorted({k[3:] for r in rows for k in r if k.startswith("em/")})
    head = ["data", "examples", "seeds", "macro EM", *kinds, "held-out loss"]
    lines = [f"## {title}", "", "Exact match (EM) on the held-out set, 0 to 1, higher is better;"
             " loss: mean held-out response loss over kinds, lower is better.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for method, size, frac, rs in _groups(rows):
        name = _method_label(method)
        if method != FULL and _finite(frac):
            name += f" {frac:.0%}"
        cells = [name, str(size), str(len(rs)), _cell(rs, "macro_em"),
                 *(_cell(rs, f"em/{k}") for k in kinds), _cell(rs, "macro_loss")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + headline(rows) + "\n"


def headline(rows: list[dict[str, Any]]) -> str:
    """One plain sentence reading the table, e.g. "S2L at 10%: 0.52 macro exact match, random
    0.48; at 30%: 0.70, random 0.66; all data: 0.78 (held-out, mean of 1 seed)."."""
    by_size: dict[int, list[tuple[str, float | None, float]]] = {}
    full = None
    for method, size, frac, rs in _groups(rows):
        if method == FULL:
            full = _mean(rs, "macro_em")
        else:
            by_size.setdefault(size, []).append((method, frac, _mean(rs, "macro_em")))
    parts = []
    for i, (size, cells) in enumerate(sorted(by_size.items())):
        frac = cells[0][1]
        at = f"{frac:.0%}" if _finite(frac) else f"{size} examples"
        main, *others = cells
        text = (f"{_method_label(main[0])} at {at}: {main[2]:.2f}"
                f"{' macro exact match' if i == 0 else ''}")
        text += "".join(f", {_method_label(m)} {v:.2f}" for m, _, v in others)
        parts.append(text)
    if full is not None:
        parts.append(f"all data: {full:.2f}")
    seeds = sorted({r.get("seed") for r in rows})
    if not parts:
        return "No finished trials."
    return "; ".join(parts) + f" (held-out, {len(seeds)} seed{'s' * (len(seeds) > 1)})."
