"""Reading any supported input into raw rows, one range of a file (or a data set) at a time.

Parsing is our own (not pyarrow's JSON reader) so that one malformed line rejects one row, not
the whole file; every raw row carries its origin (file, row number) for reports and for picking
the first of duplicated rows deterministically. plan_ranges cuts the files into ranges that tasks
parse independently (JSON Lines at line ends, Parquet at row offsets), each range knowing the
number of its first row, so the rows and their origins are those of one pass over the file.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from s2l_ray.config import ConfigError

FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
CHUNK = 4096  # rows per emitted block while parsing one file
BLOCK_BYTES = 4 << 20  # ... or fewer, so that a block of large rows stays small too (and the
# largest block Ray Data makes of them: read_raw sets its target_max_block_size to this)
READ_BYTES = 1 << 20  # piece size when scanning a file (or skipping an over-large row)
DEFAULT_MAX_ROW_BYTES = 1 << 20  # data.max_row_bytes' default, for callers without a config
RANGE_ROWS = 8192  # rows (lines) per planned range of a file: one task's work
RANGE_BYTES = 16 << 20  # ... or fewer, so that a range of large rows stays small too
SCAN_BYTES = 8 << 20  # piece size when counting a JSON Lines file's lines to plan its ranges
MAX_DEPTH = 100  # deepest JSON nesting accepted in a row; real rows nest 3-4 levels
BOM = b"\xef\xbb\xbf"


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


def too_large_detail(size: int, cap: int, what: str = "row") -> str:
    return (f"{what} is {size} bytes, over data.max_row_bytes={cap} (it was skipped unread; "
            "raise data.max_row_bytes if such rows are real)")


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")


def json_depth(text: bytes) -> int:
    """Deepest bracket nesting of one JSON text, without parsing it (strings skipped, so a "["
    inside text does not count): cheap, linear, and no recursion, so it can run before
    json.loads, whose C parser would hit Python's recursion limit on a hostile row."""
    import numpy as np

    brackets = _NOT_BRACKET.sub(b"", _JSON_STRING.sub(b'""', text))
    if len(brackets) <= 4 * MAX_DEPTH:  # the usual row: a few brackets, a plain loop
        depth = deepest = 0
        for c in brackets:
            depth += 1 if c in b"[{" else -1
            deepest = max(deepest, depth)
        return deepest
    a = np.frombuffer(brackets, np.uint8)
    steps = np.where((a == ord("[")) | (a == ord("{")), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max())


class _Out:
    """Rows of one file, emitted as raw-row tables of at most CHUNK rows / ~BLOCK_BYTES."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.rows: list[tuple[int, str | None, str | None, str | None]] = []
        self.bytes = 0

    def add(self, i: int, obj: Any) -> None:
        raw = json.dumps(_jsonable(obj), ensure_ascii=True)
        self.rows.append((i, raw, None, None))
        self.bytes += len(raw)

    def reject(self, i: int, reason: str, detail: str) -> None:
        self.rows.append((i, None, reason, detail[:500]))

    def full(self) -> bool:
        return len(self.rows) >= CHUNK or self.bytes >= BLOCK_BYTES

    def flush(self) -> Any:
        import pyarrow as pa

        cols = list(zip(*self.rows)) if self.rows else [[], [], [], []]
        t = pa.table({"origin_file": [self.path] * len(self.rows),
                      "origin_row": list(cols[0]), "raw": list(cols[1]),
                      "reject_reason": list(cols[2]), "reject_detail": list(cols[3])},
                     schema=_raw_schema())
        self.rows.clear()
        self.bytes = 0
        return t


def _json_row(out: _Out, i: int, text: bytes, what: str) -> None:
    """One JSON text (a line, an array item) -> a row of `out`, or a reject saying why."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as e:
        out.reject(i, "undecodable_text", f"{what} is not UTF-8 ({e.reason} at byte {e.start})")
        return
    depth = json_depth(text)
    if depth > MAX_DEPTH:
        out.reject(i, "too_deep", f"{what} nests {depth} levels deep; at most {MAX_DEPTH} are "
                                  "read")
        return
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as e:
        out.reject(i, "bad_json", f"{e.msg} at column {e.colno}")
    except RecursionError:  # not expected after the depth check; never a crash of the file
        out.reject(i, "too_deep", f"{what} nests too deep to parse")
    else:
        if isinstance(obj, dict):
            out.add(i, obj)
        else:
            out.reject(i, "not_an_object", f"{what} is {type(obj).__name__}")


def _bounded_lines(f: BinaryIO, cap: int) -> Iterator[tuple[bytes | None, int]]:
    """(line, size) per line of `f`, or (None, size) for a line over `cap` bytes: that one is
    read in READ_BYTES pieces and dropped, so no more than ~cap bytes of it are ever held."""
    while True:
        line = f.readline(cap + 1)
        if not line:
            return
        if len(line) > cap and not line.endswith(b"\n"):
            size = len(line)
            del line
            while True:
                rest = f.readline(READ_BYTES)
                size += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
            yield None, size
        else:
            yield line, len(line)


def _parse_jsonl(out: _Out, f: BinaryIO, cap: int, first_row: int = 0,
                 length: int | None = None) -> Iterator[Any]:
    """JSON Lines from f's position: `length` bytes of whole lines (None: to the end), the first
    of them line number `first_row` (lines are numbered from the file's start, blank ones too)."""
    if length is not None and length <= 0:
        return
    for i, (line, size) in enumerate(_bounded_lines(f, cap), first_row):
        if line is None:
            out.reject(i, "too_large", too_large_detail(size, cap, "line"))
        else:
            if i == 0 and line.startswith(BOM):
                line = line[len(BOM):]
            if line.strip():
                _json_row(out, i, line, "line")
        if out.full():
            yield out.flush()
        if length is not None:
            length -= size
            if length <= 0:  # the range ends at a line's end: the next line is another's
                return


_ARRAY_TOKEN = re.compile(rb'[\[\]{}",]')
_STRING_TOKEN = re.compile(rb'[\\"]')


class _ArrayItems:
    """Splits a JSON array file into its items while reading it in pieces: a small state
    machine (depth, inside a string, after a backslash) jumps between structural characters
    with a regex, keeps at most `cap` bytes of the current item, and only counts the bytes of
    an item over the cap. Items are parsed one by one afterwards (json_depth, json.loads)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.depth = 1  # inside the top-level array
        self.in_str = self.esc = self.closed = False
        self.item = bytearray()
        self.size = 0
        self.items = 0  # items emitted so far
        self.done: list[tuple[int, bytes | None, int]] = []  # (index, bytes | None, size)

    def _take(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.size > self.cap:
            self.item.clear()  # over the cap: from now on only counted
        else:
            self.item += piece

    def _emit(self) -> None:
        over = self.size > self.cap
        text = None if over else bytes(self.item).strip()
        if over or text or self.items or not self.closed:  # `[]` holds no item
            self.done.append((self.items, text, self.size))
            self.items += 1
        self.item.clear()
        self.size = 0

    def feed(self, buf: bytes) -> bytes:
        """Consume one piece; returns what follows the closing bracket, once it is seen."""
        pos, n = 0, len(buf)
        if self.esc and n:
            self._take(buf[:1])
            pos, self.esc = 1, False
        while pos < n:
            if self.in_str:
                m = _STRING_TOKEN.search(buf, pos)
                if m is None:
                    self._take(buf[pos:])
                    break
                j = m.start()
                if buf[j] == 0x5C:  # backslash: the next byte is escaped, maybe in the next piece
                    if j + 1 >= n:
                        self._take(buf[pos:])
                        self.esc = True
                        break
                    self._take(buf[pos:j + 2])
                    pos = j + 2
                else:
                    self._take(buf[pos:j + 1])
                    pos, self.in_str = j + 1, False
                continue
            m = _ARRAY_TOKEN.search(buf, pos)
            if m is None:
                self._take(buf[pos:])
                break
            j, c = m.start(), buf[m.start()]
            if c == 0x22:  # ", usually a whole string within this piece: one regex step
                whole = _JSON_STRING.match(buf, j)
                if whole is not None:
                    self._take(buf[pos:whole.end()])
                    pos = whole.end()
                    continue
                self.in_str = True
            elif c in b"[{":
                self.depth += 1
            elif c in b"]}":
                self.depth -= 1
                if self.depth == 0:
                    self._take(buf[pos:j])
                    self.closed = True
                    self._emit()
                    return buf[j + 1:]
            elif self.depth == 1:  # a comma between top-level items
                self._take(buf[pos:j])
                self._emit()
                pos = j + 1
                continue
            self._take(buf[pos:j + 1])
            pos = j + 1
        return b""


def _parse_json_array(out: _Out, f: BinaryIO, cap: int, head: bytes) -> Iterator[Any]:
    """A .json file holding one array of objects, `head` being its first piece past the `[`."""
    items = _ArrayItems(cap)
    buf = head
    tail = b""
    while True:
        tail = items.feed(buf)
        for i, text, size in items.done:
            if text is None:
                out.reject(i, "too_large", too_large_detail(size, cap, "array item"))
            elif not text:
                out.reject(i, "bad_json", "empty array item (two commas in a row?)")
            else:
                _json_row(out, i, text, "item")
            if out.full():
                yield out.flush()
        items.done.clear()
        buf = f.read(READ_BYTES)
        if items.closed or not buf:
            break
    if not items.closed:
        if items.size:
            out.reject(items.items, "bad_json", "the file ends inside this array item "
                                                "(truncated file?)")
        else:
            out.reject(-1, "bad_json", "the file ends before the array's closing ']'")
    else:
        rest = tail.strip()
        while not rest:
            more = f.read(READ_BYTES)
            if not more:
                break
            rest = more.strip()
        if rest:
            out.reject(-1, "bad_json", "data after the array's closing ']'; one array per "
                                       "file, or use JSON Lines")
    yield out.flush()


_CSV_FIELD_END = re.compile(rb"[,\n]")


class _CsvQuotes:
    """Whether a CSV record is still inside a quoted field, fed a piece at a time, by the csv
    module's rules: a quote opens quoting only at the start of a field (`5" screen` is text),
    `""` inside quotes is a literal quote, any other quote closes it."""

    def __init__(self) -> None:
        self.inside = self.pending = False  # pending: a quote ended the last piece, inside
        self.field_start = True

    def feed(self, piece: bytes) -> None:
        i, n = 0, len(piece)
        if self.pending and n:
            self.pending = False
            if piece[0] == 0x22:  # "" : an escaped quote, still inside
                i = 1
            else:
                self.inside = self.field_start = False
        while i < n:
            if self.inside:
                j = piece.find(b'"', i)
                if j < 0:
                    return
                if j + 1 == n:
                    self.pending = True
                    return
                if piece[j + 1] == 0x22:
                    i = j + 2
                else:
                    self.inside = self.field_start = False
                    i = j + 1
            elif self.field_start and piece[i] == 0x22:
                self.inside, self.field_start = True, False
                i += 1
            else:
                m = _CSV_FIELD_END.search(piece, i)
                if m is None:
                    self.field_start = False
                    return
                i, self.field_start = m.end(), True

    def in_quotes(self) -> bool:
        return self.inside and not self.pending


def _csv_records(f: BinaryIO, cap: int) -> Iterator[tuple[bytes | None, int]]:
    """(record, size) per CSV record, or (None, size) for one over `cap` bytes (skipped while
    reading, in pieces). A record ends at a newline outside quotes (_CsvQuotes), so records
    whose quoted text spans lines stay whole."""
    rec = bytearray()
    size = 0
    quotes = _CsvQuotes()
    while True:
        piece = f.readline(min(cap + 1, READ_BYTES))
        if piece:
            quotes.feed(piece)
            size += len(piece)
            if size > cap:
                rec.clear()
            else:
                rec += piece
        if not piece or (piece.endswith(b"\n") and not quotes.in_quotes()):
            if size:
                yield (bytes(rec) if size <= cap else None), size
            if not piece:
                return
            rec.clear()
            size = 0
            quotes = _CsvQuotes()


def _parse_csv(out: _Out, f: BinaryIO, cap: int) -> Iterator[Any]:
    """CSV with a header row (the csv module's default dialect); every field is text (no type
    guessing: an all-digit `output` column is still text), a record whose field count differs
    from the header's is rejected alone, and no record over `cap` bytes is ever held whole."""
    import csv

    def fields(text: str) -> list[str]:
        return next(csv.reader(io.StringIO(text, newline="")), [])

    header: list[str] | None = None
    i = 0
    for rec, size in _csv_records(f, cap):
        if header is None:
            if rec is None:
                out.reject(-1, "unreadable_file", too_large_detail(size, cap, "CSV header"))
                break
            try:
                header = fields(rec.removeprefix(BOM).decode("utf-8"))
            except (UnicodeDecodeError, csv.Error) as e:
                out.reject(-1, "unreadable_file", f"CSV header does not parse: {e}")
                break
            if not header or not any(h.strip() for h in header):
                header = None  # blank lines before the header
                continue
            dup = sorted({h for h in header if header.count(h) > 1})
            if dup:
                out.reject(-1, "unreadable_file", f"CSV header repeats column {dup[0]!r:.80}")
                break
            continue
        if rec is None:
            out.reject(i, "too_large", too_large_detail(size, cap, "CSV record"))
        elif rec.strip():
            try:
                values = fields(rec.decode("utf-8"))
            except UnicodeDecodeError as e:
                out.reject(i, "undecodable_text", f"record is not UTF-8 ({e.reason} at byte "
                                                  f"{e.start})")
            except csv.Error as e:
                out.reject(i, "bad_csv", f"record does not parse: {e}")
            else:
                if len(values) != len(header):
                    out.reject(i, "bad_csv", f"record has {len(values)} fields, the header "
                                             f"{len(header)}")
                else:
                    out.add(i, dict(zip(header, values)))
        else:
            continue  # blank lines are no records (as in pyarrow's reader)
        i += 1
        if out.full():
            yield out.flush()
    yield out.flush()


def row_bytes(arr: Any) -> Any:
    """Bytes each row of an Arrow array holds (text and binary lengths, summed through lists
    and structs; fixed-width values by width), computed in Arrow without making Python
    objects: the size check runs before any row becomes a Python string."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(arr)
    t = arr.type
    if pa.types.is_dictionary(t):
        return row_bytes(arr.dictionary_decode())
    if (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)):
        return pc.fill_null(pc.binary_length(arr), 0).to_numpy(zero_copy_only=False).astype(
            np.int64)
    if pa.types.is_map(t):
        return row_bytes(pa.ListArray.from_arrays(arr.offsets, pa.StructArray.from_arrays(
            [arr.keys, arr.items], ["k", "v"])))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        values = arr.flatten()
        if not len(values):
            return np.zeros(n, np.int64)
        parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        return np.bincount(parents, weights=row_bytes(values), minlength=n).astype(np.int64)
    if pa.types.is_struct(t):
        total = np.zeros(n, np.int64)
        for child in arr.flatten():
            total += row_bytes(child)
        return total
    width = getattr(t, "bit_width", 64)
    return np.full(n, max(width // 8, 1), np.int64)


def _oversized(batch: Any, cap: int) -> dict[int, str]:
    """Rows of a RecordBatch over `cap` bytes -> detail naming the largest column."""
    import numpy as np

    cols = batch.schema.names
    per_col = np.stack([row_bytes(batch.column(i)) for i in range(len(cols))]) if cols else \
        np.zeros((1, batch.num_rows), np.int64)
    sizes = per_col.sum(axis=0)
    return {int(r): too_large_detail(int(sizes[r]), cap) + f"; column "
            f"'{cols[int(per_col[:, r].argmax())]:.80}' holds {int(per_col[:, r].max())}"
            for r in np.flatnonzero(sizes > cap)}


def _parquet_rows(out: _Out, batch: Any, first: int, cap: int) -> Iterator[Any]:
    """One Parquet batch's rows (numbered from `first`) into `out`, those over `cap` rejected."""
    over = _oversized(batch, cap)
    rows = batch.to_pylist() if not over else None
    for r in range(batch.num_rows):
        if r in over:
            out.reject(first + r, "too_large", over[r])
        else:
            obj = rows[r] if rows is not None else batch.slice(r, 1).to_pylist()[0]
            try:
                out.add(first + r, obj)
            except RecursionError:
                out.reject(first + r, "too_deep", "row nests too deep")
        if out.full():
            yield out.flush()


def _parse_parquet(out: _Out, f: BinaryIO, cap: int, start: int = 0,
                   stop: int | None = None) -> Iterator[Any]:
    """Parquet rows start..stop (None: to the end), read a batch at a time from the row groups
    that hold them; the sizes of a batch's rows are checked in Arrow (row_bytes) and only rows
    within `cap` become Python objects."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
        groups: list[int] | None = None  # all
        i = 0  # the row number of the next batch's first row
        if start or stop is not None:
            groups, at = [], 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if at + n > start and (stop is None or at < stop):
                    if not groups:
                        i = at
                    groups.append(g)
                at += n
        for batch in pf.iter_batches(batch_size=256, row_groups=groups):
            # the part of the batch inside the range (a range may start or end mid-group)
            lo = max(start - i, 0)
            hi = batch.num_rows if stop is None else min(batch.num_rows, stop - i)
            first, i = i + lo, i + batch.num_rows
            if lo < hi:
                yield from _parquet_rows(out, batch.slice(lo, hi - lo), first, cap)
            if stop is not None and i >= stop:
                break
    except Exception as e:  # a corrupt file is one rejected "row", counted like any other
        # numbered -1 (before every row) for a read from the start, else by the range's first
        # row: each range's part is named by its first row, so two ranges never share a name
        out.reject(start or -1, "unreadable_file", f"parquet reader: {e}")
    yield out.flush()


class FileRange(NamedTuple):
    """One task's share of a file (plan_ranges): JSON Lines bytes start..stop, the first line
    being line number first_row of the file; Parquet rows start..stop (first_row == start);
    a whole file (0, None, 0) for the kinds that cannot be cut (JSON arrays, CSV)."""

    path: str
    start: int = 0
    stop: int | None = None  # exclusive; None: the file's end
    first_row: int = 0


def _array_head(f: BinaryIO) -> bytes | None:
    """A .json file's first piece past its opening `[` when it holds one array; None when it
    is JSON Lines (f is then back at its start)."""
    start = f.read(READ_BYTES).removeprefix(BOM).lstrip()
    while not start:  # whitespace only so far
        more = f.read(READ_BYTES)
        if not more:
            break
        start = more.lstrip()
    if start.startswith(b"["):
        return start[1:]
    f.seek(0)
    return None


def parse_file(path: str, data: bytes | None = None,
               max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
               span: FileRange | None = None) -> Iterator[Any]:
    """Yield raw-row tables for one file: (origin, JSON text) or (origin, reject reason).

    The file is read in pieces (`data`, when given, stands for its content): no row over
    `max_row_bytes` is ever held whole, and a UTF-8 byte-order mark at the start is skipped.
    `span` (from plan_ranges) limits it to one range of the file, its rows numbered as in
    the whole file's; None: the whole file.
    """
    kind = FILE_KINDS.get(Path(path).suffix.lower())
    out = _Out(path)
    cap = max_row_bytes
    span = span or FileRange(path)
    with (io.BytesIO(data) if data is not None else open(path, "rb")) as f:
        if kind == "parquet":
            yield from _parse_parquet(out, f, cap, span.start, span.stop)
            return
        if kind == "csv":
            yield from _parse_csv(out, f, cap)
            return
        # one array, or JSON Lines in a .json file; a range with an end is JSON Lines already
        # (plan_ranges looked, and never cuts an array), so its task need not look again
        if kind == "json" and span.stop is None:
            head = _array_head(f)
            if head is not None:
                yield from _parse_json_array(out, f, cap, head)
                return
        f.seek(span.start)
        yield from _parse_jsonl(out, f, cap, span.first_row,
                                None if span.stop is None else span.stop - span.start)
        yield out.flush()


def _jsonl_ranges(path: str, f: BinaryIO, rows: int, max_bytes: int) -> list[FileRange]:
    """A JSON Lines file cut after every `rows` lines, or sooner at the first line end
    `max_bytes` past the range's start, without parsing: only its newline bytes are counted
    (numpy, SCAN_BYTES at a time), as _bounded_lines numbers lines (blank, over-cap ones too)."""
    import numpy as np

    out: list[FileRange] = []
    start = first = 0  # the open range's first byte and line number
    pos = line = 0  # bytes and lines before the current piece
    while piece := f.read(SCAN_BYTES):
        ends = np.flatnonzero(np.frombuffer(piece, np.uint8) == 0x0A)  # this piece's "\n"s
        while True:
            # ends[k] completes line `line + k`: cut after `rows` lines or max_bytes bytes
            k = min(first + rows - line - 1,
                    int(np.searchsorted(ends, start + max_bytes - pos - 1)))
            if k >= len(ends):
                break
            stop = pos + int(ends[k]) + 1
            out.append(FileRange(path, start, stop, first))
            start, first = stop, line + k + 1
        pos += len(piece)
        line += len(ends)
    if pos > start or not out:  # the rest (a last line without "\n"), or an empty file
        out.append(FileRange(path, start, pos, first))
    return out


def _parquet_ranges(path: str, f: BinaryIO, rows: int, max_bytes: int) -> list[FileRange]:
    """A Parquet file cut every `rows` rows (fewer where its rows are large: max_bytes by the
    metadata's uncompressed sizes), whatever its row groups; a file whose metadata does not
    read is one range (its reader rejects it whole)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(f).metadata
    except Exception:  # corrupt: parse_file says why
        return [FileRange(path)]
    n = meta.num_rows
    size = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    step = max(1, min(rows, max_bytes * n // max(size, 1)))
    if n <= step:
        return [FileRange(path)]
    return [FileRange(path, a, min(a + step, n), a) for a in range(0, n, step)]


def plan_ranges(files: list[str], rows: int = RANGE_ROWS,
                max_bytes: int = RANGE_BYTES) -> list[FileRange]:
    """The files (in order) cut into ranges of about `rows` rows for tasks to read one each:
    JSON Lines (.jsonl, and .json files that are not one array) at line ends, Parquet at row
    offsets; JSON arrays and CSV stay whole (a cut needs a parse: quotes, nesting)."""
    if rows < 1 or max_bytes < 1:
        raise ValueError(f"rows and max_bytes must be >= 1, got {rows}, {max_bytes}")
    out: list[FileRange] = []
    for path in files:
        kind = FILE_KINDS.get(Path(path).suffix.lower())
        with open(path, "rb") as f:
            if kind == "parquet":
                out += _parquet_ranges(path, f, rows, max_bytes)
            elif kind == "jsonl" or (kind == "json" and _array_head(f) is None):
                out += _jsonl_ranges(path, f, rows, max_bytes)
            else:
                out.append(FileRange(path))
    return out


def _range_rows(ranges: list[FileRange], max_row_bytes: int) -> Any:
    """A Ray Data source with one read task per range, which yields parse_file's raw-row tables
    for it as it makes them. A read, not a map over ranges: Ray Data would bundle many small
    input rows into one map task."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class Ranges(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[Any]:
            def task(r: FileRange) -> Any:
                return lambda: parse_file(r.path, max_row_bytes=max_row_bytes, span=r)

            return [ReadTask(task(r), BlockMetadata(num_rows=None, size_bytes=None,
                                                    input_files=[r.path], exec_stats=None),
                             schema=_raw_schema(), per_task_row_limit=per_task_row_limit)
                    for r in ranges]

    return Ranges()


def _hf_rows(batch: Any, origin: str, max_row_bytes: int) -> Any:
    """Rows of a Hugging Face data set; those over max_row_bytes (measured in Arrow, before
    they become Python objects) are rejected as too_large."""
    out = _Out(origin)
    index = batch.column(batch.schema.get_field_index("__s2l_row")).to_pylist()
    batch = batch.drop_columns(["__s2l_row"])
    over = _oversized(batch, max_row_bytes)
    keep = [r for r in range(batch.num_rows) if r not in over]
    rows = iter(batch.take(keep).to_pylist()) if over else iter(batch.to_pylist())
    for r in range(batch.num_rows):
        if r in over:
            out.reject(index[r], "too_large", over[r])
        else:
            out.add(index[r], next(rows))
    return out.flush()


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


def read_raw(source: str, split: str = "train",
             max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Any:
    """A Ray Dataset of raw rows (origin_file, origin_row, raw JSON | reject) for any source.
    Files are opened by the parsing tasks and read in pieces, not handed over whole, so a
    task holds about one block of rows (and at most max_row_bytes of any one row)."""
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
        return ray.data.from_huggingface(  # blocks of CHUNK rows, not one block of all
            hf, override_num_blocks=max(1, -(-len(hf) // CHUNK))).map_batches(
            _hf_rows, batch_format="pyarrow",
            fn_kwargs={"origin": f"{source}:{split}", "max_row_bytes": max_row_bytes})
    ranges = plan_ranges(list_files(source))
    ds = ray.data.read_datasource(_range_rows(ranges, max_row_bytes),
                                  override_num_blocks=len(ranges))
    # Ray Data merges a task's output blocks up to target_max_block_size (128 MiB by default):
    # a whole file of raw rows in one block, hence in one task of the next map, whatever its
    # batch size. Blocks of a few MiB let that map cut the rows into its own batches.
    ds.context.target_max_block_size = BLOCK_BYTES
    return ds
