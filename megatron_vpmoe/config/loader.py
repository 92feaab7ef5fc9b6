"""Load a YAML run config into the typed schema, apply ``--set`` overrides, validate, dump.

Every problem is reported before any work starts, as a :class:`ConfigError` naming the
file and the dotted key: unknown keys (with a suggestion), wrong types, and the
cross-field rules in ``schema.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from megatron_vpmoe.config.schema import VpmoeConfig
from megatron_vpmoe.utils.atomic import atomic_write_text
from megatron_vpmoe.utils.errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; build nested dataclasses. Raises ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}", key=key
        )
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"must be one of {choices}, got {value!r}", key=key)
        return value
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {type(value).__name__} {value!r}", key=key)
        (item_tp,) = args or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping (section), got {type(value).__name__}", key=key)
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true/false, got {type(value).__name__} {value!r}", key=key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {type(value).__name__} {value!r}", key=key)
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {type(value).__name__} {value!r}", key=key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {type(value).__name__} {value!r}", key=key)
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {key}")


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for raw_key, value in values.items():
        key = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if raw_key not in names:
            close = difflib.get_close_matches(str(raw_key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key{hint}", key=key)
        kwargs[raw_key] = _coerce(value, hints[raw_key], key)
    return cls(**kwargs)


def config_from_dict(values: Mapping[str, Any] | None, *, file: str | None = None) -> VpmoeConfig:
    """Build and validate a config from a plain mapping (``file`` is named in errors)."""
    try:
        cfg = _build(VpmoeConfig, values or {})
        cfg.validate()
    except ConfigError as err:
        raise (err.with_file(file) if file else err) from None
    return cfg


def _one_line(err: Exception) -> str:
    """A YAML error (several lines with a caret drawing) as one line."""
    return " ".join(str(err).split())


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error (PyYAML keeps
    the last silently, so a config that sets ``lr`` twice trains with whichever came last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _value in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.setdefault(key, line)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first != line:
                    raise ConfigError(f"line {line}: duplicate key {key!r} (first set at line {first})")
        return super().construct_mapping(node, deep=deep)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` → (path, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    dotted, raw = text.split("=", 1)
    path = [p for p in dotted.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse value {raw!r}: {_one_line(err)}", key=dotted) from None
    except RecursionError:  # the parser recurses per nesting level
        raise ConfigError("value nested too deeply to parse", key=dotted) from None
    return path, value


def apply_overrides(values: dict, overrides: Iterable[str]) -> dict:
    """Apply ``--set a.b=c`` overrides to a nested mapping (in place; returned for chaining)."""
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError("is not a section", key=".".join(path[: path.index(part) + 1]))
            node = child
        node[path[-1]] = value
    return values


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config file not found", file=str(p))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"not a UTF-8 text file (byte {err.object[err.start]:#04x} at offset {err.start}); "
                          f"a config is YAML text", file=str(p)) from None
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror}", file=str(p)) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {_one_line(err)}", file=str(p)) from None
    except RecursionError:  # PyYAML's composer recurses per nesting level
        raise ConfigError("not a config: YAML nested too deeply to parse", file=str(p)) from None
    except ConfigError as err:
        raise err.with_file(str(p)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("top level must be a mapping of sections", file=str(p))
    return data


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> VpmoeConfig:
    """Read ``path`` (or defaults when None), apply overrides, validate."""
    values = read_yaml(path) if path else {}
    overrides = list(overrides)
    try:
        apply_overrides(values, overrides)
        return config_from_dict(values)
    except ConfigError as err:
        overridden = {o.split("=", 1)[0].strip() for o in overrides}
        if err.key is None and "--set" in str(err) or (
            err.key and any(err.key == k or err.key.startswith((k + ".", k + "[")) for k in overridden)
        ):
            raise err.with_file("--set") from None
        raise err.with_file(str(path) if path else "<defaults>") from None


def config_to_dict(cfg: VpmoeConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: VpmoeConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_resolved_config(cfg: VpmoeConfig, path: str | Path | None = None) -> Path:
    """Write the resolved config (``{run.dir}/config.yaml`` by default) atomically."""
    target = Path(path) if path else Path(cfg.run.dir) / "config.yaml"
    atomic_write_text(target, dump_config(cfg))
    return target
