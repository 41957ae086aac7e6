"""Gmail API sender: the ``/upload/`` endpoint, in one request or resumable for large mail.

Gmail sends to the To/Cc/Bcc headers (see ``_mime`` for how they are made to match the
envelope) and silently rewrites a From that is not the account's address or a verified send-as
alias, still answering 200. So the From is checked against ``settings/sendAs`` first (that
needs gmail.readonly or settings.basic), and a message Gmail would rewrite is refused with the
reason instead of going out under another name; when the list cannot be read (no consent for
it), the message is held for re-consent, never refused for a missing permission.
"""

from __future__ import annotations

import time

import httpx

from ..config import AccountSettings
from ..delivery import DeliveryResult, Envelope, Permanent, ReauthRequired, Temporary
from ._base import TokenSource
from ._http import Api, error_code
from ._mime import Message, Prepared, prepare

MEDIA_LIMIT = 5 * 1024 * 1024  # uploadType=media is reported to stop around 5 MB
PIECE = 8 * 1024 * 1024  # resumable chunks must be multiples of 256 KiB
SEND_AS_TTL = 600.0  # seconds a send-as list is trusted


class GmailSender:
    reads_mapped_files = True  # the spool may pass its file mapped (see ``_mime.Message``)

    def concurrency(self, account: AccountSettings) -> int:
        """Google documents no per-user concurrency number, only a per-user rate ("Usage
        limits", developers.google.com/gmail/api/reference/quota: 15,000 quota units per user
        per minute, messages.send 100 units = 2.5 sends/s), which 4 at once already reaches."""
        return 4

    def __init__(self, client: httpx.AsyncClient, tokens: TokenSource, gmail_url: str) -> None:
        self.client = client
        self.tokens = tokens
        self.gmail_url = gmail_url.rstrip("/")
        self._send_as: dict[str, tuple[float, frozenset[str]]] = {}

    async def send(
        self, account: AccountSettings, envelope: Envelope, message: Message
    ) -> DeliveryResult:
        prepared = prepare(message, envelope)
        api = Api(self.client, self.tokens, account.username)
        await self._check_from(api, account, prepared.from_address)
        url = f"{self.gmail_url}/upload/gmail/v1/users/me/messages/send"
        if prepared.size <= MEDIA_LIMIT:
            body = prepared.body()  # read from the spool file as it is sent
            response = await api.call(
                "POST",
                url,
                "Gmail send",
                params={"uploadType": "media"},
                content=body,
                headers={"Content-Type": "message/rfc822", "Content-Length": str(len(body))},
            )
        else:
            response = await self._resumable(api, url, prepared)
        return DeliveryResult(f"gmail id {response.json().get('id')} ({prepared.size} bytes)")

    async def already_sent(self, account: AccountSettings, message_id: str) -> bool | None:
        api = Api(self.client, self.tokens, account.username)
        try:
            response = await api.call(
                "GET",
                f"{self.gmail_url}/gmail/v1/users/me/messages",
                "Gmail sent-mail lookup",
                params={"q": f"rfc822msgid:{message_id.strip('<>')}", "labelIds": "SENT"},
            )
        except (Permanent, ReauthRequired):
            return None  # gmail.send only: listing needs gmail.readonly, so we cannot tell
        return bool(response.json().get("messages"))

    async def _check_from(
        self, api: Api, account: AccountSettings, from_address: str | None
    ) -> None:
        if from_address is None or from_address == account.address.lower():
            return  # no From (Gmail adds the primary) or the primary itself: never rewritten
        allowed = await self._send_as_list(api, account, from_address)
        if from_address not in allowed:
            raise Permanent(
                f"From {from_address} is not a verified Gmail send-as address of "
                f"{account.address}; Gmail would rewrite it to {account.address}",
                553,
                "5.7.1",
            )

    async def send_as_addresses(self, account: AccountSettings) -> frozenset[str]:
        """The primary address and verified send-as aliases of the account (cached).

        Raises ReauthRequired when they cannot be read (not connected, or no gmail.readonly).
        """
        return await self._send_as_list(
            Api(self.client, self.tokens, account.username), account, None
        )

    async def _send_as_list(
        self, api: Api, account: AccountSettings, from_address: str | None
    ) -> frozenset[str]:
        cached = self._send_as.get(account.username)
        if cached is not None and cached[0] >= time.monotonic():
            return cached[1]
        try:
            response = await api.call(
                "GET", f"{self.gmail_url}/gmail/v1/users/me/settings/sendAs", "Gmail send-as list"
            )
        except ReauthRequired as error:
            if from_address is None:
                raise
            # Held, not refused: once the owner reconnects (with gmail.readonly), it can go.
            raise ReauthRequired(
                f"cannot confirm that {account.address} may send as {from_address}, and Gmail "
                "would silently rewrite an unverified From: its send-as aliases could not be "
                f"read ({error}); reading them needs the gmail.readonly scope"
            ) from error
        allowed = frozenset(
            str(entry.get("sendAsEmail", "")).lower()
            for entry in response.json().get("sendAs", [])
            if entry.get("isPrimary") or entry.get("verificationStatus") == "accepted"
        )
        self._send_as[account.username] = (time.monotonic() + SEND_AS_TTL, allowed)
        return allowed

    async def _resumable(self, api: Api, url: str, prepared: Prepared) -> httpx.Response:
        """Open a session, then PUT pieces; a 308 says how much arrived (``Range: bytes=0-N``).

        Every request of the session carries the bearer token, as Google's client libraries
        send it (googleapiclient's ``next_chunk`` PUTs through the authorized transport);
        Google does not document the session URI alone as enough. Through ``Api.call``, a 401
        at any step gets one newly issued token and the same piece again.
        """
        opened = await api.call(
            "POST",
            url,
            "Gmail open upload",
            params={"uploadType": "resumable"},
            json={},
            headers={
                "X-Upload-Content-Type": "message/rfc822",
                "X-Upload-Content-Length": str(prepared.size),
            },
        )
        location = opened.headers.get("Location")
        if not location:
            raise Temporary("Gmail open upload: no session Location in the answer")
        offset, total, stalls = 0, prepared.size, 0
        while True:
            piece = prepared.range(offset, offset + PIECE)
            end = offset + len(piece) - 1
            response = await api.call(
                "PUT",
                location,
                "Gmail upload",
                ok=lambda status: status in (200, 201, 308, 404),
                content=piece,
                headers={"Content-Range": f"bytes {offset}-{end}/{total}"},
            )
            if response.status_code in (200, 201):
                return response
            if response.status_code == 404:  # expired or lost: the next attempt starts over
                code, message = error_code(response)
                raise Temporary(f"Gmail upload: session lost ({code}: {message})")
            received = response.headers.get("Range", "")
            before, offset = offset, int(received.rsplit("-", 1)[1]) + 1 if received else 0
            stalls = stalls + 1 if offset <= before else 0
            if stalls > 3:
                raise Temporary("Gmail upload: the server keeps asking for the same bytes")
