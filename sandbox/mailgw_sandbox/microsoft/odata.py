"""The OData query options Graph mail lists accept: ``$filter``, ``$orderby``, ``$top``, ``$skip``.

``$filter`` understands ``and``-joined comparisons on the properties a mail gateway filters on.
Exchange refuses a ``$filter`` + ``$orderby`` whose sort properties are not the filter's first
properties in the same order (``InefficientFilter``); so does the sandbox, so a query that only
works here is impossible.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .graph import GraphError, bad_request
from .mailstore import Message

_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
}
_TOKEN = re.compile(r"\s*(?:('(?:[^']|'')*')|([^\s]+))")


def _datetime(literal: str) -> datetime:
    moment = datetime.fromisoformat(literal)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _boolean(literal: str) -> bool:
    if literal not in ("true", "false"):
        raise ValueError(literal)
    return literal == "true"


def _string(literal: str) -> str:
    if len(literal) < 2 or literal[0] != "'" or literal[-1] != "'":
        raise ValueError(literal)
    return literal[1:-1].replace("''", "'")


@dataclass(frozen=True)
class _Property:
    name: str
    value: Callable[[Message], Any]
    parse: Callable[[str], Any]
    ordered: bool  # whether gt/ge/lt/le make sense


_FILTERABLE = {
    p.name.casefold(): p
    for p in (
        _Property("receivedDateTime", lambda m: m.received, _datetime, True),
        _Property("isRead", lambda m: m.is_read, _boolean, False),
        _Property("hasAttachments", lambda m: m.has_attachments, _boolean, False),
        _Property("internetMessageId", lambda m: m.summary.message_id, _string, False),
        _Property("flag/flagStatus", lambda m: m.flag, _string, False),
    )
}


@dataclass(frozen=True)
class Condition:
    property: _Property
    compare: Callable[[Any, Any], bool]
    value: Any

    def holds(self, message: Message) -> bool:
        actual = self.property.value(message)
        return actual is not None and self.compare(actual, self.value)


def parse_filter(text: str | None) -> list[Condition]:
    if text is None:
        return []
    tokens = [quoted or word for quoted, word in _TOKEN.findall(text)]
    conditions = []
    for start in range(0, len(tokens), 4):
        clause = tokens[start : start + 3]
        joiner = tokens[start + 3] if start + 3 < len(tokens) else None
        if len(clause) != 3 or (joiner is not None and joiner.lower() != "and"):
            raise _invalid_filter(text)
        name, op, literal = clause
        conditions.append(_condition(name, op, literal, text=text))
    if not conditions:
        raise _invalid_filter(text)
    return conditions


def _condition(name: str, op: str, literal: str, text: str) -> Condition:
    prop = _FILTERABLE.get(name.casefold())
    compare = _OPERATORS.get(op.lower())
    if prop is None or compare is None or (op.lower() not in ("eq", "ne") and not prop.ordered):
        raise _invalid_filter(text)
    try:
        value = prop.parse(literal)
    except ValueError:
        raise _invalid_filter(text) from None
    return Condition(prop, compare, value)


def _invalid_filter(text: str) -> GraphError:
    return bad_request(f"Invalid filter clause: {text}")


def parse_orderby(text: str | None) -> list[tuple[str, bool]]:
    """(property, descending) pairs; the sandbox sorts by receivedDateTime only."""
    if text is None:
        return []
    order = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, direction = item.partition(" ")
        direction = direction.strip().lower() or "asc"
        if name.casefold() != "receiveddatetime" or direction not in ("asc", "desc"):
            raise bad_request(f"Invalid $orderby: '{item}'; the sandbox sorts by receivedDateTime.")
        order.append(("receivedDateTime", direction == "desc"))
    return order


def check_efficiency(conditions: list[Condition], order: list[tuple[str, bool]]) -> None:
    """Exchange's rule: sort properties must lead the filter, in the same order."""
    if not conditions or not order:
        return
    leading = [c.property.name for c in conditions[: len(order)]]
    if leading != [name for name, _ in order]:
        raise bad_request(
            "The restriction or sort order is too complex for this operation.", "InefficientFilter"
        )


def parse_count(text: str | None, name: str, default: int, low: int, high: int) -> int:
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise bad_request(f"Invalid value '{text}' for query option '{name}'.")
    return int(text)
