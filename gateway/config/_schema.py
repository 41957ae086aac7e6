"""Turn parsed YAML into typed, frozen settings, collecting *every* problem on the way.

The settings classes are plain dataclasses; their type hints are the schema. A field may carry
``metadata={"fix": ..., "check": fn}``: ``fix`` tells the user how to correct a bad value and
``check`` returns a sentence when a well-typed value is still wrong. Nothing stops at the first
error: an admin fixing a file wants the whole list at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..logs import register_secret
from ._yaml import KeyPath


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the config, located and with a way out."""

    path: KeyPath
    message: str
    fix: str = ""
    line: int | None = None

    @property
    def key(self) -> str:
        text = ""
        for part in self.path:
            text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
        return text or "(top level)"


class SecretUnavailable(LookupError):
    """A secret was read that was loaded unresolved (``load_settings(..., serving=False)``)."""


class Secret:
    """A secret string from the file or from an environment variable; never shown in a repr.

    A secret read from an unset environment variable exists only in settings loaded for the
    operations commands (queue, accounts, health), which never use it: reading its ``value``
    raises :class:`SecretUnavailable` naming the variable.
    """

    __slots__ = ("_value", "source")

    def __init__(self, value: str | None, source: str) -> None:
        self._value = value
        self.source = source
        if value is not None:
            register_secret(value)  # so it is masked should any log line ever contain it

    @property
    def value(self) -> str:
        if self._value is None:
            raise SecretUnavailable(f"{self.source} is not set or empty")
        return self._value

    def __repr__(self) -> str:
        return f"Secret(from {self.source})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return False
        if self._value is None or other._value is None:  # unresolved: the same variable
            return self._value == other._value and self.source == other.source
        return self._value == other._value

    def __hash__(self) -> int:
        return hash(self._value)


Check = Callable[[Any], str | None]
ENV_VALUE_HINT = "write the value, or {env: VARIABLE} to read it from an environment variable"


def field_info(default: Any = dataclasses.MISSING, *, fix: str = "", check: Check | None = None):
    """A dataclass field with a fix hint and an optional value check."""
    metadata = {"fix": fix, "check": check}
    if isinstance(default, list | dict) or dataclasses.is_dataclass(default):
        frozen = default
        return field(default_factory=lambda: frozen, metadata=metadata)
    return field(default=default, metadata=metadata)


class Validator:
    """Walks raw YAML data against a dataclass schema, building values and problems."""

    def __init__(
        self,
        base_dir: Path,
        environ: Mapping[str, str],
        lines: dict[KeyPath, int],
        *,
        serving: bool = True,
    ) -> None:
        self.base_dir = base_dir
        self.environ = environ
        self.lines = lines
        # False for the operations commands: unset {env: ...} secrets are loaded unresolved and
        # the checks that only matter to a serving gateway (published example hashes) are off.
        self.serving = serving
        self.problems: list[Problem] = []

    def report(self, path: KeyPath, message: str, fix: str = "") -> None:
        self.problems.append(Problem(path, message, fix, self.line_of(path)))

    def line_of(self, path: KeyPath) -> int | None:
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return None

    def build(self, cls: type, raw: Any, path: KeyPath) -> Any:
        """Build dataclass ``cls`` from a mapping; None only if ``raw`` is not a mapping."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.report(path, f"expected a section of keys, got {_describe(raw)}")
            return None
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        for key in raw:
            if key not in fields:
                self.report((*path, str(key)), f"unknown key {key!r}", _suggest(str(key), fields))
        values: dict[str, Any] = {}
        for name, spec in fields.items():
            if name in raw:
                values[name] = self._field(hints[name], spec, raw[name], (*path, name))
            elif _is_required(spec):
                self.report((*path, name), "missing required value", spec.metadata.get("fix", ""))
                values[name] = None
        # Built even when some values were wrong (they are None then), so that the checks across
        # keys can still run and the admin sees every problem at once. The caller discards the
        # result if any problem was reported.
        return cls(**values)

    def _field(self, hint: Any, spec: dataclasses.Field, raw: Any, path: KeyPath) -> Any:
        fix = spec.metadata.get("fix", "")
        value, ok = self.convert(hint, raw, path, fix)
        check = spec.metadata.get("check")
        if ok and value is not None and check is not None:
            message = check(value)
            if message:
                self.report(path, message, fix)
                return None
        return value if ok else None

    def convert(self, hint: Any, raw: Any, path: KeyPath, fix: str) -> tuple[Any, bool]:
        """Convert one value to ``hint``; returns (value, ok) and reports on failure."""
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (types.UnionType, typing.Union):
            if raw is None and type(None) in args:
                return None, True
            (inner,) = [a for a in args if a is not type(None)]
            return self.convert(inner, raw, path, fix)
        if origin is Literal:
            if raw in args:
                return raw, True
            choices = ", ".join(str(a) for a in args)
            return self._wrong(path, f"must be one of {choices}, got {_describe(raw)}", fix)
        if origin is tuple:
            return self._convert_list(args[0], raw, path, fix)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a hint is a class
            value = self.build(hint, raw, path)
            return value, value is not None
        converter = _SCALARS.get(hint)
        if converter is None:
            raise TypeError(f"unsupported settings type {hint!r} at {path}")
        return converter(self, raw, path, fix)

    def _convert_list(self, item: Any, raw: Any, path: KeyPath, fix: str) -> tuple[Any, bool]:
        if raw is None:
            return (), True
        if not isinstance(raw, list):
            return self._wrong(path, f"expected a list, got {_describe(raw)}", fix)
        converted = [self.convert(item, entry, (*path, i), fix) for i, entry in enumerate(raw)]
        return tuple(value for value, _ in converted), all(ok for _, ok in converted)

    def _wrong(self, path: KeyPath, message: str, fix: str) -> tuple[None, bool]:
        self.report(path, message, fix)
        return None, False

    def _str(self, raw: Any, path: KeyPath, fix: str) -> tuple[Any, bool]:
        if isinstance(raw, str) and raw.strip():
            return raw.strip(), True
        if isinstance(raw, str):
            return self._wrong(path, "must not be empty", fix)
        return self._wrong(path, f"expected text, got {_describe(raw)}", fix)

    def _int(self, raw: Any, path: KeyPath, fix: str) -> tuple[Any, bool]:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw, True
        return self._wrong(path, f"expected a whole number, got {_describe(raw)}", fix)

    def _bool(self, raw: Any, path: KeyPath, fix: str) -> tuple[Any, bool]:
        if isinstance(raw, bool):
            return raw, True
        return self._wrong(path, f"expected true or false, got {_describe(raw)}", fix)

    def _path(self, raw: Any, path: KeyPath, fix: str) -> tuple[Any, bool]:
        text, ok = self._str(raw, path, fix)
        if not ok:
            return None, False
        return (self.base_dir / Path(text).expanduser()).resolve(), True

    def _secret(self, raw: Any, path: KeyPath, fix: str) -> tuple[Any, bool]:
        if isinstance(raw, str) and raw:
            return Secret(raw, f"config key {Problem(path, '').key}"), True
        if isinstance(raw, dict) and set(raw) == {"env"} and isinstance(raw["env"], str):
            name = raw["env"]
            if not self.environ.get(name):
                if not self.serving:
                    return Secret(None, f"environment variable {name}"), True
                message = f"environment variable {name} is not set or empty"
                return self._wrong(path, message, f"export {name}=... before starting the gateway")
            return Secret(self.environ[name], f"environment variable {name}"), True
        return self._wrong(path, f"expected a secret, got {_describe(raw)}", ENV_VALUE_HINT)


_SCALARS: dict[Any, Callable[..., tuple[Any, bool]]] = {
    str: Validator._str,
    int: Validator._int,
    bool: Validator._bool,
    Path: Validator._path,
    Secret: Validator._secret,
}


def _is_required(spec: dataclasses.Field) -> bool:
    return spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING


def _describe(raw: Any) -> str:
    if raw is None:
        return "nothing (null)"
    if isinstance(raw, bool):
        return f"the boolean {str(raw).lower()}"
    if isinstance(raw, dict):
        return "a section of keys"
    if isinstance(raw, list):
        return "a list"
    return repr(raw)


def _suggest(key: str, fields: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return "remove it; valid keys here are: " + ", ".join(fields)
