"""The trajectory stage's groups, without Ray: contiguous ranges of ingest's rows in order,
planned from row counts alone, read back slice by slice; `with_groups` (the one-process
equivalent) agrees with the plan; the resume key follows the parts."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s2l_ray.stages.trajectories import (
    TrajectoryError,
    examples_plan,
    group_starts,
    plan_groups,
    read_slices,
    with_groups,
)


def _rows(plan: list[list[tuple[str, int, int]]]) -> list[int]:
    return [sum(n for *_, n in g) for g in plan]


def test_groups_are_balanced_ranges_across_part_files() -> None:
    plan = plan_groups(["a", "b", "c", "d"], [5, 0, 7, 1], 3)
    # 13 rows in 3 groups: [0, 4), [4, 8), [8, 13); an empty part is skipped
    assert plan == [[("a", 0, 4)], [("a", 4, 1), ("c", 0, 3)], [("c", 3, 4), ("d", 0, 1)]]
    assert group_starts(13, 3) == [0, 4, 8, 13]
    # A group wider than a part spans several; sizes differ by one at most, none is empty.
    plan = plan_groups(["a", "b", "c", "d"], [2, 1, 2, 95], 16)
    assert plan[0] == [("a", 0, 2), ("b", 0, 1), ("c", 0, 2), ("d", 0, 1)]
    assert sum(_rows(plan)) == 100 and set(_rows(plan)) == {6, 7} and len(plan) == 16
    # Every row exactly once, in order: the slices tile the parts.
    seen = [(f, o + i) for g in plan for f, o, n in g for i in range(n)]
    assert seen == [(f, i) for f, n in zip("abcd", [2, 1, 2, 95], strict=True) for i in range(n)]


def test_more_groups_than_rows_and_no_rows() -> None:
    assert plan_groups(["a", "b"], [2, 1], 10) == [[("a", 0, 1)], [("a", 1, 1)], [("b", 0, 1)]]
    assert plan_groups(["a"], [7], 1) == [[("a", 0, 7)]]
    assert plan_groups(["a", "b"], [0, 0], 4) == []
    with pytest.raises(ValueError, match="2 files but 1 row counts"):
        plan_groups(["a", "b"], [3], 2)


def test_with_groups_matches_the_plan() -> None:
    counts = [5, 0, 7, 1, 30]
    plan = plan_groups([str(i) for i in range(len(counts))], counts, 6)
    table = with_groups(pa.table({"id": [f"x{i}" for i in range(sum(counts))]}), 6)
    assert table["group"].to_pylist() == [g for g, n in enumerate(_rows(plan)) for _ in range(n)]


def _parts(folder: Path, counts: list[int], row_group: int = 3) -> list[str]:
    """Parts of consecutive ids x0, x1, ... (several row groups each)."""
    folder.mkdir(exist_ok=True)
    files, start = [], 0
    for i, n in enumerate(counts):
        f = folder / f"part-{i}.parquet"
        pq.write_table(pa.table({"id": [f"x{start + j}" for j in range(n)],
                                 "v": list(range(start, start + n))}), f,
                       row_group_size=row_group)
        files.append(str(f))
        start += n
    return files


def test_read_slices_reads_the_planned_rows(tmp_path: Path) -> None:
    counts = [8, 0, 11, 4]
    files = _parts(tmp_path / "ex", counts)
    plan = plan_groups(files, counts, 4)
    got = [read_slices(g, ["id"])["id"].to_pylist() for g in plan]
    starts = group_starts(sum(counts), 4)
    assert got == [[f"x{i}" for i in range(lo, hi)] for lo, hi in pairwise(starts)]
    with pytest.raises(ValueError, match="4 planned; the examples changed"):
        read_slices([(files[0], 6, 4)], ["id"])


def test_plan_key_follows_the_parts(tmp_path: Path) -> None:
    ex = tmp_path / "ex"
    _parts(ex, [8, 11])
    plan, key = examples_plan(ex, 4, 19)
    assert _rows(plan) == [4, 5, 5, 5] and examples_plan(ex, 4, 19)[1] == key
    assert examples_plan(ex, 3, 19)[1] != key  # another group count
    _parts(ex, [9, 10])  # same rows, cut elsewhere: groups read other slices
    assert examples_plan(ex, 4, 19)[1] != key
    with pytest.raises(TrajectoryError, match="counts 20 valid examples, but .* holds 19 rows"):
        examples_plan(ex, 4, 20)
