"""A subset of Gmail's search syntax (``q``): the operators the gateway uses, AND-ed, with ``-``.

``rfc822msgid:`` is the one that matters: before retrying a send after a crash the gateway looks
for its Message-ID in Sent mail. Unknown ``word:value`` terms are searched as plain text.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .mailstore import StoredMessage

_IN = {
    "inbox": "INBOX",
    "sent": "SENT",
    "trash": "TRASH",
    "spam": "SPAM",
    "draft": "DRAFT",
    "drafts": "DRAFT",
    "starred": "STARRED",
    "important": "IMPORTANT",
}
_IS = {"unread": "UNREAD", "starred": "STARRED", "important": "IMPORTANT"}
_TERM = re.compile(r"^(?P<key>[a-z0-9]+):(?P<value>.+)$", re.IGNORECASE)

Predicate = Callable[["StoredMessage"], bool]


@dataclass(frozen=True)
class Query:
    predicates: tuple[tuple[bool, Predicate], ...]  # (negated, test)
    reaches_spam_trash: bool  # in:trash, in:spam or in:anywhere lift the default exclusion

    def matches(self, message: StoredMessage) -> bool:
        return all(test(message) != negated for negated, test in self.predicates)


def parse(q: str) -> Query:
    try:
        words = shlex.split(q)
    except ValueError:  # an unbalanced quote: Gmail searches the words anyway
        words = q.split()
    predicates: list[tuple[bool, Predicate]] = []
    reaches = False
    for word in words:
        negated = word.startswith("-") and len(word) > 1
        term = word[1:] if negated else word
        match = _TERM.match(term)
        key, value = (match["key"].lower(), match["value"]) if match else ("", term)
        if key == "in" and value.lower() in ("trash", "spam", "anywhere") and not negated:
            reaches = True
        predicates.append((negated, _predicate(key, value)))
    return Query(tuple(predicates), reaches)


def _predicate(key: str, value: str) -> Predicate:
    lowered = value.lower()
    if key == "rfc822msgid":
        wanted = lowered.strip("<>")
        return lambda m: (m.message_id or "").lower().strip("<>") == wanted
    if key == "in" and lowered == "anywhere":
        return lambda m: True
    if key in ("in", "label") and (key == "label" or lowered in _IN):
        label = _IN.get(lowered, value.upper())  # the sandbox has system labels only
        return lambda m: label in m.labels
    if key == "is" and lowered == "read":
        return lambda m: "UNREAD" not in m.labels
    if key == "is" and lowered in _IS:
        return lambda m: _IS[lowered] in m.labels
    if key in ("from", "to", "cc", "bcc", "subject"):
        return lambda m: lowered in m.header_text(key).lower()
    text = f"{key}:{value}" if key else value
    return lambda m: text.lower().encode() in m.raw.lower()
