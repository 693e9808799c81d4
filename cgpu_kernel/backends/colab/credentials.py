"""Answering ``colab_request``: passing the user's Google credentials to the runtime.

``drive.mount()`` and ``auth.authenticate_user()`` make the kernel ask the *client* (normally
Colab's web page) for credentials, with a ``colab_request`` on stdin. :class:`Credentials`
answers it the way the page does: Colab's credentials propagation (dry run, XSRF ``POST``, the
authorization URL shown in the cell when the user must act, then the real run). Unknown request
types get an error reply, never silence (which would hang the cell). Called by
:meth:`cgpu_kernel.backends.colab.backend.ColabBackend.answer_kernel_request`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from cgpu_kernel.backends.colab.api import ColabAPI
from cgpu_kernel.backends.colab.models import AUTH_TYPES, safe_link
from cgpu_kernel.core.wire import Message

log = logging.getLogger(__name__)


class Credentials:
    """Credentials propagation for one backend's runtime."""

    def __init__(self, api: ColabAPI, *, auth_wait: float, auth_poll_interval: float) -> None:
        self.api = api
        #: Seconds to wait for the user to allow access at the authorization URL.
        self.auth_wait = auth_wait
        self.auth_poll_interval = auth_poll_interval

    async def answer(
        self, msg: Message, endpoint: str | None, notify: Callable[[str], None]
    ) -> dict[str, Any]:
        """Answer Colab's ``colab_request``: ``{value: {type: colab_reply, colab_msg_id, ...}}``."""
        metadata = msg.metadata
        colab_msg_id = metadata.get("colab_msg_id")
        request_type = metadata.get("colab_request_type")
        request = msg.content.get("request")
        auth_type = request.get("authType") if isinstance(request, dict) else None

        def reply(error: str | None = None) -> dict[str, Any]:
            value: dict[str, Any] = {"type": "colab_reply", "colab_msg_id": colab_msg_id}
            if error is not None:
                value["error"] = error
            return {"value": value}

        if request_type != "request_auth" or auth_type not in AUTH_TYPES:
            what = request_type if request_type != "request_auth" else f"request_auth/{auth_type}"
            error = (
                f"cgpu-kernel cannot answer Colab's {what!r} request: only Drive mounting and"
                " user authentication (request_auth) work outside the Colab web page. Use the"
                " Colab web UI for this feature."
            )
            notify(f"cgpu-kernel: {error}")
            return reply(error)
        outcome: str | None
        try:
            outcome = await self._propagate(endpoint, auth_type, notify)
        except Exception as exc:  # an answer must go back, or the cell hangs
            log.warning("credentials propagation failed: %s", exc)
            outcome = f"cgpu-kernel could not pass your Google credentials to the runtime: {exc}"
            notify(f"cgpu-kernel: {outcome}")
        return reply(outcome)

    async def _propagate(
        self, endpoint: str | None, auth_type: str, notify: Callable[[str], None]
    ) -> str | None:
        """Run credentials propagation; an error text for the kernel, or None on success."""
        if endpoint is None:
            return "No Colab runtime is assigned to this kernel. Run the cell again."
        what = "Google Drive" if auth_type == "dfs_ephemeral" else "your Google account"
        result = await self.api.propagate_credentials(endpoint, auth_type, dryrun=True)
        url = result.get("unauthorized_redirect_uri")
        if isinstance(url, str) and url:
            shown = safe_link(url)
            if shown is None:
                return "Colab asked for authorization at a URL that is not https; refused."
            notify(
                f"cgpu-kernel: the Colab runtime needs your permission to use {what}. Open this"
                f" URL in a browser signed in to the same Google account and allow access; the"
                f" cell continues by itself (waiting up to {self.auth_wait:g} s):\n{shown}"
            )
            deadline = time.monotonic() + self.auth_wait
            while True:
                await asyncio.sleep(self.auth_poll_interval)
                result = await self.api.propagate_credentials(endpoint, auth_type, dryrun=False)
                if result.get("success") and not result.get("unauthorized_redirect_uri"):
                    notify(f"cgpu-kernel: access to {what} granted.")
                    return None
                if time.monotonic() >= deadline:
                    return (
                        f"Access to {what} was not granted within {self.auth_wait:g} s. Open the"
                        " URL shown above, allow access, and run the cell again."
                    )
        if not result.get("success"):
            return (
                f"Colab refused to pass your credentials for {what} to the runtime. Check"
                " `cgpu-kernel auth status` (the account needs the colaboratory scope) and try"
                " again."
            )
        result = await self.api.propagate_credentials(endpoint, auth_type, dryrun=False)
        if not result.get("success"):
            return f"Colab could not pass your credentials for {what} to the runtime. Try again."
        return None
