"""Loading, validation and the static/dynamic split of the configuration (SPEC §3.2)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from usp_core.config.schema import (
    ALL_FIELDS,
    BY_KEY,
    DYNAMIC_FIELDS,
    SECTIONS,
    STATIC_FIELDS,
    Field,
    cross_field_errors,
)

ENV_PREFIX = "USP_"


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped, out of range or violates a cross-field rule."""


_PY_TYPES = {"float": float, "int": int, "bool": bool, "str": str, "list": tuple}

StaticConfig = dataclasses.make_dataclass(
    "StaticConfig",
    [(f.name, _PY_TYPES[f.kind]) for f in STATIC_FIELDS],
    frozen=True,
)
StaticConfig.__module__ = __name__
StaticConfig.__doc__ = (
    "Hashable static part of the predictor configuration: values that change array shapes or Python control "
    "flow. A distinct StaticConfig is a distinct compilation."
)

DynamicParams = dict  # str -> 0-d jax/numpy array: a pytree the jitted step receives as traced leaves


def resolve_key(name: str) -> str:
    """``section.name`` for a full key or for a bare field name that is unique across sections."""
    if name in BY_KEY:
        return name
    matches = [f.key for f in ALL_FIELDS if f.name == name]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ConfigError(f"unknown config key {name!r}")
    raise ConfigError(f"ambiguous config key {name!r}: one of {', '.join(matches)}")


def coerce_value(f: Field, value: Any, *, source: str = "") -> Any:
    """Check one value against its field (type, bounds, choices) and return it in canonical Python form."""
    where = f" (from {source})" if source else ""

    def fail(why: str) -> ConfigError:
        return ConfigError(f"{f.key} = {value!r}{where}: {why}; allowed: {f.kind} {f.describe_range()}")

    if f.kind == "bool":
        if not isinstance(value, bool | np.bool_):
            raise fail("expected a boolean")
        return bool(value)
    if f.kind == "str":
        if not isinstance(value, str):
            raise fail("expected a string")
        if f.choices is not None and value not in f.choices:
            raise fail("not an allowed choice")
        return value
    if f.kind == "list":
        if not isinstance(value, list | tuple) or not all(isinstance(x, str) for x in value):
            raise fail("expected a list of strings")
        return tuple(value)
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
        raise fail("expected a number")
    if f.kind == "int":
        if isinstance(value, float | np.floating):
            if not float(value).is_integer():
                raise fail("expected an integer")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise fail("expected a finite number")
    if (f.low is not None and value < f.low) or (f.high is not None and value > f.high):
        raise fail("out of range")
    return value


def _parse_env_value(f: Field, raw: str, source: str) -> Any:
    text = raw.strip()
    try:
        if f.kind == "bool":
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if f.kind == "int":
            return int(float(text)) if float(text).is_integer() else float(text)
        if f.kind == "float":
            return float(text)
        if f.kind == "list":
            return tuple(x.strip() for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(
            f"{f.key} = {raw!r} (from {source}): cannot parse as {f.kind}; allowed: {f.kind} {f.describe_range()}"
        ) from None
    return text


def env_overrides(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """``USP_<SECTION>__<KEY>=value`` entries of ``environ``, parsed by their field's type."""
    out: dict[str, tuple[Any, str]] = {}
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        section, _, name = var[len(ENV_PREFIX):].partition("__")
        key = f"{section.lower()}.{name.lower()}"
        if section.lower() not in SECTIONS:
            continue  # USP_* variables of other tools (e.g. USP_DUCKDB_PATH) are not config overrides
        if key not in BY_KEY:
            raise ConfigError(f"unknown config key {key!r} (from environment variable {var})")
        out[key] = (_parse_env_value(BY_KEY[key], raw, f"environment variable {var}"), f"environment variable {var}")
    return out


class PredictorConfig(Mapping[str, Any]):
    """An immutable, validated configuration: a mapping ``section.name -> value``."""

    __slots__ = ("_values", "_version", "source")

    def __init__(self, values: Mapping[str, Any], *, source: str | None = None, _validated: bool = False):
        if not _validated:
            values = _validate_complete(values)
        self._values = MappingProxyType(dict(values))
        self._version = _version_of(self._values)
        self.source = source

    @classmethod
    def default(cls) -> PredictorConfig:
        return cls({f.key: f.default for f in ALL_FIELDS}, source="schema defaults")

    def __getitem__(self, key: str) -> Any:
        return self._values[resolve_key(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __hash__(self) -> int:
        return hash(self._version)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PredictorConfig) and dict(self._values) == dict(other._values)

    def __repr__(self) -> str:
        return f"PredictorConfig(version={self._version!r}, source={self.source!r})"

    @property
    def version(self) -> str:
        """Short content hash of the canonical form (SPEC §3.2)."""
        return self._version

    def section(self, name: str) -> dict[str, Any]:
        prefix = name + "."
        return {k[len(prefix):]: v for k, v in self._values.items() if k.startswith(prefix)}

    def replace(self, changes: Mapping[str, Any], *, source: str | None = None) -> PredictorConfig:
        """A new validated config with ``changes`` (keys ``section.name`` or unique bare names)."""
        merged = dict(self._values)
        for name, value in changes.items():
            key = resolve_key(name)
            merged[key] = coerce_value(BY_KEY[key], value, source=source or "overrides")
        return PredictorConfig(merged, source=source or self.source)

    @property
    def static(self):
        """The hashable :class:`StaticConfig` (compilation key)."""
        return _static_of(self)

    def dynamic_params(self, dtype: Any = None) -> DynamicParams:
        """Dynamic parameters as a dict of 0-d arrays (floats in ``dtype``, ints as int64)."""
        import jax.numpy as jnp

        dtype = dtype or jnp.dtype(self._values["core.dtype"])
        return {
            f.name: jnp.asarray(self._values[f.key], dtype=jnp.int64 if f.kind == "int" else dtype)
            for f in DYNAMIC_FIELDS
        }

    def to_nested(self) -> dict[str, dict[str, Any]]:
        nested: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for f in ALL_FIELDS:
            v = self._values[f.key]
            nested[f.section][f.name] = list(v) if f.kind == "list" else v
        return nested

    def canonical_json(self) -> str:
        return _canonical_json(self._values)


def _canonical_json(values: Mapping[str, Any]) -> str:
    return json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(values.items())},
                      sort_keys=True, separators=(",", ":"))


def _version_of(values: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical_json(values).encode()).hexdigest()[:12]


_STATIC_CACHE: dict[str, Any] = {}


def _static_of(cfg: PredictorConfig):
    hit = _STATIC_CACHE.get(cfg.version)
    if hit is None:
        hit = StaticConfig(**{f.name: cfg[f.key] for f in STATIC_FIELDS})
        _STATIC_CACHE[cfg.version] = hit
    return hit


def _validate_complete(values: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(values) - set(BY_KEY))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    missing = [f.key for f in ALL_FIELDS if f.key not in values]
    if missing:
        f = BY_KEY[missing[0]]
        raise ConfigError(f"missing config key {f.key!r} ({f.kind} {f.describe_range()}, default {f.default!r})")
    out = {k: coerce_value(BY_KEY[k], v) for k, v in values.items()}
    errs = cross_field_errors(out)
    if errs:
        raise ConfigError(errs[0])
    for key in out["mutation_policy.locked_keys"]:
        if key not in BY_KEY:
            raise ConfigError(f"mutation_policy.locked_keys names unknown key {key!r}")
    for f in ALL_FIELDS:
        if f.section == "meta_optimization" and (f.name.endswith("_min") or f.name.endswith("_max")):
            target = BY_KEY.get(f"{_range_target(f.name)}")
            if target is not None:
                coerce_value(target, out[f.key], source=f"search range {f.key}")
    return out


def _range_target(range_name: str) -> str:
    base = range_name.rsplit("_", 1)[0]
    for g in ALL_FIELDS:
        if g.name == base and g.tunable:
            return g.key
    return ""


def flatten_toml(doc: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, table in doc.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: top-level key {section!r} must be a [section] table")
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown config section [{section}]")
        for name, value in table.items():
            key = f"{section}.{name}"
            if key not in BY_KEY:
                raise ConfigError(f"{source}: unknown config key {key!r}")
            flat[key] = value
    return flat


def load_config(
    path: str | os.PathLike[str] | None = "config/config.toml",
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> PredictorConfig:
    """Load, validate and override a configuration.

    Order: the TOML file (every key required; ``None`` means the schema defaults), then environment
    variables ``USP_<SECTION>__<KEY>``, then ``overrides``. Each step is validated; errors are
    :class:`ConfigError` naming the key, the value and the allowed range.
    """
    if path is None:
        values = {f.key: f.default for f in ALL_FIELDS}
        source = "schema defaults"
    else:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: malformed TOML: {exc}") from None
        values = flatten_toml(doc, source=source)
        try:
            _validate_complete(values)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None
    environ = os.environ if environ is None else environ
    for key, (value, src) in env_overrides(environ).items():
        values[key] = coerce_value(BY_KEY[key], value, source=src)
    for name, value in (overrides or {}).items():
        key = resolve_key(name)
        values[key] = coerce_value(BY_KEY[key], value, source="overrides")
    return PredictorConfig(values, source=source)
