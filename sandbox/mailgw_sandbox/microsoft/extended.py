"""Single-value extended properties of messages as Graph takes them, and the one acted on.

Graph reaches MAPI properties it does not expose through ``singleValueExtendedProperties``, each
``{"id": ..., "value": <string>}`` ("Create single-value extended property", Graph v1.0
reference: in a new message with POST, in an existing one with PATCH). An id takes one of three
forms ("Outlook extended properties overview"):

* ``"{type} {guid} Name {name}"`` and ``"{type} {guid} Id {id}"``: named (custom) properties;
* ``"{type} {proptag}"``: a property predefined by MAPI, by its tag, with an identifier in
  0x0001-0x7FFF ("Do not try to define a custom property using the proptag format").

The sandbox stores every well-formed property and refuses malformed ids, proptags in the named
range and Boolean values other than true/false. The one it acts on is PidTagDeleteAfterSubmit
(0x0E01, PtypBoolean: "Indicates that the original message is to be deleted after it is sent",
MS-OXPROPS 2.669, defined in MS-OXOMSG 2.2.3.8): a draft sent with it set is deleted instead of
being moved to Sent Items.
"""

from __future__ import annotations

import re
from typing import Any

from .graph import bad_request

# The single-value types of Graph's extended properties (the MAPI Ptyp* types it maps).
_TYPES = {
    "binary",
    "boolean",
    "clsid",
    "currency",
    "double",
    "float",
    "integer",
    "long",
    "short",
    "string",
    "systemtime",
}
_GUID = r"\{[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\}"
_PROPTAG = re.compile(r"^(\w+) 0x([0-9A-Fa-f]{4})([0-9A-Fa-f]{4})?$")
_NAMED = re.compile(rf"^(\w+) ({_GUID}) (Name \S.*|Id 0x[0-9A-Fa-f]{{1,4}})$")
DELETE_AFTER_SUBMIT = "boolean 0x0e01"  # normalized id of PidTagDeleteAfterSubmit


def parse_properties(value: Any) -> dict[str, str]:
    """``singleValueExtendedProperties`` of a request, by normalized id; 400 when malformed."""
    if not isinstance(value, list):
        raise bad_request("Property 'singleValueExtendedProperties' must be an array.")
    found: dict[str, str] = {}
    for item in value:
        ident = item.get("id") if isinstance(item, dict) else None
        text = item.get("value") if isinstance(item, dict) else None
        if not isinstance(ident, str) or not isinstance(text, str):
            raise bad_request(
                "Each extended property needs a string 'id' and a string 'value'.",
                "ErrorInvalidExtendedProperty",
            )
        key, kind = _normalize(ident)
        if kind == "boolean" and text.lower() not in ("true", "false"):
            raise bad_request(
                f"The value '{text}' is not valid for the Boolean property '{ident}'.",
                "ErrorInvalidExtendedPropertyValue",
            )
        found[key] = text.lower() if kind == "boolean" else text
    return found


def _normalize(ident: str) -> tuple[str, str]:
    """(normalized id, type) of a well-formed id: proptags by their 4-digit identifier."""
    tag = _PROPTAG.match(ident)
    named = _NAMED.match(ident)
    found = tag or named
    kind = found.group(1).lower() if found else ""
    if kind not in _TYPES:
        raise bad_request(
            f"The extended property id '{ident}' is not valid.", "ErrorInvalidExtendedProperty"
        )
    if named:
        return f"{kind} {named.group(2).lower()} {named.group(3)}", kind
    assert tag is not None
    number = int(tag.group(2), 16)
    if not 0x0001 <= number <= 0x7FFF:
        raise bad_request(
            f"The proptag format is for MAPI's predefined properties (0x0001-0x7FFF), not "
            f"'{ident}'; name a custom property with a GUID.",
            "ErrorInvalidExtendedProperty",
        )
    return f"{kind} 0x{number:04x}", kind


def deletes_after_submit(properties: dict[str, str]) -> bool:
    return properties.get(DELETE_AFTER_SUBMIT) == "true"
