"""Build click options from a config model, so `--help` shows every field with its description.

Top-level scalar fields become options (`image_size` -> `--image-size`); nested models are set with
`--set storage.endpoint_url=...` and are listed, with their descriptions, at the end of `--help`. Every command also
takes `--config FILE` (YAML) and `--set key.sub=value`, applied in that order of increasing priority.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import click
from pydantic import BaseModel, SecretStr
from pydantic_core import PydanticUndefined

from pipeline.config import Config, load_config

_SCALARS = {int: click.INT, float: click.FLOAT, str: click.STRING, Path: click.Path(path_type=str)}


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _click_type(annotation: Any) -> click.ParamType | None:
    annotation = _unwrap_optional(annotation)
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if typing.get_origin(annotation) is Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)])
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return click.Choice([e.value for e in annotation])
    return None


def _item_type(annotation: Any) -> click.ParamType | None:
    """The click type of a `list[str]` / `tuple[int, ...]` field's items (a repeatable option), else None."""
    annotation = _unwrap_optional(annotation)
    args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
    if typing.get_origin(annotation) in (list, tuple) and len(args) == 1 and args[0] in _SCALARS:
        return _SCALARS[args[0]]
    return None


def _is_model(annotation: Any) -> bool:
    annotation = _unwrap_optional(annotation)
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _default_text(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "required"
    if isinstance(field.default, SecretStr) or field.default is None:
        return "" if field.default is None else "***"
    return f"default: {field.default}"


def _nested_help(model: type[BaseModel], prefix: str) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        if _is_model(field.annotation):
            lines += _nested_help(_unwrap_optional(field.annotation), key + ".")
        else:
            lines.append(f"  {key}: {field.description or ''}")
    return lines


def config_command(
    config_class: type[Config], name: str, help: str, required: tuple[str, ...] = (), arguments: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], click.Command]:
    """Decorate `fn(config)` into a click command whose options are `config_class`'s fields.

    `required` names fields that must be given on the command line or in the config file; `arguments` names list
    fields given as the command's positional arguments instead of options.
    """

    def decorate(fn: Callable[..., Any]) -> click.Command:
        params: list[click.Parameter] = []
        nested: list[str] = []
        for field_name, field in config_class.model_fields.items():
            flag = "--" + field_name.replace("_", "-")
            description = (field.description or "").replace("\n", " ")
            default = _default_text(field)
            text = f"{description} [{default}]" if default else description
            if field_name in arguments:
                params.append(click.Argument([field_name], nargs=-1))
                continue
            if _is_model(field.annotation):
                nested += _nested_help(_unwrap_optional(field.annotation), field_name + ".")
                continue
            if _unwrap_optional(field.annotation) is bool:
                params.append(click.Option([f"{flag}/--no-{flag[2:]}", field_name], default=None, help=text))
                continue
            item_type = _item_type(field.annotation)
            if item_type is not None:  # --guidelines "a" --guidelines "b"
                params.append(click.Option([flag, field_name], type=item_type, multiple=True, default=None,
                                           help=f"{text} Repeatable."))
                continue
            click_type = _click_type(field.annotation)
            if click_type is None:  # lists and other structured values: --set key=[a, b]
                nested.append(f"  {field_name}: {description}")
                continue
            params.append(click.Option([flag, field_name], type=click_type, default=None, help=text))
        params.append(click.Option(["--config", "config_file"], type=click.Path(dir_okay=False),
                                   help="YAML file with any of these settings (command-line options win)."))
        params.append(click.Option(["--set", "overrides"], multiple=True, metavar="KEY=VALUE",
                                   help="Override any setting, nested ones too: --set storage.region=eu-west-1. Repeatable."))
        epilog = ""
        if nested:
            epilog = "\b\nSettings reached with --set KEY=VALUE or --config:\n" + "\n".join(nested)

        def callback(config_file: str | None, overrides: tuple[str, ...], **values: Any) -> Any:
            # a repeatable option given no times is "not set", like any other option left out
            values = {k: (list(v) or None) if isinstance(v, tuple) else v for k, v in values.items()}
            missing = [f for f in required if values.get(f) is None]
            config = load_config(config_class, config_file, overrides, **values)
            still_missing = [f for f in missing if getattr(config, f, None) in (None, "")]
            if still_missing:
                raise click.UsageError("missing " + ", ".join("--" + f.replace("_", "-") for f in still_missing))
            return fn(config)

        return click.Command(name, callback=callback, params=params, help=help, epilog=epilog or None,
                             context_settings={"max_content_width": 120})

    return decorate
