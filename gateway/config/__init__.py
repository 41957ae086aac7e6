"""Configuration: one YAML file in, validated and typed :class:`Settings` out.

``load_settings`` either returns settings that every later layer can trust, or raises
:class:`ConfigError` listing every problem with its file, line, key path and fix.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from ._checks import CHECKS
from ._checks import notes as config_notes
from ._schema import Problem, Secret, SecretUnavailable, Validator
from ._settings import (
    AccountReadingSettings,
    AccountSettings,
    AdminSettings,
    GoogleSettings,
    ListenerSettings,
    LoggingSettings,
    MicrosoftSettings,
    OnDelete,
    ReadingSettings,
    SendingSettings,
    Settings,
    SmtpSettings,
    SpoolSettings,
    StoreSettings,
    TlsSettings,
    UpstreamServer,
    UpstreamSettings,
    UpstreamSmtpServer,
)
from ._yaml import YamlSyntaxError, load_with_lines

__all__ = [
    "STATE_DIR_VARIABLE",
    "AccountReadingSettings",
    "AccountSettings",
    "AdminSettings",
    "ConfigError",
    "GoogleSettings",
    "ListenerSettings",
    "LoggingSettings",
    "MicrosoftSettings",
    "OnDelete",
    "Problem",
    "ReadingSettings",
    "Secret",
    "SecretUnavailable",
    "SendingSettings",
    "Settings",
    "SmtpSettings",
    "SpoolSettings",
    "StoreSettings",
    "TlsSettings",
    "UpstreamServer",
    "UpstreamSettings",
    "UpstreamSmtpServer",
    "config_notes",
    "load_settings",
]


class ConfigError(Exception):
    """The config file cannot be used; ``str()`` is the full report for the admin."""

    def __init__(self, file: Path, problems: list[Problem]) -> None:
        self.file = file
        self.problems = problems
        super().__init__(self.report())

    def report(self) -> str:
        count = len(self.problems)
        lines = [f"{self.file}: {count} problem{'s' if count != 1 else ''}"]
        for problem in sorted(self.problems, key=lambda p: p.line or 0):
            where = f"{self.file}:{problem.line}" if problem.line else str(self.file)
            lines.append(f"{where}: {problem.key}: {problem.message}")
            if problem.fix:
                lines.append(f"    fix: {problem.fix}")
        return "\n".join(lines)


STATE_DIR_VARIABLE = "GATEWAY_STATE_DIR"
"""When set, the state directory, whatever the file says (the Docker image sets it)."""


def load_settings(
    path: Path, environ: Mapping[str, str] | None = None, *, serving: bool = True
) -> Settings:
    """Read, parse and validate ``path``; raise :class:`ConfigError` with every problem.

    ``serving=False`` is for the operations commands (``queue``, ``accounts``, ``health``), which
    read the state directory but log nobody in and reach no upstream server: an ``{env: ...}``
    secret whose variable is unset is loaded unresolved (reading it raises
    :class:`SecretUnavailable`), and a published example password hash is not refused.
    """
    path = Path(path)
    environ = os.environ if environ is None else environ
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        fix = "check the path given with -c, or copy config.example.yaml there"
        raise ConfigError(path, [Problem((), f"cannot read file: {error.strerror}", fix)]) from None
    except UnicodeDecodeError:
        problem = Problem((), "file is not UTF-8 text", "save it as UTF-8")
        raise ConfigError(path, [problem]) from None
    try:
        raw, lines = load_with_lines(text)
    except YamlSyntaxError as error:
        problem = Problem((), f"YAML syntax error: {error}", "fix the YAML syntax", error.line)
        raise ConfigError(path, [problem]) from None
    state_dir = environ.get(STATE_DIR_VARIABLE)
    if state_dir and isinstance(raw, dict):
        raw = {**raw, "state_dir": state_dir}
    validator = Validator(path.resolve().parent, environ, lines, serving=serving)
    settings = validator.build(Settings, raw, ())
    if settings is not None:
        for check in CHECKS:
            check(settings, validator)
    if validator.problems or settings is None:
        problems = validator.problems
        if state_dir:
            problems = [_from_state_dir_variable(problem) for problem in problems]
        raise ConfigError(path, problems)
    return dataclasses.replace(settings, source=path.resolve())


def _from_state_dir_variable(problem: Problem) -> Problem:
    """A state_dir problem names the variable that set it: the file's value was not used."""
    if problem.path[:1] != ("state_dir",):
        return problem
    return dataclasses.replace(
        problem,
        message=f"{problem.message} (from {STATE_DIR_VARIABLE}, which overrides the file)",
        fix=f"fix or unset {STATE_DIR_VARIABLE}",
        line=None,
    )
