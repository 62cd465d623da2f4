"""Reading a YAML config, applying dotted overrides, validating, and saving the resolved config."""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rlhf_ray.config.algorithm import ALGORITHM_PRESETS
from rlhf_ray.config.base import ConfigError
from rlhf_ray.config.schema import RunConfig
from rlhf_ray.redaction import redact
from rlhf_ray.safe_yaml import YamlError, load_yaml_text, read_yaml_file, shorten


log = logging.getLogger(__name__)


def _all_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return model


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p)[:100] for p in loc) or "<root>"  # a key can be as long as the file
        if e["type"] == "extra_forbidden":
            parent = _section_at(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), _all_keys(parent), n=1, cutoff=0.5)
            hint = f"did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else (
                f"valid keys here: {', '.join(_all_keys(parent))}"
            )
            lines.append(f"  {dotted}: unknown key; {hint}")
        else:
            value = e.get("input")
            shown = "" if isinstance(value, dict) else f" (got {shorten(value)})"
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {dotted}: {msg}{shown}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {shorten(text)} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {shorten(text)} has an empty key")
    try:
        return key.split("."), load_yaml_text(raw, f"override {key}") if raw else ""
    except YamlError as err:
        raise ConfigError(f"{err}; the value is read as YAML: quote it, e.g. {key}='\"...\"'") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {shorten(text)}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def validate_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when path is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {shorten(str(p))} does not exist; fix: check the path")
        try:
            data = read_yaml_file(p) or {}
        except YamlError as err:
            raise ConfigError(f"config file {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        source = str(p)
    data = apply_overrides(data, list(overrides or []))
    cfg = validate_config(data, source)
    for note in preset_conflicts(data.get("algorithm")):
        log.warning("%s (%s)", note, source)
    return cfg


def preset_conflicts(algorithm: Any) -> list[str]:
    """The settings of the chosen algorithm's preset (ALGORITHM_PRESETS) that the config sets otherwise.

    The config's own value wins, as documented; this names each such case, because switching
    `algorithm.name` on a config written for another algorithm silently keeps that algorithm's loss.
    """
    if not isinstance(algorithm, dict):
        return []
    name = algorithm.get("name", "ppo")
    notes = []
    for key, implied in ALGORITHM_PRESETS.get(name, {}).items():
        given = algorithm.get(key)
        pairs = (
            [(f"kl.{k}", v, given.get(k)) for k, v in implied.items()] if key == "kl" and isinstance(given, dict)
            else [(key, implied, given)] if key != "kl" else []
        )
        for field, value, set_to in pairs:
            if set_to is not None and set_to != value:
                notes.append(
                    f"algorithm.name={name} implies algorithm.{field}={value}, but the config sets {str(set_to)[:80]}, "
                    f"which is used; fix: drop algorithm.{field} from the config to get {name}'s setting"
                )
    return notes


def save_resolved(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML with secrets redacted."""
    Path(path).write_text(yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False))
