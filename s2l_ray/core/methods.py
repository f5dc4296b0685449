"""The selection methods' names and the budget's shape: the one source for the config schema
(`SelectConfig.method`, `sweep.methods`) and the selection code. Pure Python, no imports."""

from __future__ import annotations

import typing
from typing import Literal

Method = Literal["s2l", "random", "stratified", "least_confidence", "middle_perplexity",
                 "high_learnability", "el2n"]
SELECTION_METHODS: tuple[str, ...] = typing.get_args(Method)
# Baselines that rank by a score of the loss trajectory (the others group: clusters, sources).
LOSS_METHODS = ("least_confidence", "middle_perplexity", "high_learnability", "el2n")


def budget_problem(budget: object) -> tuple[str, str] | None:
    """(problem, fix) when `budget` is not a count >= 1 or a fraction in (0, 1]; else None."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        return f"is {budget!r}", "give a count (e.g. 5000) or a fraction (e.g. 0.1)"
    if isinstance(budget, float) and not 0 < budget <= 1:
        return (f"fraction {budget} is outside (0, 1]",
                "use a fraction in (0, 1] such as 0.1, or an integer count")
    if isinstance(budget, int) and budget < 1:
        return f"count {budget} is below 1", "use a positive count or a fraction"
    return None
