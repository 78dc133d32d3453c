"""Command lines derived from config dataclasses: each option is declared once, as a dataclass field whose
metadata carries its help (and where needed its older flag names, a text parser, an exclusive group); its
type, choices and default come from the annotation and the default, in the spirit of
``transformers.HfArgumentParser`` (which would import transformers into ``--help``).

    @dataclass
    class JobConfig:
        model: str = model_field()                           # shared: dreamcache.runtime
        actors: int = option(1, "size of the actor pool")    # --actors, type int, default 1
        read_cpus: float = field(default=0.5, metadata=NOT_A_FLAG)

    add_config_arguments(parser, JobConfig)   # --model (required), --actors ...
    config = config_from_namespace(JobConfig, parser.parse_args())

Light on purpose: no torch, Ray or storage clients, so every parser builds in milliseconds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, Union

T = TypeVar("T")
_KEY = "cli"  # the field metadata key
NOT_A_FLAG = {_KEY: None}  # a field set by programs, not on the command line


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, with or without help text, except where there is none to show:
    None (the help says what absence means), a switch (off unless given), an empty value, a required option."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return super()._get_help_string(action) if _shows_default(action) else action.help or ""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shows_default(action):  # argparse prints nothing for an action without help
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def _shows_default(action: argparse.Action) -> bool:
    empty = action.default is None or action.default is False or action.default in ("", [], ())
    return bool(action.option_strings) and not action.required and not empty and action.default is not argparse.SUPPRESS


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with DefaultsFormatter; the parsers of its subcommands are of this class too.

    ``deferred``: adds this parser's options when it is first used (to parse, or for ``--help``), not when it is
    built: a subcommand whose options come from a heavy module (``dreamcache serve``'s from its pydantic settings)
    then costs nothing to the other commands and to ``dreamcache --help``, which only lists it."""

    def __init__(self, *args: Any, formatter_class: type[argparse.HelpFormatter] = DefaultsFormatter,
                 deferred: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
        self._deferred = deferred

    def _add_deferred(self) -> None:
        if self._deferred is not None:
            add, self._deferred = self._deferred, None
            add(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # a subcommand's parser too
        self._add_deferred()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._add_deferred()
        return super().format_usage()

    def format_help(self) -> str:
        self._add_deferred()
        return super().format_help()


def option(default: Any = dataclasses.MISSING, help: str | None = None, *, aliases: tuple[str, ...] = (),
           parse: Callable[[str], Any] | None = None, one_of: str | None = None) -> Any:
    """A dataclass field that is also the command-line option ``--field-name`` (its type, choices and default
    from the annotation and ``default``). ``aliases``: older names; ``parse``: turns the given text into the
    field's value, in config_from_namespace (not as argparse's ``type``, so that its InvalidValue is the
    command's one-line error, not a usage message); ``one_of``: fields with the same value form a required
    group of which exactly one is given."""
    spec = {"help": help, "aliases": aliases, "parse": parse, "one_of": one_of}
    return dataclasses.field(default=default, metadata={_KEY: spec})


def comma_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``: a list option given as one comma-separated text (e.g. --subjects)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def cli_fields(config_class: type) -> list[tuple[dataclasses.Field, dict[str, Any], Any]]:
    """The fields of ``config_class`` that are options: (field, its option spec, its resolved type)."""
    hints = typing.get_type_hints(config_class)
    return [(f, f.metadata.get(_KEY, {}), hints[f.name]) for f in dataclasses.fields(config_class)
            if f.metadata.get(_KEY, {}) is not None]


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One argparse option per option field of ``config_class``."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f, spec, hint in cli_fields(config_class):
        group = spec.get("one_of")
        if group and group not in groups:
            groups[group] = parser.add_mutually_exclusive_group(required=True)
        target: Any = groups[group] if group else parser
        target.add_argument(flag_of(f.name), *spec.get("aliases", ()), dest=f.name,
                            **_argparse_kwargs(f.default, spec, hint))


def add_model_arguments(parser: argparse.ArgumentParser, model_class: Any) -> None:
    """One option per field of the pydantic model ``model_class``: the same rules as add_config_arguments, the
    help from each field's ``description``. Duck-typed on ``model_fields``, so this module never imports
    pydantic. The values are checked by the model (model_values, then ``model_validate``), not by argparse."""
    for name, info in model_class.model_fields.items():
        default = dataclasses.MISSING if info.is_required() else info.get_default(call_default_factory=True)
        parser.add_argument(flag_of(name), dest=name, **_argparse_kwargs(default, {"help": info.description},
                                                                          info.annotation))


def model_values(model_class: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The values of ``model_class``'s fields parsed by the options of add_model_arguments."""
    return {name: getattr(args, name) for name in model_class.model_fields}


def config_from_namespace(config_class: type[T], args: argparse.Namespace, **values: Any) -> T:
    """``config_class`` from the parsed options; ``values`` set the fields the command line does not give
    (or gives in another form, which the caller converted)."""
    given = {}
    for f, spec, _ in cli_fields(config_class):
        if f.name not in values:
            value = getattr(args, f.name)
            given[f.name] = spec["parse"](value) if spec.get("parse") and isinstance(value, str) else value
    return config_class(**given, **values)


def _argparse_kwargs(default: Any, spec: dict[str, Any], hint: Any) -> dict[str, Any]:
    """``default``: dataclasses.MISSING for a required field."""
    base = _without_none(hint)
    if base is bool:  # a switch: off unless given
        return {"action": "store_true", "default": False, "help": spec.get("help")}
    kwargs: dict[str, Any] = {"help": spec.get("help")}
    if default is dataclasses.MISSING:
        kwargs["required"] = not spec.get("one_of")
    else:
        kwargs["default"] = default
    if typing.get_origin(base) is Literal:
        kwargs["choices"] = list(typing.get_args(base))
    elif spec.get("parse") is None:  # an option with ``parse`` stays text here
        if base is dict or typing.get_origin(base) is dict:
            kwargs["type"], kwargs["metavar"] = json.loads, "JSON"
        elif base in (int, float):
            kwargs["type"] = base
    return kwargs


def _without_none(hint: Any) -> Any:
    """``X | None`` -> ``X``; any other union (a field that also takes values from programs) -> its first member;
    ``Annotated[X, ...]`` (pydantic's constraints) -> ``X``."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        hint = [a for a in typing.get_args(hint) if a is not type(None)][0]
    while typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    return hint
