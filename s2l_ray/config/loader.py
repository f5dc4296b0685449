"""Strict loading: YAML file + `key=value` overrides -> a checked S2LConfig, and back to YAML.

Unknown keys (with a "did you mean"), wrong types and bad values fail before any work starts,
with a ConfigError naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from s2l_ray.config.schema import ConfigError, S2LConfig, _fail


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " / ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        # int before float, so that 5000 stays a count in `int | float`
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is float):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads '3e-3' as text; it means 0.003
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"unsupported config type {tp!r} at {key}")
    _fail(key, f"expects {_type_name(tp)}, got {value!r} ({type(value).__name__})",
          f"set it to a {_type_name(tp)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail(prefix or "<root>", f"expects a mapping of keys, got {type(data).__name__}",
              "write it as `key: value` lines")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else (
                f"valid keys here: {', '.join(names)}")
            _fail(key, "is not a known key", hint + " (see `s2l config --reference`)")
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - all fields have defaults
        raise ConfigError(f"{prefix}: {e}") from e


def parse_override(text: str) -> tuple[list[str], Any]:
    """'reference.lr=1e-4' -> (['reference', 'lr'], 0.0001); values are YAML scalars/lists."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value. Fix: write e.g. select.budget=0.2")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key. Fix: write section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"config key '{key}': value {raw!r} is not valid YAML ({e})") from e
    return key.split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None) -> S2LConfig:
    """Load a YAML config (or the defaults), apply `key=value` overrides, check everything."""
    import yaml

    data: dict[str, Any] = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist. Fix: pass a YAML path, "
                              "or run `s2l config` to print the defaults")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from e
        data = _deep_merge(data, loaded or {})
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child is None else child
                node[part] = child
            node = child
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{'.'.join(parts)}': '{parts[0]}' is not a section. "
                              "Fix: override a leaf key like select.budget=0.2")
        node[parts[-1]] = value
    return _build(S2LConfig, data, "")


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(b, dict):
        raise ConfigError("config root must be a mapping of sections. Fix: start with `run:`, "
                          "`data:`, ... (see `s2l config`)")
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k),
                                                                                dict) else v
    return out


def dump_config(cfg: S2LConfig, path: str | Path | None = None) -> str:
    """The resolved config as YAML (written next to the outputs as the run's snapshot)."""
    import yaml

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text
