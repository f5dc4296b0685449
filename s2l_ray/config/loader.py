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

from s2l_ray.config.schema import ConfigError, S2LConfig, _fail, short, short_text


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
    _fail(key, f"expects {_type_name(tp)}, got {short(value)} ({type(value).__name__})",
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
        key = f"{prefix}.{short_text(str(k), 60)}" if prefix else short_text(str(k), 60)
        if k not in names:
            close = difflib.get_close_matches(str(k)[:100], names, n=1)
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
        value = load_yaml(raw, f"config key '{short_text(key, 60)}'") if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"config key '{short_text(key, 60)}': value {short(raw)} is not valid "
                          f"YAML ({short_text(str(e), 300)})") from None
    return key.split("."), value


MAX_CONFIG_BYTES = 1 << 20  # a config file or override value larger than this is refused
MAX_CONFIG_NODES = 100_000  # values a config may hold once YAML aliases are expanded
MAX_CONFIG_DEPTH = 50  # nesting; the real config nests 3 levels


def load_yaml(text: str, what: str) -> Any:
    """yaml.safe_load, bounded and strict: refuses a text over MAX_CONFIG_BYTES, a document
    that expands (through aliases: `a: &a [...]`, `b: [*a, *a, ...]`) to more than
    MAX_CONFIG_NODES values or nests deeper than MAX_CONFIG_DEPTH, and a mapping that repeats a
    key (YAML would silently keep the last one). The checks walk the composed node graph
    before any Python object is built, counting each shared node's size once, so a
    "billion laughs" document is refused in milliseconds."""
    import yaml

    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what} is {len(text)} characters, over {MAX_CONFIG_BYTES}. Fix: a "
                          "config is a few kilobytes; check that this is the right file")
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_yaml_nodes(node, what)
            return loader.construct_document(node)
        except RecursionError:
            raise ConfigError(f"{what} nests too deep to read. Fix: a config nests a few "
                              "levels; check that this is the right file") from None
        except ValueError as e:  # e.g. an integer with more digits than Python converts
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{what}: a value cannot be read ({short_text(str(e), 200)}). "
                              "Fix: correct that value") from None
    finally:
        loader.dispose()


def _check_yaml_nodes(root: Any, what: str) -> None:
    import yaml

    sizes: dict[int, int] = {}  # node id -> values under it, aliases expanded
    active: set[int] = set()

    def walk(node: Any, path: str, depth: int) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        where = path or "the top level"
        if id(node) in active:
            raise ConfigError(f"{what}: '{where}' contains itself (a recursive YAML alias). Fix: "
                              "write the values out")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{what}: '{where}' nests deeper than {MAX_CONFIG_DEPTH} levels. "
                              "Fix: a config nests a few levels; check the file")
        active.add(id(node))
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                name = short_text(str(k.value), 60) if isinstance(k, yaml.ScalarNode) else "?"
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    if k.value in seen:
                        key = f"{path}.{name}" if path else name
                        raise ConfigError(
                            f"{what}: key '{key}' appears twice (lines {seen[k.value]} and "
                            f"{k.start_mark.line + 1}); YAML would silently keep the last. "
                            "Fix: keep one of them")
                    seen[k.value] = k.start_mark.line + 1
                total += walk(k, path, depth + 1)
                total += walk(v, f"{path}.{name}" if path else name, depth + 1)
                if total > MAX_CONFIG_NODES:
                    break
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                total += walk(v, f"{path}[{i}]", depth + 1)
                if total > MAX_CONFIG_NODES:
                    break
        if total > MAX_CONFIG_NODES:
            raise ConfigError(f"{what}: '{where}' expands to more than {MAX_CONFIG_NODES} "
                              "values (YAML aliases repeating each other?). Fix: a config holds "
                              "a few hundred values; write them out without nested aliases")
        active.discard(id(node))
        sizes[id(node)] = total
        return total

    walk(root, "", 0)


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
            loaded = load_yaml(p.read_text(encoding="utf-8"), f"config file '{p}'")
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: "
                              f"{short_text(str(e), 500)}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file '{p}' is not UTF-8 text ({e.reason} at byte "
                              f"{e.start}). Fix: save it as UTF-8") from None
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
