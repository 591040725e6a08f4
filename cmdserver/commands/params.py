"""Typed command parameters: declared once, read from words or from named values.

A text door splits a command line into words and each parameter turns its
word into a value (:meth:`ParamType.from_text`); PB, and any door that passes
named values, hands the value itself (:meth:`ParamType.from_value`).  Both end
in the same check, so ``lastlog 0`` and ``call("lastlog", n=0)`` are refused
with the same one line.  :meth:`ParamType.schema` describes the type as JSON
Schema for clients that want to build their own forms or stubs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cmdserver.errors import CommandError, UsageError


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # the default of a parameter that must be given


class ParamType:
    """A parameter's type: how a word or a value becomes the handler's argument."""

    name = "text"
    takes_value = True  # a flag of this type is ``--name VALUE``; else ``--name`` alone

    def from_text(self, param: Param, word: str) -> Any:
        return self.check(param, word)

    def from_value(self, param: Param, value: Any) -> Any:
        if not isinstance(value, str):
            raise UsageError(f"{param.name} must be a string")
        return self.check(param, value)

    def check(self, param: Param, value: Any) -> Any:
        if "\0" in value:
            raise CommandError(f"{param.name}: NUL bytes are not allowed")
        return value

    def describe(self) -> str:
        """A few words for ``help``: ``1..1000``, ``sha256|md5``."""
        return ""

    def schema(self) -> dict[str, Any]:
        return {"type": "string"}


class Text(ParamType):
    """Any one word (no NUL): the command checks it further itself."""


_INT = re.compile(r"-?[0-9]+", re.ASCII)


class Int(ParamType):
    """A whole number, optionally between ``min`` and ``max`` (inclusive)."""

    name = "int"

    def __init__(self, min: int | None = None, max: int | None = None) -> None:
        self.min = min
        self.max = max

    def from_text(self, param: Param, word: str) -> Any:
        if not _INT.fullmatch(word):
            raise UsageError(f"not a number: {word}")
        return self.check(param, int(word, 10))

    def from_value(self, param: Param, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{param.name} must be an integer")
        return self.check(param, value)

    def check(self, param: Param, value: Any) -> Any:
        low = self.min if self.min is not None else value
        high = self.max if self.max is not None else value
        if not low <= value <= high:
            raise CommandError(f"{param.name} must be {self.describe()}, not {value}")
        return value

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{self.min}..{self.max}"
        if self.min is not None:
            return f"at least {self.min}"
        if self.max is not None:
            return f"at most {self.max}"
        return ""

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "integer"}
        if self.min is not None:
            schema["minimum"] = self.min
        if self.max is not None:
            schema["maximum"] = self.max
        return schema


class Choice(ParamType):
    """One of a fixed list of words."""

    name = "choice"

    def __init__(self, values: tuple[str, ...] | list[str]) -> None:
        if not values:
            raise ValueError("a choice needs at least one value")
        self.values = tuple(values)

    def check(self, param: Param, value: Any) -> Any:
        if value not in self.values:
            shown = str(value)[:64].translate({c: "?" for c in range(32)})
            raise CommandError(f"{param.name} must be one of {', '.join(self.values)}, "
                               f"not {shown!r}")
        return value

    def describe(self) -> str:
        return "|".join(self.values)

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "enum": list(self.values)}


SAFE_WORD = r"[A-Za-z0-9_][A-Za-z0-9_.,:=@%+/-]*"  # no spaces, quotes, globs or a leading -


class Word(ParamType):
    """A word that matches a regular expression in full (a safe default)."""

    name = "word"

    def __init__(self, pattern: str = SAFE_WORD) -> None:
        self.pattern = pattern
        self._regex = re.compile(pattern)

    def check(self, param: Param, value: Any) -> Any:
        value = super().check(param, value)
        if not self._regex.fullmatch(value):
            shown = value[:64].translate({c: "?" for c in range(32)})
            raise CommandError(f"{param.name}: {shown!r} is not an allowed value")
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "pattern": f"^(?:{self.pattern})$"}


class PathParam(ParamType):
    """A path inside the jail: checked here for form, resolved by the command (in a thread)."""

    name = "path"

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "format": "path"}


class Switch(ParamType):
    """On or off: a flag given as ``--name`` alone on the text doors (``--name=false``
    says off), true or false as a named value."""

    name = "bool"
    takes_value = False

    def from_text(self, param: Param, word: str) -> Any:
        value = {"true": True, "yes": True, "1": True,
                 "false": False, "no": False, "0": False}.get(word.lower())
        if value is None:
            raise UsageError(f"{param.name} is true or false, not {word[:64]!r}")
        return value

    def from_value(self, param: Param, value: Any) -> Any:
        if not isinstance(value, bool):
            raise UsageError(f"{param.name} must be true or false")
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean"}


TEXT = Text()
PATH = PathParam()
SWITCH = Switch()


@dataclass(frozen=True)
class Param:
    """One declared parameter of a command.

    ``flag`` parameters are given as ``--name VALUE`` (or ``--name=VALUE``) on
    the text doors, a :class:`Switch` as ``--name`` alone; the others are
    positional, in the order declared.
    ``missing`` is the whole line a text door prints when a required value is
    missing (``Please provide a path.``); without it, the usage is printed.
    ``dash`` lets a value start with ``-``, which could otherwise be taken for
    an option by the program a declared command runs.
    """

    name: str
    type: ParamType = TEXT
    default: Any = REQUIRED
    help: str = ""
    flag: bool = False
    metavar: str = ""
    missing: str = ""
    dash: bool = True

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def shown(self) -> str:
        """How the usage line names it: ``PATH``, ``[N]``, ``[--algo NAME]``."""
        word = self.metavar or self.name.upper()
        if self.flag:
            word = f"--{self.name} {word}" if self.type.takes_value else f"--{self.name}"
        return word if self.required else f"[{word}]"

    def from_text(self, word: str) -> Any:
        self._check_dash(word)
        return self.type.from_text(self, word)

    def from_value(self, value: Any) -> Any:
        if value is None and self.default is None:
            return None
        if isinstance(value, str):
            self._check_dash(value)
        return self.type.from_value(self, value)

    def _check_dash(self, value: str) -> None:
        if not self.dash and value.startswith("-"):
            raise CommandError(f"{self.name}: a value may not start with '-'")

    def describe(self) -> dict[str, Any]:
        """The parameter as data: what ``help`` and API descriptions show."""
        info: dict[str, Any] = {"name": self.name, "type": self.type.name,
                                "required": self.required, "help": self.help}
        if not self.required:
            info["default"] = self.default
        if self.flag:
            info["flag"] = True
        detail = self.type.describe()
        if detail:
            info["values"] = detail
        info["schema"] = self.type.schema()
        return info
