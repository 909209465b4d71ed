"""Options as dataclass fields: one definition is a recipe key, a click flag, a type and bounds.

A command's options are a dataclass whose fields are made by :func:`option` (a default,
one line of help, bounds). From the same fields come the YAML recipe's keys (field
``grad_accum`` is the key ``grad_accum``, ``grad-accum`` works too), the click flags
(``--grad-accum``, :func:`click_options`), the conversion of every value to the field's
type and the bounds checks, never written twice::

    @dataclass
    class Run:
        lr: float = option(2e-4, "Peak learning rate.", above=0, maximum=1)

    found = collect_values(Run, recipe="run.yaml", flags={"lr": "1e-3"})   # flags win
    run = Run(**found.values)
    problems = found.problems + field_problems(run)   # every problem, each naming its flag

``lorabay train`` (train/config.py) and ``lorabay label`` (train/label/run.py) are built on
it. Why not a library such as jsonargparse (litgpt's): it builds argparse parsers (the
CLI is click), stops at the first bad value where these report every problem at once,
each naming the flag and the fix (STYLE.md 2), and would be one more dependency for the
~250 lines here.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorabay.hub.errors import ConfigError


def option(
    default: Any,
    help: str,
    *,
    key: str | None = None,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    required: bool = False,
) -> Any:
    """A field: its default, one line of help, and the bounds :func:`field_problems` checks.

    ``key`` renames the recipe key and flag (``from_ref`` is spelled ``from``);
    ``minimum``/``maximum`` are inclusive bounds, ``above`` an exclusive lower bound.
    """
    metadata = {
        "help": help,
        "key": key,
        "choices": choices,
        "minimum": minimum,
        "above": above,
        "maximum": maximum,
        "required": required,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# ---------------------------------------------------------------- the field table


@dataclass(frozen=True)
class Spec:
    """One field as the recipe, the CLI and the checks see it."""

    name: str  # the dataclass attribute
    key: str  # the recipe key; the flag is --key with dashes
    kind: type  # bool, int, float, str or list
    default: Any
    help: str
    metadata: dict

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


def config_fields(cls: type) -> list[Spec]:
    """The options of dataclass ``cls``, in field order."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        specs.append(
            Spec(
                name=f.name,
                key=f.metadata.get("key") or f.name,
                kind=_base_type(hints[f.name]),
                default=default,
                help=f.metadata.get("help", ""),
                metadata=dict(f.metadata),
            )
        )
    return specs


def field_flag(cls: type, name: str) -> str:
    """The flag of field ``name`` of ``cls`` (``from_ref`` -> ``--from``)."""
    return next(spec.flag for spec in config_fields(cls) if spec.name == name)


def _base_type(hint: Any) -> type:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return list
    return hint


# ---------------------------------------------------------------- reading values


def read_recipe(path: str | os.PathLike) -> dict:
    """A YAML recipe: a mapping of option: value (ConfigError naming --config otherwise)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file", "give the path of a YAML recipe")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML ({error})") from error
    if not isinstance(recipe, dict):
        raise ConfigError(f"--config {path}: a recipe is a mapping of option: value")
    return recipe


@dataclass
class Collected:
    """What :func:`collect_values` found: converted values by field name, the recipe keys
    given (a default is never "given", so it never conflicts), and every problem."""

    values: dict[str, Any]
    given: set[str]
    problems: list[str]


def collect_values(
    cls: type,
    recipe: str | os.PathLike | dict | None = None,
    flags: dict[str, Any] | None = None,
) -> Collected:
    """The values of ``cls``'s fields a recipe (a YAML path or a mapping) and flags give:
    flags win, None means "not given", strings are converted to the field's type. An
    unknown key is a problem, with the closest known one suggested; a key that ``cls``
    lists in ``left_out`` (an option of other commands it does not take) says why."""
    specs = {spec.key: spec for spec in config_fields(cls)}
    left_out: dict[str, str] = getattr(cls, "left_out", {})
    problems: list[str] = []
    source = recipe if isinstance(recipe, dict) else read_recipe(recipe) if recipe else {}
    merged: dict[str, Any] = {}
    for raw_key, value, what in [
        *((k, v, "recipe key") for k, v in source.items()),
        *((k, v, "option") for k, v in (flags or {}).items() if v is not None),
    ]:
        key = str(raw_key).replace("-", "_")
        if key in specs:
            merged[key] = value  # flags come last: a flag overrides the recipe
        elif key in left_out:
            problems.append(f"--{key.replace('_', '-')}: {left_out[key]}")
        else:
            problems.append(f"unknown {what} {raw_key!r}{_suggest(key, specs)}")
    values = {}
    for key, value in merged.items():
        spec = specs[key]
        try:
            values[spec.name] = convert_value(spec, value)
        except ValueError as error:
            problems.append(f"{spec.flag} {error}")
    return Collected(values, set(merged), problems)


def _suggest(key: str, specs: dict[str, Spec]) -> str:
    close = difflib.get_close_matches(key, list(specs), n=1)
    return f" (did you mean {specs[close[0]].key!r}?)" if close else ""


def convert_value(spec: Spec, value: Any) -> Any:
    """``value`` as the field's type; raises ValueError with a message that names the fix."""
    kind = spec.kind
    if value is None:
        if spec.default is None:
            return None
        raise ValueError("needs a value")
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"must be true or false, got {value!r}")
    if kind is list:
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        return [str(item).strip() for item in items if str(item).strip()]
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"must be a whole number, got {value!r}")
        try:
            return (
                int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
            )
        except (TypeError, ValueError):
            raise ValueError(f"must be a whole number, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number, got {value!r}") from None
    if isinstance(value, dict | list):
        raise ValueError(f"must be text, got {value!r}")
    return str(value)


def field_problems(config) -> list[str]:
    """Required fields, choices and bounds of a dataclass of :func:`option` fields."""
    problems = []
    for spec in config_fields(type(config)):
        value = getattr(config, spec.name)
        meta = spec.metadata
        if meta.get("required") and value in (None, ""):
            problems.append(f"{spec.flag} is required: {spec.help[0].lower()}{spec.help[1:-1]}")
            continue
        if value is None:
            continue
        if meta.get("choices") and value not in meta["choices"]:
            problems.append(
                f"{spec.flag} must be one of {', '.join(meta['choices'])}, got {value!r}"
            )
        if isinstance(value, int | float) and not isinstance(value, bool):
            if meta.get("minimum") is not None and value < meta["minimum"]:
                problems.append(f"{spec.flag} must be at least {meta['minimum']:g}, got {value:g}")
            if meta.get("above") is not None and value <= meta["above"]:
                problems.append(
                    f"{spec.flag} must be greater than {meta['above']:g}, got {value:g}"
                )
            if meta.get("maximum") is not None and value > meta["maximum"]:
                problems.append(f"{spec.flag} must be at most {meta['maximum']:g}, got {value:g}")
        if spec.kind is list and meta.get("required") and not value:
            problems.append(f"{spec.flag} needs at least one value")
    return problems


# ---------------------------------------------------------------- writing values


def config_to_dict(config) -> dict:
    """Every option as recipe keys -> values (what ``--config`` would read back)."""
    return {spec.key: getattr(config, spec.name) for spec in config_fields(type(config))}


def recipe_values(config, leave_out: tuple[str, ...] = ()) -> dict:
    """The options that differ from their defaults, as recipe keys: a recipe that repeats
    the run without tripping "both given" checks (an unchanged --epochs is not given)."""
    return {
        spec.key: getattr(config, spec.name)
        for spec in config_fields(type(config))
        if getattr(config, spec.name) != spec.default and spec.key not in leave_out
    }


# ---------------------------------------------------------------- click, generated


def click_options(cls: type):
    """A decorator adding one click option per field of ``cls``, its default shown in the
    help; all default to None ("not given"), so a recipe's value is not overridden."""
    import click

    def decorate(command):
        for spec in reversed(config_fields(cls)):
            default = ",".join(spec.default) if spec.kind is list else spec.default
            shown = "" if default in (None, "", []) else f" [default: {default}]"
            if isinstance(default, str) and default != default.strip():  # "\n" shows as '\n'
                shown = f" [default: {default!r}]"
            if spec.kind is bool:
                opt = click.option(
                    f"{spec.flag}/--no-{spec.flag[2:]}",
                    spec.name,
                    default=None,
                    help=spec.help + shown,
                )
            else:
                metavar = {int: "INT", float: "NUMBER", list: "A,B"}.get(spec.kind, "TEXT")
                if spec.metadata.get("choices"):
                    metavar = "|".join(spec.metadata["choices"])
                # Typed as text: collect_values converts and reports every bad value at once.
                opt = click.option(
                    spec.flag, spec.name, default=None, metavar=metavar, help=spec.help + shown
                )
            command = opt(command)
        return command

    return decorate


def flags_from_click(cls: type, params: dict) -> dict:
    """click's keyword arguments (attribute names) -> {key: value} for :func:`collect_values`."""
    by_name = {spec.name: spec.key for spec in config_fields(cls)}
    return {by_name[name]: value for name, value in params.items() if name in by_name}
