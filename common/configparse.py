"""Plain data (YAML, JSON, a Flower run config, a bundle's manifest) into a validated :class:`ExperimentConfig`.

Every key is checked against the schema in ``common.config``: an unknown key or a
wrongly typed value fails with its dotted path, so a typo in a hospital's YAML
fails loudly instead of silently running the default.  A key that older files,
run folders and model bundles still carry but that never changed anything is
skipped with a warning saying what replaced it, so an old bundle still loads.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from typing import Any, Literal

from .config import ConfigError, ExperimentConfig

log = logging.getLogger(__name__)

# Keys that older config files, run folders and model bundles still carry, which never changed
# anything: skipped with a warning that says what replaced them, so an old bundle still loads.
_REMOVED_KEYS = {
    "train.epochs": "ignored: it was never read; the budget is train.rounds x train.local_epochs "
    "(per network models.<kind>.rounds), in the federation and the pooled baseline alike",
}


def _parse(tp: Any, value: Any, path: str) -> Any:
    """Convert plain YAML data into ``tp``, naming ``path`` on any mismatch."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path or '<root>'}: expected a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name for f in dataclasses.fields(tp)}
        extra = set(value) - fields
        for key in sorted(extra):
            full = f"{path}.{key}" if path else key
            if full in _REMOVED_KEYS:
                log.warning("%s: %s", full, _REMOVED_KEYS[full])
                value = {k: v for k, v in value.items() if k != key}
                extra.discard(key)
        if extra:
            raise ConfigError(f"{path + '.' if path else ''}{sorted(extra)[0]}: unknown key (allowed: {sorted(fields)})")
        kwargs = {k: _parse(hints[k], v, f"{path}.{k}" if path else k) for k, v in value.items()}
        try:
            return tp(**kwargs)  # type: ignore[operator]
        except ConfigError:
            raise
        except TypeError as exc:
            raise ConfigError(f"{path or '<root>'}: {exc}") from exc
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not one of {list(allowed)}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        inner = args[0]
        return tuple(_parse(inner, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build a validated config from plain data (YAML, JSON or a Flower run config)."""
    return typing.cast(ExperimentConfig, _parse(ExperimentConfig, data, ""))
