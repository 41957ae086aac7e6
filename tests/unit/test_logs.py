"""Structured logs: one line per event, fields intact, registered secrets never printed."""

from __future__ import annotations

import io
import json
import logging

from gateway.config import Secret
from gateway.logs import configure_logging, get_logger, redact, register_secret


def test_text_lines_are_logfmt(captured_log: io.StringIO) -> None:
    configure_logging("info", "text", captured_log)
    get_logger("gateway.test").info("listener.started", name="smtp", port=2525, note="two words")
    (line,) = captured_log.getvalue().splitlines()
    assert "level=info logger=gateway.test event=listener.started" in line
    assert 'name=smtp port=2525 note="two words"' in line


def test_json_lines_parse_and_carry_fields(captured_log: io.StringIO) -> None:
    configure_logging("info", "json", captured_log)
    log = get_logger("gateway.test")
    log.info("one", count=1)
    log.debug("hidden")  # below the level
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        log.exception("failed", step="x")
    lines = captured_log.getvalue().splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[1])
    assert len(lines) == 2  # the multi-line traceback stays inside one JSON line
    assert first["event"] == "one" and first["count"] == 1
    assert (
        second["error"] == "RuntimeError: boom\nsecond line" and "Traceback" in second["traceback"]
    )


def test_registered_secrets_are_masked_everywhere(captured_log: io.StringIO) -> None:
    configure_logging("debug", "text", captured_log)
    register_secret("tok-ABCDEF123456")
    Secret("upstream-pw-987", "test")  # config secrets register themselves
    log = get_logger("gateway.test")
    log.info("token.refreshed", token="tok-ABCDEF123456")
    logging.getLogger("some.library").warning("Authorization: Bearer tok-ABCDEF123456")
    log.info("login", detail="password upstream-pw-987 sent")
    output = captured_log.getvalue()
    assert "tok-ABCDEF123456" not in output and "upstream-pw-987" not in output
    assert output.count("[redacted]") == 3


def test_short_values_are_not_treated_as_secrets() -> None:
    register_secret("abc")
    assert redact("abc def") == "abc def"


def test_chatty_libraries_are_held_at_warning(captured_log: io.StringIO) -> None:
    configure_logging("debug", "text", captured_log)
    logging.getLogger("mail.log").info("AUTH PLAIN dXNlcgB1c2VyAHBhc3M=")
    assert captured_log.getvalue() == ""
