"""``GET /mailFolders/{folder}/messages/delta``: pages of changes, then a deltaLink.

The tokens carry the whole sync state (folder, the change-number range of this round and how
far the pages got), like Graph's opaque tokens: no server memory, and a token from another
folder is refused. Pages advance by change number rather than by offset, so a message changing
while a client pages through a round is neither skipped nor repeated: it moves to the next round.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from .graph import Call, GraphError, bad_request
from .mailstore import Folder, Message
from .odata import parse_count
from .signing import b64url, b64url_decode
from .views import message_json, parse_select

DEFAULT_PAGE_SIZE = 10
_FIRST_REQUEST_OPTIONS = {"$select", "$top"}


@dataclass(frozen=True)
class SyncState:
    folder: str
    since: int  # changes after this number belong to the round (0: a first, full sync)
    until: int  # ... up to this one
    cursor: int  # the last change number already paged out
    select: tuple[str, ...] | None
    top: int | None  # page size asked with $top (Prefer: odata.maxpagesize wins)

    def encode(self) -> str:
        return b64url(json.dumps(asdict(self), separators=(",", ":")).encode())

    @classmethod
    def decode(cls, token: str, folder: Folder) -> SyncState:
        try:
            data: Any = json.loads(b64url_decode(token))
            state = cls(
                str(data["folder"]),
                int(data["since"]),
                int(data["until"]),
                int(data["cursor"]),
                tuple(data["select"]) if data["select"] is not None else None,
                int(data["top"]) if data["top"] is not None else None,
            )
        except (ValueError, KeyError, TypeError):
            state = None
        if state is None or state.folder != folder.id:
            raise GraphError(
                410, "SyncStateNotFound", "The sync state could not be found; start a new sync."
            )
        return state


def delta(call: Call) -> web.Response:
    folder = call.folder()
    state = _state(call, folder)
    size = call.prefer.max_page_size or state.top or DEFAULT_PAGE_SIZE
    changes = call.mailbox.changes(folder, state.cursor, state.until, removals=state.since > 0)
    page = changes[:size]
    link = f"{call.base}/mailFolders/{quote(folder.id, safe='')}/messages/delta?"
    body: dict[str, Any] = {
        "@odata.context": f"{call.origin}/v1.0/$metadata#Collection(message)",
        "value": [_item(call, item, state.select) for item in page],
    }
    if len(changes) > size:
        cursor = dataclasses.replace(state, cursor=page[-1].seq)
        body["@odata.nextLink"] = link + urlencode({"$skiptoken": cursor.encode()})
    else:
        done = dataclasses.replace(state, since=state.until, cursor=state.until)
        body["@odata.deltaLink"] = link + urlencode({"$deltatoken": done.encode()})
    return call.respond(body, page_size=True)


def _state(call: Call, folder: Folder) -> SyncState:
    query = call.request.query
    if "$skiptoken" in query:
        return SyncState.decode(query["$skiptoken"], folder)
    if "$deltatoken" in query:
        previous = SyncState.decode(query["$deltatoken"], folder)
        return dataclasses.replace(previous, until=call.mailbox.seq)  # a new round, up to now
    unsupported = [
        name for name in query if name.startswith("$") and name not in _FIRST_REQUEST_OPTIONS
    ]
    if unsupported:
        raise bad_request(f"The query parameter '{unsupported[0]}' is not supported with delta.")
    select = parse_select(query.get("$select"))
    top = parse_count(query["$top"], "$top", 0, 1, 1000) if "$top" in query else None
    return SyncState(folder.id, 0, call.mailbox.seq, 0, select, top)


def _item(call: Call, item: Any, select: tuple[str, ...] | None) -> dict[str, Any]:
    if isinstance(item, Message):
        return {"@odata.type": "#microsoft.graph.message", **message_json(call, item, select)}
    return {
        "@odata.type": "#microsoft.graph.message",
        "id": item.id(call.prefer.immutable_ids),
        "@removed": {"reason": "deleted"},
    }
