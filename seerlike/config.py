"""The only config machinery: typed overrides, validation, dump/load, field docs.

Configs are nested ``kw_only`` dataclasses that live beside the class they configure,
each field followed by a one-line docstring. Recipes are plain functions returning a
config. Overrides are ``a.b.c=value`` strings; every value is coerced to the field's
declared type, and a wrong key or type fails loudly with what would have been valid.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import json
import logging
import math
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from seerlike.storage import strip_credentials, write_bytes

C = TypeVar("C")

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A bad key or value in a config override or a config file."""


class Choice:
    """Base of a config section that is one of several dataclasses, chosen by its ``name`` field.

    A subclass is a dataclass with a ``name: str`` field and a ``choices()`` classmethod
    (name -> the dataclass for that name, each a subclass carrying ``name: Literal[...]``).
    ``SECTION.name=X`` swaps in X's defaults; every other key is checked against the chosen
    dataclass, so a saved config holds the chosen section only.
    """

    name: str

    @classmethod
    def choices(cls) -> dict[str, type]:
        raise NotImplementedError

    @classmethod
    def upgrade(cls, data: dict) -> dict:
        """A saved section in an older layout, rewritten into the current one (identity by default)."""
        return data


def _is_choice(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Choice)


def choose(tp: type, name: Any, key: str) -> type:
    """The dataclass that ``name`` selects in the Choice section ``tp``; unknown names list the valid ones."""
    options = tp.choices()
    if name not in options:
        raise ConfigError(f"{key}.name: unknown {key} {name!r}; choose one of {sorted(options)}")
    return options[name]


# ---------------------------------------------------------------- field docs


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a config dataclass."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    node = ast.parse(src).body[0]
    docs: dict[str, str] = {}
    body = getattr(node, "body", [])
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            for k, v in field_docs(base).items():
                docs.setdefault(k, v)
    return docs


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cfg_or_cls: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cfg_or_cls) if f.init}


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


# ---------------------------------------------------------------- coercion


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert an already-parsed value (str, number, list, dict, None) to ``tp``."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if _is_union(tp):
        members = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in members:
                return None
        errors = []
        for member in members:
            if member is type(None):
                continue
            try:
                return _convert(value, member, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for m in tp:
            if value in (m, m.value, m.name):
                return m
        raise ConfigError(f"{key}: expected one of {[m.value for m in tp]}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if _is_choice(tp) and isinstance(value, tp):
            choose(tp, value.name, key)
            return value
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, prefix=key)
        raise ConfigError(f"{key}: is a section ({tp.__name__}); set its fields as {key}.FIELD=VALUE")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = _parse_text(value)
            if not isinstance(value, (list, tuple)):
                value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(tp)}), got {value!r}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        items = [_convert(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, str):
            value = _parse_text(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(k, kt, key): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected float, got {value!r}")
        # no setting means NaN or infinity; either would only surface later as a NaN loss
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite float, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected str, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: cannot set a value of type {_type_name(tp)} from {value!r}")


def _parse_text(text: str) -> Any:
    """Parse the right-hand side of an override: ``[1,2]``, ``1,2``, ``{a: 1}`` or a scalar."""
    s = text.strip()
    if s.startswith(("[", "(", "{")):
        s = "[" + s[1:-1] + "]" if s.startswith("(") else s
        try:
            return yaml.safe_load(s)
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse {text!r}: {e}") from None
    if "," in s:
        return [p.strip() for p in s.split(",") if p.strip()]
    return s


# ---------------------------------------------------------------- overrides


def removed_keys(cls: type) -> dict[str, str]:
    """Keys ``cls`` no longer has -> what to use instead (the class's ``REMOVED_KEYS``, if any)."""
    return getattr(cls, "REMOVED_KEYS", {})


def _unknown(key: str, cls: type) -> ConfigError:
    fix = removed_keys(cls).get(key.rpartition(".")[2])
    if fix is not None:
        return ConfigError(f"{key} is no longer a setting: {fix}")
    valid = ", ".join(sorted(_fields(cls)))
    return ConfigError(f"unknown key {key!r} in {cls.__qualname__}; valid keys: {valid}")


_warned_removed: set[str] = set()


def _drop_removed(key: str, value: Any, fix: str) -> None:
    """A saved config holds a key seerlike no longer has: it loads without it (warned once per process)."""
    if key not in _warned_removed:
        _warned_removed.add(key)
        log.warning("config: ignoring %s=%r, no longer a setting (%s); a config written from now on leaves it out",
                    key, value, fix)


def apply_override(cfg: C, dotted: str, value: Any) -> C:
    """Return a copy of ``cfg`` with ``dotted`` (``a.b.c``) set to ``value`` (text or object)."""
    data = to_dict(cfg)
    _set_in_dict(type(cfg), data, dotted.split("."), value, "")
    return from_dict(type(cfg), data)


def apply_overrides(cfg: C, overrides: list[str] | tuple[str, ...]) -> C:
    """Apply ``key=value`` strings in order, then validate the result once.

    Each override is checked (key and type) as it comes, but ``__post_init__`` checks that
    relate several fields run on the final values only, so ``loop.max_steps=4
    optim.warmup_steps=1`` works whatever the recipe's warmup was.
    """
    data = to_dict(cfg)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.1)")
        _set_in_dict(type(cfg), data, key.split("."), value.strip(), "")
    return from_dict(type(cfg), data)


def _set_in_dict(cls: type, data: dict, path: list[str], value: Any, prefix: str) -> None:
    head, rest = path[0], path[1:]
    full = f"{prefix}{head}"
    if head not in _fields(cls):
        raise _unknown(full, cls)
    tp = _hints(cls)[head]
    if _is_choice(tp):
        if rest == ["name"]:
            name = str(_convert(value, str, f"{full}.name"))
            if data[head].get("name") != name:  # another choice: its own defaults
                data[head] = to_dict(choose(tp, name, full)())
            return
        tp = choose(tp, data[head].get("name"), full)
    if rest:
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{full} is a value ({_type_name(tp)}), not a section; cannot set {full}.{'.'.join(rest)}")
        _set_in_dict(tp, data[head], rest, value, f"{full}.")
    else:
        data[head] = to_dict(_convert(value, tp, full))


# ---------------------------------------------------------------- dump / load


def to_dict(cfg: Any) -> Any:
    """A JSON/YAML-friendly nested dict (tuples become lists, enums their values)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def from_dict(cls: type[C], data: dict, prefix: str = "") -> C:
    """Build ``cls`` from a nested dict, with the same checks as overrides."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    if _is_choice(cls):
        data = cls.upgrade(data)
        default = cls.__dataclass_fields__["name"].default
        cls = choose(cls, data.get("name", default), prefix or cls.__name__)
    fields = _fields(cls)
    hints = _hints(cls)
    kwargs = {}
    removed = removed_keys(cls)
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields and key in removed:
            _drop_removed(full, value, removed[key])
            continue
        if key not in fields:
            raise _unknown(full, cls)
        kwargs[key] = _convert(value, hints[key], full)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def _without_credentials(data: Any) -> Any:
    """``data`` with the ``user:password@`` of every URL removed: saved configs hold no secret, so a
    resumed run takes its S3 credentials from the environment (docs/cluster.md, S3 and credentials)."""
    if isinstance(data, str):
        return strip_credentials(data)
    if isinstance(data, list):
        return [_without_credentials(v) for v in data]
    if isinstance(data, dict):
        return {k: _without_credentials(v) for k, v in data.items()}
    return data


def dumps(cfg: Any, fmt: Literal["json", "yaml"] = "yaml") -> str:
    data = {"_type": f"{type(cfg).__module__}:{type(cfg).__qualname__}", **_without_credentials(to_dict(cfg))}
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False)


def dump(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config; ``.json`` or ``.yaml``/``.yml`` by suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "json" if path.suffix == ".json" else "yaml"
    write_bytes(path, dumps(cfg, fmt).encode())
    return path


def _resolve_type(spec: str) -> type:
    import importlib

    module, _, qualname = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def loads(text: str, cls: type[C] | None = None) -> C:
    data = yaml.safe_load(text)  # JSON is YAML
    spec = data.pop("_type", None)
    if cls is None:
        if spec is None:
            raise ConfigError("config has no _type entry; pass the config class explicitly")
        cls = _resolve_type(spec)
    return from_dict(cls, data)


def load(path: str | Path, cls: type[C] | None = None) -> C:
    """Load a config written by :func:`dump` back into an equal object."""
    return loads(Path(path).read_text(), cls)


# ---------------------------------------------------------------- reference


def reference(cfg: Any, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Rows (key, type, value, doc) for every field, nested sections flattened.

    Given a config object the values are its own (a recipe's); given a class, its defaults.
    A Choice section given as a class lists every choice's fields, each marked with its name.
    """
    rows = []
    cls = cfg if isinstance(cfg, type) else type(cfg)
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if isinstance(cfg, type):
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = "(required)"
        else:
            value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(tp):
            rows.append((key, tp.__qualname__, "(section)", docs.get(f.name, "")))
            if not isinstance(cfg, type):
                rows.extend(reference(value, prefix=f"{key}."))
            elif _is_choice(tp):
                rows.extend(_choice_reference(tp, f"{key}."))
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                # a default_factory may set the section's values (LowShotConfig.probe): those apply
                rows.extend(reference(value, prefix=f"{key}."))
            else:
                rows.extend(reference(tp, prefix=f"{key}."))
            continue
        rows.append((key, _type_name(tp), repr(to_dict(value)), docs.get(f.name, "")))
    return rows


def _choice_reference(tp: type, prefix: str) -> list[tuple[str, str, str, str]]:
    default = tp.__dataclass_fields__["name"].default
    rows = [(f"{prefix}name", "str", repr(default), f"one of: {', '.join(sorted(tp.choices()))}")]
    for name, option in sorted(tp.choices().items()):
        for key, t, value, doc in reference(option, prefix):
            if key != f"{prefix}name":
                rows.append((key, t, value, f"[{name}] {doc}"))
    return rows


def undocumented(cls: type, prefix: str = "") -> list[str]:
    """Fields with no docstring (a test keeps this empty)."""
    missing = []
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if not docs.get(f.name):
            missing.append(f"{cls.__qualname__}.{f.name}")
        tp = hints[f.name]
        for sub in (tp.choices().values() if _is_choice(tp) else [tp] if dataclasses.is_dataclass(tp) else []):
            missing.extend(undocumented(sub, f"{prefix}{f.name}."))
    return missing
