"""The reference table of every config key (`s2l config --reference`, the README's table):
type, declared default and the docstring under the field, read from the schema's source."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import json
import os
import typing

from s2l_ray.config.loader import _type_name
from s2l_ray.config.schema import S2LConfig


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field, read from the source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def reference_table() -> str:
    """Markdown table of every key, its type, default and docstring."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    root = S2LConfig()
    hints_root = typing.get_type_hints(S2LConfig)
    for section in dataclasses.fields(S2LConfig):
        cls = hints_root[section.name]
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = getattr(getattr(root, section.name), f.name)
            if isinstance(f.default, str) and default == os.path.abspath(f.default):
                default = f.default  # as declared, not as resolved on this machine
            lines.append(f"| `{section.name}.{f.name}` | {_type_name(hints[f.name])} | "
                         f"`{json.dumps(default)}` | {docs.get(f.name, '')} |")
    return "\n".join(lines)
