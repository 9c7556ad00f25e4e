"""Method options, generated from the method config dataclasses' field metadata.

Every field of a registered ``MethodConfig`` whose metadata names ``flags`` becomes one option (a flag
shared by several methods, e.g. ``--percdamp``, is one option); see ``d2prune.methods.base`` for the
metadata keys. Options default to None, so a method only receives the values the user gave and its
own dataclass defaults apply otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from d2prune.cli.options import argument_group
from d2prune.config import PruneConfig
from d2prune.errors import UserError
from d2prune.methods import METHODS, MethodConfig, method_config


@dataclass(frozen=True)
class MethodOption:
    """One generated option: its flags, its argparse dest, its metadata and the methods that have it."""

    flags: tuple[str, ...]
    dest: str
    metadata: dict[str, Any]
    methods: tuple[str, ...]

    @property
    def flag(self) -> str:
        return self.flags[0]


def default_method() -> str:
    """``--method``'s default: the API's (``PruneConfig.method``)."""
    return next(f.default for f in dataclasses.fields(PruneConfig) if f.name == "method")


def _ordered_methods() -> list[str]:
    # The default method first, so its options lead its help section (they are the main ones).
    first = default_method()
    return [first] + [name for name in METHODS if name != first] if first in METHODS else list(METHODS)


def _option_fields(cls: type[MethodConfig]) -> Iterator[dataclasses.Field]:
    return (f for f in dataclasses.fields(cls) if f.metadata.get("flags"))


def method_options() -> list[MethodOption]:
    """One option per distinct flag over the registered methods, in the order they first appear."""
    metadata: dict[str, dict[str, Any]] = {}
    owners: dict[str, list[str]] = {}
    for name in _ordered_methods():
        cls = METHODS[name]
        fields = list(_option_fields(cls))
        hints = typing.get_type_hints(cls) if fields else {}  # only where needed: annotations may not resolve
        for f in fields:
            flag = f.metadata["flags"][0]
            metadata.setdefault(
                flag, {**f.metadata, "_type": hints[f.name], "_default": f.metadata.get("cli_default", f.default)}
            )
            owners.setdefault(flag, []).append(name)
    return [
        MethodOption(tuple(md["flags"]), _dest(md["flags"]), md, tuple(n for n in METHODS if n in owners[flag]))
        for flag, md in metadata.items()
    ]


def _dest(flags: tuple[str, ...]) -> str:
    # argparse's own choice (the first long flag, dashes as underscores), spelled out because the
    # values are looked up by it.
    return next(f for f in flags if f.startswith("--")).lstrip("-").replace("-", "_")


def add_method_choice(parser: argparse.ArgumentParser) -> None:
    """``--method``, listing the registered methods."""
    parser.add_argument("--method", "--prune_method", default=default_method(), help=" | ".join(_ordered_methods()))


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """Every method option, each in its help section."""
    for opt in method_options():
        md = opt.metadata
        group = argument_group(parser, md["group"]) if md.get("group") else parser
        kwargs: dict[str, Any] = {"dest": opt.dest, "default": None, "help": md["help"]}
        if md["_type"] is bool:
            # A switch that is on by default needs its --no- form to be turned off.
            kwargs["action"] = argparse.BooleanOptionalAction if md["_default"] is True else "store_true"
        else:
            if md["_type"] in (int, float):
                kwargs["type"] = md["_type"]
            if md.get("nargs"):
                kwargs["nargs"] = md["nargs"]
            if md.get("metavar"):
                kwargs["metavar"] = md["metavar"]
        group.add_argument(*opt.flags, **kwargs)


def heldout_options() -> list[MethodOption]:
    """The options one of whose values asks for a choice on held-out data (``--target-layers auto``, ...)."""
    return [opt for opt in method_options() if opt.metadata.get("heldout")]


def _given(args: argparse.Namespace, md: dict[str, Any]) -> Any:
    """The field value the user gave through the option of ``md``, or None."""
    value = getattr(args, _dest(md["flags"]), None)
    if value is not None and md.get("parse"):
        value = md["parse"](value)
    return value


def _build(key: str, given: dict[str, Any]) -> MethodConfig:
    """The config of method ``key`` from the given option values (by canonical flag)."""
    kwargs: dict[str, Any] = {}
    for f in _option_fields(METHODS[key]):
        md = f.metadata
        if md.get("text_source"):
            continue  # token ids, read once the tokenizer is loaded (``text_sources``)
        value = given[md["flags"][0]]
        if md.get("method_name"):  # another method, built from the same options
            chosen = value if value is not None else md.get("cli_default", f.default)
            other = str(chosen).strip().lower()
            if other not in METHODS:
                raise UserError(f"unknown {md['flags'][0]} {chosen!r}: choose one of {', '.join(sorted(METHODS))}")
            kwargs[f.name] = other if other == key else _build(other, given)  # itself: the config says why not
            continue
        if value is None and "cli_default" in md:
            value = md["cli_default"]
        if value is not None:
            kwargs[f.name] = value
    return method_config(key, **kwargs)


def _configs(config: MethodConfig) -> Iterator[MethodConfig]:
    """``config`` and the method configs it holds (``method_name`` fields)."""
    yield config
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("method_name") and isinstance(value, MethodConfig):
            yield from _configs(value)


def _has_option(config: MethodConfig, flag: str) -> bool:
    return any(f.metadata["flags"][0] == flag for f in _option_fields(type(config)))


def method_config_from_args(args: argparse.Namespace) -> MethodConfig:
    """The method config of ``--method`` with the method options the user gave."""
    name = str(args.method).strip().lower()
    if name not in METHODS:
        raise UserError(f"unknown method {args.method!r}: choose one of {', '.join(sorted(METHODS))}")
    # Every given value is parsed, also those the method has no use for: a malformed one is a mistake.
    options = method_options()
    config = _build(name, {opt.flag: _given(args, opt.metadata) for opt in options})
    for opt in options:
        only_for = opt.metadata.get("only_for")
        if only_for and getattr(args, opt.dest) is not None:
            if not any(_has_option(c, opt.flag) for c in _configs(config)):
                raise UserError(f"{opt.flag} applies to {only_for}, not to {name}")
    return config


def _heldout_requests(args: argparse.Namespace) -> list[MethodOption]:
    return [opt for opt in heldout_options() if _given(args, opt.metadata) == opt.metadata["heldout"]["value"]]


def heldout_request(args: argparse.Namespace) -> str | None:
    """The options and values that ask for a held-out choice (e.g. ``--target-layers auto``), if given."""
    asked = [f"{opt.flag} {opt.metadata['heldout']['value']}" for opt in _heldout_requests(args)]
    return " ".join(asked) or None


def check_heldout_request(args: argparse.Namespace, method: MethodConfig) -> None:
    """A held-out choice asked of a method without that option is a mistake."""
    for opt in _heldout_requests(args):
        if not _has_option(method, opt.flag):
            raise UserError(
                f"{opt.flag} {opt.metadata['heldout']['value']} applies to {opt.metadata['heldout']['for']} "
                f"({', '.join(opt.methods)}), not to {method.name}"
            )


def text_sources(args: argparse.Namespace, method: MethodConfig) -> list[tuple[str, str, str]]:
    """(field, what for, source) of each text source the user gave for ``method`` (e.g. --gradient-source)."""
    return [
        (f.name, f.metadata["text_source"], source)
        for f in _option_fields(type(method))
        if f.metadata.get("text_source") and (source := getattr(args, _dest(f.metadata["flags"]), None))
    ]
