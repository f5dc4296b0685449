"""What a user brings instead of what the first stages make.

    reference.checkpoints: [...]   train-ref trains nothing: it checks the given checkpoints
                                   (models.checkpoints) and publishes a manifest pointing at
                                   them, in the order given; trajectories scores them as usual
    trajectories.source: PATH      trajectories scores nothing: it checks the Parquet's ids
                                   against the ingested ones and its losses, and publishes them
                                   in the stage's own layout; train-ref is skipped

Both publish the same stage folders as the computing stages, so cluster, select, sweep and the
report read them unchanged. The hooks are called from the train-ref and trajectories stages'
check and run functions, and `preflight` from the runner's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from s2l_ray.config import ConfigError, S2LConfig

log = logging.getLogger(__name__)
ROWS_PER_FILE = 1_000_000
SHOWN = 5  # ids named in an error


def preflight(cfg: S2LConfig) -> None:
    """Checks of the given inputs that need the filesystem, before any stage starts."""
    from s2l_ray.io.readers import check_allowed_roots
    from s2l_ray.models.checkpoints import check_checkpoint_specs

    if cfg.reference.checkpoints:
        check_checkpoint_specs(cfg.reference.checkpoints)
    src = cfg.trajectories.source
    if src:
        check_allowed_roots(src, "trajectories.source", cfg.data.allowed_roots)
        trajectory_files(src)


def _given_paths(cfg: S2LConfig) -> list[str]:
    """Local folders of the given checkpoints (hub ones downloaded once into the run)."""
    from s2l_ray.models.checkpoints import check_checkpoint_specs, resolve_checkpoint
    from s2l_ray.models.specs import models_dir

    specs = list(cfg.reference.checkpoints or [])
    check_checkpoint_specs(specs)
    return [resolve_checkpoint(s, models_dir(cfg) / "hub") for s in specs]


def check_reference(cfg: S2LConfig, inputs: dict[str, Path]) -> bool:
    """train-ref's check: True when the reference is not trained here. Given checkpoints get
    every check now, before any work folder or scoring (tokenizers, weights, output head)."""
    from s2l_ray.models.checkpoints import check_given_checkpoints
    from s2l_ray.stages.base import read_report

    if cfg.trajectories.source:
        return True
    if not cfg.reference.checkpoints:
        return False
    check_given_checkpoints(_given_paths(cfg), read_report(inputs["ingest"]).get("tokenizer"),
                            cfg.reference.trust_remote_code)
    return True


def reference_report(cfg: S2LConfig, inputs: dict[str, Path],
                     tmp: Path) -> dict[str, Any] | None:
    """train-ref's work when nothing is trained: the manifest of the given checkpoints (or an
    empty one when trajectories.source gives the trajectories) into `tmp`; None otherwise."""
    from s2l_ray.models.checkpoints import manifest_for

    if cfg.trajectories.source:
        (tmp / "manifest.json").write_text("[]\n")
        log.info("train-ref: nothing to train, trajectories.source gives the trajectories")
        return {"model": None, "trained": False, "checkpoints": [],
                "skipped": "trajectories.source gives the trajectories"}
    if not cfg.reference.checkpoints:
        return None
    specs = list(cfg.reference.checkpoints)
    manifest = manifest_for(specs, _given_paths(cfg))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("train-ref: using %d given checkpoints (%s), no training", len(specs),
             ", ".join(specs))
    return {"model": None, "trained": False, "given_checkpoints": specs, "checkpoints": manifest}


# ---------------------------------------------------------------------------------------------
# given trajectories


def trajectory_files(source: str) -> list[str]:
    """The Parquet files of trajectories.source (a file or a folder of them)."""
    p = Path(source).expanduser()
    if p.is_file():
        return [str(p.resolve())]
    files = sorted(str(f) for f in p.rglob("*.parquet")
                   if not any(part.startswith((".", "_")) for part in f.relative_to(p).parts)
                   ) if p.is_dir() else []
    if not files:
        raise ConfigError(f"config key 'trajectories.source': '{source}' is neither a Parquet "
                          "file nor a folder holding some. Fix: point it at Parquet with columns "
                          "id and losses (a list of T floats per example)")
    return files


def _named(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:SHOWN])
    return f"{shown}{', ...' if len(ids) > SHOWN else ''}"


def read_given(source: str) -> tuple[Any, int]:
    """(table of id, losses as fixed-size float32 lists, T), checked: columns, types, one
    length T, finite values, unique ids. Raises ConfigError naming a few offending ids."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    key = "config key 'trajectories.source'"
    parts = []
    for f in trajectory_files(source):
        names = pq.ParquetFile(f).schema_arrow.names
        missing = [c for c in ("id", "losses") if c not in names]
        if missing:
            raise ConfigError(f"{key}: {f} has no column {missing} (it has {names[:8]}). Fix: "
                              "write one row per example with columns id (string) and losses "
                              "(list of T floats, checkpoint order)")
        parts.append(pq.read_table(f, columns=["id", "losses"]))
    t = pa.concat_tables(parts, promote_options="permissive").combine_chunks()
    if not (pa.types.is_string(t["id"].type) or pa.types.is_large_string(t["id"].type)):
        raise ConfigError(f"{key}: column id is {t['id'].type}, not text. Fix: store the ids as "
                          "the strings ingest made (ingest/examples, column id)")
    ltype = t["losses"].type
    if not (pa.types.is_list(ltype) or pa.types.is_large_list(ltype)
            or pa.types.is_fixed_size_list(ltype)) or not (
            pa.types.is_floating(ltype.value_type) or pa.types.is_integer(ltype.value_type)):
        raise ConfigError(f"{key}: column losses is {ltype}, not a list of numbers. Fix: one "
                          "list of T floats per example")
    ids = t["id"].to_pylist()
    if t["id"].null_count:
        raise ConfigError(f"{key}: {t['id'].null_count} rows have no id. Fix: give every row "
                          "its example's id")
    lengths = pc.list_value_length(t["losses"]).to_numpy(zero_copy_only=False)
    lengths = np.where(pc.is_null(t["losses"]).to_numpy(zero_copy_only=False), -1, lengths)
    n_t = int(np.bincount(lengths[lengths >= 0]).argmax()) if (lengths >= 0).any() else 0
    bad = np.flatnonzero(lengths != n_t)
    if n_t < 1 or len(bad):
        raise ConfigError(f"{key}: every example needs losses of one length T >= 1; "
                          f"{len(bad)} rows differ from T={n_t} or are null (ids "
                          f"{_named([ids[i] for i in bad])}). Fix: one loss per checkpoint "
                          "for every example")
    x = np.asarray(pc.list_flatten(t["losses"]).to_numpy(zero_copy_only=False),
                   dtype=np.float32).reshape(len(ids), n_t)
    nonfinite = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(nonfinite):
        raise ConfigError(f"{key}: {len(nonfinite)} examples have NaN or infinite losses (ids "
                          f"{_named([ids[i] for i in nonfinite])}). Fix: drop them from the "
                          "data (ingest) or recompute their losses")
    counts = pc.value_counts(t["id"])
    dup = [v["values"] for v in counts.to_pylist() if v["counts"] > 1]
    if dup:
        raise ConfigError(f"{key}: {len(dup)} ids appear more than once ({_named(sorted(dup))})."
                          " Fix: one row per example")
    losses = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), pa.float32()), n_t)
    return pa.table({"id": t["id"].cast(pa.string()), "losses": losses}), n_t


def import_trajectories(source: str, examples: Path, out: Path) -> dict[str, Any]:
    """Check `source` against the ingested examples and write it in the trajectories stage's
    layout (id, source, n_response_tokens, losses[T]; sorted by id). Returns the report."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    given, n_t = read_given(source)
    ingested = pads.dataset(str(examples), format="parquet").to_table(
        columns=["id", "source", "n_tokens", "n_prompt_tokens"])
    have = set(given["id"].to_pylist())
    want = set(ingested["id"].to_pylist())
    missing, extra = sorted(want - have), sorted(have - want)
    if missing or extra:
        msg = []
        if missing:
            msg.append(f"{len(missing)} of the {len(want)} ingested ids have no trajectory "
                       f"({_named(missing)})")
        if extra:
            msg.append(f"{len(extra)} ids in it were not ingested ({_named(extra)})")
        raise ConfigError(f"config key 'trajectories.source': {source} does not match the "
                          f"ingested examples: {'; '.join(msg)}. Fix: give one row for every id "
                          "in ingest/examples and no other (rows ingest rejected, listed in "
                          "ingest/rejects, are not examples)")
    n_resp = pc.subtract(ingested["n_tokens"], ingested["n_prompt_tokens"]).cast("int32")
    # Each ingested row's losses (the id sets are equal: every lookup hits).
    where = pc.index_in(ingested["id"], value_set=given["id"])
    table = ingested.select(["id", "source"]).append_column(
        "n_response_tokens", n_resp).append_column("losses", given["losses"].take(where)
                                                   ).sort_by("id")
    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, max(1, table.num_rows), ROWS_PER_FILE):
        pq.write_table(table.slice(i, ROWS_PER_FILE),
                       out / f"part-{i // ROWS_PER_FILE:05d}.parquet")
    manifest = [{"index": j, "step": j + 1, "column": j, "path": None, "given": source}
                for j in range(n_t)]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("trajectories: %d given trajectories of %d checkpoints from %s", table.num_rows,
             n_t, source)
    return {"examples": table.num_rows, "checkpoints": n_t, "given": source,
            "nonfinite_losses": 0}
