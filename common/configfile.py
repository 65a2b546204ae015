"""Reading an experiment: a preset or a YAML file, its ``base`` presets, and overrides.

Where the text comes from (the package's presets, a hospital's file) and how
files layer over presets is one concern; what the text may say, and the rules
that bind its values, is ``common.config``'s.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, ExperimentConfig
from .configparse import from_dict

PRESETS = ("quick", "quick-study", "study", "tiny")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_text(name: str) -> str:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {list(PRESETS)})")
    return resources.files("common").joinpath("presets", f"{name}.yaml").read_text()


def load_config(source: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Load a preset name (``quick``, ``study``, ``tiny``) or a YAML file.

    A YAML file may say ``base: quick`` to start from a preset and change only
    what it lists.  ``overrides`` (nested dict) are merged last.
    """
    text = preset_text(str(source)) if str(source) in PRESETS else _read(Path(source))
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    data = _resolve_base(data, str(source))
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def _resolve_base(data: dict[str, Any], source: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Merge ``data`` over its ``base`` preset, and that preset over its own base (``quick-study`` is ``quick``'s)."""
    base = data.pop("base", None)
    if base is None:
        return data
    if str(base) in seen:
        raise ConfigError(f"{source}: 'base' presets form a cycle: {' -> '.join((*seen, str(base)))}")
    parent = yaml.safe_load(preset_text(str(base))) or {}
    return _deep_merge(_resolve_base(parent, source, (*seen, str(base))), data)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from exc
