"""Loading a run configuration: YAML files that extend each other, `dotted.key=value` overrides, validation.

Loading order: the file's `extends` chain (base first) is merged with OmegaConf, then the command-line overrides
(values parsed as YAML scalars), then everything is validated by pydantic against `RunConfig` (train/config.py).
Any problem becomes a one-line `ConfigError` naming the key and the file (or "command line") and what is valid.

Config values are data: OmegaConf interpolations (`${oc.env:VAR}`, `${model.hidden_size}`) are refused, never
resolved (a config or override could otherwise read the environment), and every number must be finite (NaN and
±inf, also spelled `.nan`/`.inf` in YAML or `nan`/`inf` on the command line, are refused for every float key).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from model.config import FFNConfig
from train.config import RunConfig
from train.errors import ConfigError

_KEY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def read_yaml(path: Path) -> dict:
    """One YAML file as a mapping (safe loader); errors name the file and, for syntax errors, the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e.__class__.__name__}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"YAML syntax error in {path}{where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"YAML error in {path}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _load_chain(path: Path, seen: tuple[Path, ...]) -> tuple[Any, list[Path]]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"'extends' cycle: {chain}")
    data = read_yaml(path)
    parent = data.pop("extends", None)
    refuse_interpolations(data, str(path))
    files = [path]
    if parent is None:
        base = OmegaConf.create({})
    else:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: 'extends' must be a file path, got {parent!r}")
        parent_path = (path.parent / parent)
        if not parent_path.exists():
            raise ConfigError(f"{path}: extended file not found: {parent_path}")
        base, parent_files = _load_chain(parent_path, (*seen, path))
        files = parent_files + files
    try:
        return OmegaConf.merge(base, OmegaConf.create(data)), files
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: cannot merge onto {parent}: {_one_line(str(e))}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """`dotted.key=value` -> (key, value); the value is parsed as a YAML scalar/flow value, never evaluated."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not _KEY_RE.match(key):
        raise ConfigError(f"malformed override '{text}': expected dotted.key=value, e.g. model.ffn.type=moe")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override '{text}': cannot parse the value '{raw}' as YAML") from None
    return key, value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Resolve a config file (with its `extends` chain) plus CLI overrides into a validated `RunConfig`."""
    if path is None:
        merged, files = OmegaConf.create({}), []
    else:
        merged, files = _load_chain(Path(path), ())
    override_keys = []
    for text in overrides:
        key, value = parse_override(text)
        refuse_interpolations(value, "command line", key)
        override_keys.append(key)
        try:
            OmegaConf.update(merged, key, value, merge=True, force_add=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{text}': {_one_line(str(e))}") from None
    try:
        data = OmegaConf.to_container(merged, resolve=False)  # values are data: nothing is ever resolved
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_one_line(str(e))}") from None
    source = str(files[-1]) if files else "defaults"
    return validate_config(data, source=source, override_keys=override_keys)


def _find_interpolation(value: Any, key: str) -> Optional[str]:
    """The key of the first string holding an OmegaConf interpolation `${...}` (keys included), else None."""
    if isinstance(value, str):
        return key if "${" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{key}.{k}" if key else str(k)
            if "${" in str(k):
                return sub
            found = _find_interpolation(v, sub)
            if found is not None:
                return found
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _find_interpolation(v, f"{key}[{i}]")
            if found is not None:
                return found
    return None


def refuse_interpolations(value: Any, where: str, key: str = "") -> None:
    """Config values are data: a `${...}` would make OmegaConf read the environment or other keys. The message names
    the key and where it was written, never the text (nor, since nothing is resolved, what it would resolve to)."""
    found = _find_interpolation(value, key)
    if found is not None:
        raise ConfigError(f"{found}: interpolations (${{...}}) are not supported ({where}); config values are data: "
                          f"write the value itself")


def _non_finite(data: Any, node: Any, prefix: str = "") -> Optional[tuple[str, Any]]:
    """(key, value) of the first float-typed key of the schema whose value is NaN or ±inf, as YAML writes them
    (.nan, .inf) or as a string pydantic would parse to one ('nan', 'inf', '-Infinity'); else None."""
    if not isinstance(data, dict):
        return None
    fields = _fields_of(node)
    for key, value in data.items():
        if key not in fields:
            continue
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            found = _non_finite(value, fields[key], path + ".")
            if found:
                return found
        elif "float" in str(fields[key]) and _is_non_finite(value):
            return path, value
    return None


def _is_non_finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        return not math.isfinite(float(value))
    except ValueError:  # not a number at all: pydantic names the type error
        return False
    except OverflowError:  # an integer too large for a float
        return True


def validate_config(data: dict, source: str = "config", override_keys: list[str] = ()) -> RunConfig:
    """Validate a config mapping (as loaded, overrides applied) into a `RunConfig`; every problem is one
    ConfigError line naming the key and `source` (or "command line" for keys in `override_keys`)."""
    override_keys = list(override_keys)
    found = _find_interpolation(data, "")
    if found is not None:  # load_config refuses these per file; this covers mappings from elsewhere
        refuse_interpolations(data, _where(found, source, override_keys))
    found = _non_finite(data, RunConfig)
    if found is not None:
        key, value = found
        raise ConfigError(f"{key} must be a finite number, got {value} ({_where(key, source, override_keys)})")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, data, source, override_keys)) from None
    except ValueError as e:  # raised by a dataclass __post_init__ outside pydantic's wrapping
        raise ConfigError(f"{_one_line(str(e))} ({source})") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _schema_keys(loc: tuple) -> list[str]:
    """Valid keys of the section at `loc` (for 'did you mean')."""
    node: Any = RunConfig
    for part in loc:
        fields = _fields_of(node)
        if part not in fields:
            return []
        node = fields[part]
    return list(_fields_of(node))


def _fields_of(node: Any) -> dict:
    if isinstance(node, type) and issubclass(node, BaseModel):
        return {k: f.annotation for k, f in node.model_fields.items()}
    if dataclasses.is_dataclass(node):
        hints = {f.name: f.type for f in dataclasses.fields(node)}
        return {k: {"ffn": FFNConfig}.get(k, v) for k, v in hints.items()}
    return {}


def _where(key: str, source: str, override_keys: list[str]) -> str:
    """Where the value of `key` came from: the command line, the file, or both (a section some overrides touch)."""
    if any(key == k or key.startswith(k + ".") or key.startswith(k + "[") for k in override_keys):
        return "command line"
    if any(k.startswith(key + ".") for k in override_keys):
        return f"{source} with command-line overrides"
    return source


def _explain(err: ValidationError, data: dict, source: str, override_keys: list[str]) -> str:
    first = err.errors()[0]
    loc = tuple(str(p) for p in first["loc"])
    key = ".".join(loc)
    where = _where(key, source, override_keys)
    kind = first["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        if any(k.startswith(key + ".") for k in override_keys):
            where = "command line"
        valid = _schema_keys(loc[:-1])
        near = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(valid)}"
        return f"unknown key '{key}' ({where}){hint}"
    if kind == "literal_error":
        expected = first.get("ctx", {}).get("expected", "")
        return f"{key}: invalid choice {first['input']!r} ({where}); valid: {expected.replace(' or ', ', ')}"
    if kind in ("value_error", "assertion_error"):
        msg = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        return f"{_one_line(msg)} ({where})"
    value = first.get("input")
    shown = f"{value!r}" if not isinstance(value, dict) else "a mapping"
    return f"{key}: {first['msg'].lower()}, got {shown} ({where})"
