"""Parquet helpers the stages share: a stage folder's files, the `losses` column as a matrix,
and a function mapped over files as Ray tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def parquet_files(folder: str | Path, stage: str = "trajectories") -> list[str]:
    """The Parquet files under a stage's folder (hidden and _-prefixed ones skipped), sorted."""
    root = Path(folder)
    files = sorted(str(p) for p in root.rglob("*.parquet")
                   if not any(part.startswith((".", "_")) for part in p.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {root}. Fix: run the {stage} stage "
                                f"first (s2l {stage} CONFIG)")
    return files


def losses_matrix(column: Any, where: str) -> np.ndarray:
    """A `losses` column (fixed-size or variable list of floats) -> (n, T) float32."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if arr.null_count:
        raise ValueError(f"{where}: {arr.null_count} rows have no losses (null). Fix: rerun the "
                         "trajectories stage")
    if pa.types.is_fixed_size_list(arr.type):
        t = arr.type.list_size
    elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        t = int(lengths[0]) if n else 0
        if n and (lengths != t).any():
            raise ValueError(f"{where}: trajectories of different lengths {sorted(set(lengths))}"
                             "; every example needs the loss at every checkpoint")
    else:
        raise ValueError(f"{where}: 'losses' is {arr.type}, expected a list of floats")
    values = arr.flatten().to_numpy(zero_copy_only=False)  # flatten honours slices
    return np.asarray(values, dtype=np.float32).reshape(n, t)


def map_files(fn: Any, files: list[str], *args: Any) -> list[Any]:
    """fn(file, *args) for every file as Ray tasks; big arguments are shipped once."""
    import ray

    task = ray.remote(num_cpus=1)(fn)
    refs = [ray.put(a) if isinstance(a, (list, dict, np.ndarray)) else a for a in args]
    return ray.get([task.remote(f, *refs) for f in files])
