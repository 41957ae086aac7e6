"""A real consent with every library logging at DEBUG: no authorization code, PKCE verifier or
token reaches the log, although MSAL's debug log prints its token requests in full."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.logs import configure_logging
from mailgw_sandbox import Sandbox
from tests.helpers import AdminBrowser, running_gateway, sandbox_config


async def test_msal_debug_log_of_a_consent_masks_the_code_and_the_verifier(
    sandbox: Sandbox, tmp_path: Path, captured_log: io.StringIO
) -> None:
    config, _ = sandbox_config(sandbox, tmp_path / "state")
    async with running_gateway(config, tmp_path / "c.yaml", sandbox) as gateway:
        configure_logging("debug", "json", captured_log)  # the gateway's own setup, all at DEBUG
        logging.getLogger("msal").setLevel(logging.DEBUG)
        flows: list[dict[str, Any]] = []  # the flows MSAL starts (stored sealed for the callback)
        begin = gateway.broker.microsoft.start

        def recorded(*args: Any) -> dict[str, Any]:
            flows.append(begin(*args))
            return flows[-1]

        gateway.broker.microsoft.start = recorded
        browser = AdminBrowser(gateway, sandbox)
        try:
            await browser.sign_in()
            start = await browser.post("/accounts/crm/connect")
            (flow,) = flows
            verifier = flow["code_verifier"]
            page = await browser.cloud.get(start.headers["location"])  # Entra's form_post page
            fields = dict(re.findall(r"name='([^']+)' value='([^']*)'", page.text))
            action = urlsplit(re.search(r"action='([^']+)'", page.text).group(1))
            done = await browser.admin.post(action.path, data=fields)
            assert "is connected" in done.text, done.text
        finally:
            await browser.close()
    output = captured_log.getvalue()
    code = fields["code"]
    assert len(code) >= 20 and len(verifier) >= 43
    assert code not in output and verifier not in output
    # Not vacuous: MSAL did log the token request, with both parameters masked by name.
    assert '"logger": "msal.token_cache"' in output
    assert '\\"code\\": \\"[redacted]\\"' in output
    assert '\\"code_verifier\\": \\"[redacted]\\"' in output
