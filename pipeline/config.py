"""Typed run configuration: one frozen pydantic model per job, loaded from YAML and `--set key.sub=value`.

Every job (ingest, train, evaluate, ...) has one config class derived from `Config`. Unknown keys are rejected and
every field carries a docstring, which pydantic turns into the field's description: the CLI's `--help`, the Prefect
UI's run form and the metadata saved beside each checkpoint all read it from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import UserError

C = TypeVar("C", bound="Config")

# where a job that runs a model runs it (chosen by `training.device`); here so every config can name them
DeviceSetting = Literal["auto", "cpu", "cuda"]
PrecisionSetting = Literal["auto", "bf16", "fp32"]


class Config(BaseModel):
    """Base of every job config: frozen, unknown keys rejected, field docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value); the value is read as YAML, so `3`, `true`, `[1, 2]` are typed."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects key=value (for example storage.region=eu-west-1), got {text!r}")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return [part.strip() for part in key.split(".")], value


def _set_nested(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        child = tree.get(part)
        if not isinstance(child, dict):
            child = tree[part] = {}
        tree = child
    tree[path[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def describe_validation_error(err: ValidationError) -> str:
    """One line naming each failing field, e.g. `image_size: Input should be greater than 0`."""
    parts = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "config"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        parts.append(f"{field}: {message}")
    return "invalid config: " + "; ".join(parts)


def load_config(
    cls: type[C],
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    **values: Any,
) -> C:
    """Build `cls` from, in increasing priority: its defaults, a YAML file, keyword values, `key.sub=value` overrides.

    Keyword values that are None are ignored (an option the user did not give).
    """
    tree: dict[str, Any] = read_yaml(config_file) if config_file else {}
    for key, value in values.items():
        if value is not None:
            _set_nested(tree, key.split("."), value)
    for text in overrides:
        path, value = parse_override(text)
        _set_nested(tree, path, value)
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise UserError(describe_validation_error(err)) from None
