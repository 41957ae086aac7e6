"""What a user's Google grant stores: the refresh token and the newest access token.

Every instance sharing the store reads this material, so the access token one instance obtained
is used by the others while it lasts; material stored by earlier versions (the bare refresh
token) must keep working.
"""

from __future__ import annotations

import pytest

from gateway.oauth import ReauthRequired
from gateway.oauth._google import grant_material, parse_material
from gateway.oauth._tokens import AccessToken


def test_the_refresh_token_and_the_access_token_come_back_as_stored() -> None:
    access = AccessToken("ya29.access", expires_at=2_000_003_599.0, issued_at=2_000_000_000.0)
    refresh_token, stored = parse_material(grant_material("1//0refresh", access))
    assert refresh_token == "1//0refresh"
    assert stored == access


def test_a_bare_refresh_token_from_an_earlier_version_is_read_without_an_access_token() -> None:
    assert parse_material(b"1//0refresh") == ("1//0refresh", None)


def test_material_without_an_access_token_has_only_the_refresh_token() -> None:
    assert parse_material(grant_material("1//0refresh", None)) == ("1//0refresh", None)


@pytest.mark.parametrize(
    "material",
    [b"{not json", b'{"access_token": "ya29.x"}', b'{"refresh_token": "r", "access_token": "a"}'],
)
def test_unreadable_material_asks_for_a_new_connection(material: bytes) -> None:
    with pytest.raises(ReauthRequired, match="stored Google sign-in is not readable"):
        parse_material(material)
