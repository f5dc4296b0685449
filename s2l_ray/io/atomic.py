"""Write-then-rename: a reader (or a rerun after a kill) sees a file or folder whole or not at all.

`os.replace` is atomic within one filesystem, so each helper writes next to the target (same
folder, a `.part` name) and renames it into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def _part(path: Path) -> Path:
    return path.with_name(f"{path.name}.part")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through `path.part` and one rename."""
    path = Path(path)
    part = _part(path)
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """`obj` as indented JSON (non-JSON values as str), written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def copy_tree_atomic(src: str | Path, dst: str | Path) -> Path:
    """Copy the folder `src` to `dst` through `dst.part` and one rename (`dst` must not exist;
    a `.part` left by a killed copy is replaced)."""
    dst = Path(dst)
    part = _part(dst)
    shutil.rmtree(part, ignore_errors=True)
    shutil.copytree(src, part)
    os.replace(part, dst)
    return dst
