"""Reading any supported input into raw rows, one file or data set at a time.

Parsing is our own (not pyarrow's JSON reader) so that one malformed line rejects one row, not
the whole file; every raw row carries its origin (file, row number) for reports and for picking
the first of duplicated rows deterministically.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from s2l_ray.config import ConfigError

FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
CHUNK = 4096  # rows per emitted block while parsing one file


def _raw_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("origin_file", pa.string()), ("origin_row", pa.int64()),
                      ("raw", pa.string()), ("reject_reason", pa.string()),
                      ("reject_detail", pa.string())])


def _jsonable(v: Any) -> Any:
    """Make a parsed Parquet/CSV value JSON-safe without turning bytes into plausible text."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bytes, bytearray)):
        return {"__bytes__": len(v)}
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return {"__value__": str(v)}


def parse_file(path: str, data: bytes) -> Any:
    """Yield raw-row tables for one file: (origin, JSON text) or (origin, reject reason)."""
    import pyarrow as pa

    kind = FILE_KINDS.get(Path(path).suffix.lower())
    rows: list[tuple[int, str | None, str | None, str | None]] = []

    def flush() -> Any:
        cols = list(zip(*rows)) if rows else [[], [], [], []]
        t = pa.table({"origin_file": [path] * len(rows), "origin_row": list(cols[0]),
                      "raw": list(cols[1]), "reject_reason": list(cols[2]),
                      "reject_detail": list(cols[3])}, schema=_raw_schema())
        rows.clear()
        return t

    def add(i: int, obj: Any) -> None:
        rows.append((i, json.dumps(_jsonable(obj), ensure_ascii=True), None, None))

    if kind in ("parquet", "csv"):
        try:
            if kind == "parquet":
                import pyarrow.parquet as pq

                table = pq.read_table(io.BytesIO(data))
            else:
                import pyarrow.csv as pcsv

                table = pcsv.read_csv(io.BytesIO(data))
        except Exception as e:  # a corrupt file is one rejected "row", counted like any other
            rows.append((-1, None, "unreadable_file", f"{kind} reader: {e}"[:500]))
            yield flush()
            return
        for i, obj in enumerate(table.to_pylist()):
            add(i, obj)
            if len(rows) >= CHUNK:
                yield flush()
        yield flush()
        return

    stripped = data.lstrip()
    if kind == "json" and stripped.startswith(b"["):
        try:
            items = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            rows.append((-1, None, "bad_json", f"JSON array file does not parse: {e}"[:500]))
            yield flush()
            return
        for i, obj in enumerate(items):
            if isinstance(obj, dict):
                add(i, obj)
            else:
                rows.append((i, None, "not_an_object", f"item is {type(obj).__name__}"))
            if len(rows) >= CHUNK:
                yield flush()
        yield flush()
        return

    for i, line in enumerate(data.split(b"\n")):  # JSON Lines (also .json files holding lines)
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append((i, None, "undecodable_text", f"line is not UTF-8 ({e.reason} at "
                                                      f"byte {e.start})"))
        else:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                rows.append((i, None, "bad_json", f"{e.msg} at column {e.colno}"))
            else:
                if isinstance(obj, dict):
                    add(i, obj)
                else:
                    rows.append((i, None, "not_an_object", f"line is {type(obj).__name__}"))
        if len(rows) >= CHUNK:
            yield flush()
    yield flush()


def _parse_files(batch: dict[str, Any]) -> Any:
    for path, data in zip(batch["path"], batch["bytes"]):
        yield from parse_file(str(path), bytes(data))


def _hf_rows(batch: Any, origin: str) -> Any:
    import pyarrow as pa

    rows = batch.to_pylist()
    return pa.table({
        "origin_file": [origin] * len(rows),
        "origin_row": [r.pop("__s2l_row") for r in rows],
        "raw": [json.dumps(_jsonable(r), ensure_ascii=True) for r in rows],
        "reject_reason": [None] * len(rows), "reject_detail": [None] * len(rows),
    }, schema=_raw_schema())


def list_files(source: str) -> list[str]:
    p = Path(source).expanduser()
    if not p.exists():
        raise ConfigError(f"config key 'data.source': '{source}' does not exist. Fix: give an "
                          "existing file or folder, 'hf:NAME', or 'demo:mathmix'")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()
                                          and f.suffix.lower() in FILE_KINDS)
    if p.is_file() and p.suffix.lower() not in FILE_KINDS:
        raise ConfigError(f"config key 'data.source': '{p.name}' is not one of "
                          f"{', '.join(FILE_KINDS)}. Fix: convert it, or point at a folder")
    if not files:
        raise ConfigError(f"config key 'data.source': folder '{source}' has no "
                          f"{'/'.join(FILE_KINDS)} files. Fix: point at the data files")
    return [str(f.resolve()) for f in files]


def _local_path(source: str) -> Path | None:
    """The local path a source reads, or None for the demo and hub names."""
    if source.startswith("demo:"):
        return None
    if source.startswith("hf:"):  # read_raw loads a local folder when one exists by that name
        local = Path(source[3:]).expanduser()
        return local if local.exists() else None
    return Path(source).expanduser()


def check_allowed_roots(source: str, key: str, roots: list[str] | None) -> None:
    """Refuse a local source that is, or holds anything that resolves (symlinks followed),
    outside every one of `roots` (data.allowed_roots). No-op when roots is None."""
    path = _local_path(source)
    if roots is None or path is None:
        return
    real_roots = [Path(r).resolve() for r in roots]
    # The folder's every entry, not only the data files: a symlink inside an allowed folder
    # is exactly how input from elsewhere would slip in.
    entries = [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]
    for entry in entries:
        try:
            real = entry.resolve()
        except (OSError, RuntimeError):  # a symlink loop cannot be inside anything
            real = None
        if real is None or not any(real.is_relative_to(r) for r in real_roots):
            via = "" if real is not None and real == entry.absolute() else (
                f" (resolves to '{real}')" if real is not None else " (a symlink loop)")
            raise ConfigError(
                f"config key '{key}': '{entry}'{via} is outside data.allowed_roots "
                f"({', '.join(map(str, roots))}). Fix: move the data under one of those folders "
                "(real files, not symlinks to elsewhere), or add its folder to "
                "data.allowed_roots")


def read_raw(source: str, split: str = "train") -> Any:
    """A Ray Dataset of raw rows (origin_file, origin_row, raw JSON | reject) for any source."""
    import ray.data

    if source.startswith("hf:"):
        import datasets

        name = source[3:]
        local = Path(name).expanduser()
        if (local / "dataset_info.json").exists() or (local / "state.json").exists():
            hf = datasets.load_from_disk(str(local))
            if isinstance(hf, datasets.DatasetDict):
                hf = hf[split]
        else:
            hf = datasets.load_dataset(name, split=split)
        hf = hf.add_column("__s2l_row", list(range(len(hf))))
        return ray.data.from_huggingface(hf).map_batches(
            _hf_rows, batch_format="pyarrow", fn_kwargs={"origin": f"{source}:{split}"})
    files = list_files(source)
    return ray.data.read_binary_files(files, include_paths=True).map_batches(
        _parse_files, batch_size=1, batch_format="numpy")
