"""Answering ``colab_request``: passing the user's Google credentials to the runtime.

``drive.mount()`` and ``auth.authenticate_user()`` make the kernel ask the *client* (normally
Colab's web page) for credentials. How colabtools asks (``google/colab/_message.py``,
``send_request``/``blocking_request``): a ``colab_request`` on **iopub** whose ``parent_header``
holds only the session, ``content {request: {authType}}``, metadata ``colab_request_type:
request_auth`` and an integer ``colab_msg_id``; it reads the answer from **stdin**: any message
whose ``content.value`` is ``{type: colab_reply, colab_msg_id, error?}``. ``drive.mount`` waits
120 s (``drive.py``, ``timeout_ms``) and then goes on without credentials.

:class:`Credentials` answers the way colab-vscode does (``src/jupyter/colab-proxy-websocket.ts``,
``src/auth/ephemeral.ts``): a dry run of Colab's credentials propagation; when it names an
``unauthorized_redirect_uri`` the user must open, the URL goes to the running cell (a link), and
once the user consented (seen as a dry run that succeeds: a generic frontend has no "Continue"
button) ONE real run; an answer with ``error`` on failure, so the kernel raises instead of
hanging. Requests without a ``colab_msg_id`` (``cell_display_stdin``, ``cell_update_stdin``,
``cell_remove_stdin`` around every ``!command``, ``_system_commands.py``) expect no answer and get
none, and no notice. Other requests with an id (``GetSecret``, ``cell_javascript_eval``...) are
features of Colab's web page: an error answer, and a notice once per type. Called by
:meth:`cgpu_kernel.backends.colab.backend.ColabBackend.answer_kernel_request`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from cgpu_kernel.backends.base import Notify
from cgpu_kernel.backends.colab.api import ColabAPI
from cgpu_kernel.backends.colab.models import AUTH_TYPES, safe_link
from cgpu_kernel.core.wire import Message

log = logging.getLogger(__name__)

#: ``drive.mount()`` gives up after 120 s (colabtools ``drive.py``, ``timeout_ms=120000``) and
#: then mounts without credentials: our answer must reach it before, with room for the calls.
DRIVE_ANSWER_WITHIN = 100.0


class Credentials:
    """Credentials propagation for one backend's runtime."""

    def __init__(self, api: ColabAPI, *, auth_wait: float, auth_poll_interval: float) -> None:
        self.api = api
        #: Seconds to wait for the user to allow access at the authorization URL (for Drive at
        #: most :data:`DRIVE_ANSWER_WITHIN`, inside ``drive.mount``'s own time-out).
        self.auth_wait = auth_wait
        self.auth_poll_interval = auth_poll_interval
        self._told: set[str] = set()  # request types already explained in a notice

    def wait_for(self, auth_type: str) -> float:
        """Seconds to wait for consent for ``auth_type``."""
        if auth_type == "dfs_ephemeral":
            return min(self.auth_wait, DRIVE_ANSWER_WITHIN)
        return self.auth_wait

    async def answer(
        self, msg: Message, endpoint: str | None, notify: Notify
    ) -> dict[str, Any] | None:
        """The ``input_reply`` content ``{value: {type: colab_reply, colab_msg_id, ...}}``, or
        None for a request that expects no answer (no ``colab_msg_id``)."""
        metadata = msg.metadata
        colab_msg_id = metadata.get("colab_msg_id")
        request_type = metadata.get("colab_request_type")
        if colab_msg_id is None:
            log.debug("colab_request %r expects no answer", request_type)
            return None
        request = msg.content.get("request")
        auth_type = request.get("authType") if isinstance(request, dict) else None

        def reply(error: str | None = None) -> dict[str, Any]:
            # colab_msg_id echoed unchanged (an int from colabtools' counter)
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
            if str(what) not in self._told:
                self._told.add(str(what))
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

    async def _propagate(self, endpoint: str | None, auth_type: str, notify: Notify) -> str | None:
        """Run credentials propagation; an error text for the kernel, or None on success."""
        if endpoint is None:
            return "No Colab runtime is assigned to this kernel. Run the cell again."
        what = "Google Drive" if auth_type == "dfs_ephemeral" else "your Google account"
        result = await self.api.propagate_credentials(endpoint, auth_type, dryrun=True)
        url = result.get("unauthorized_redirect_uri")
        if not result.get("success") and isinstance(url, str) and url:
            shown = safe_link(url)
            if shown is None:
                return "Colab asked for authorization at a URL that is not https; refused."
            wait = self.wait_for(auth_type)
            notify(
                f"cgpu-kernel: the Colab runtime needs your permission to use {what}. Open this"
                " URL in a browser signed in to the same Google account and allow access; the"
                f" cell continues by itself (waiting up to {wait:g} s):",
                link=shown,
            )
            deadline = time.monotonic() + wait
            while not result.get("success"):
                if time.monotonic() + self.auth_poll_interval >= deadline:
                    return (
                        f"Access to {what} was not granted within {wait:g} s. Open the URL shown"
                        " above, allow access, and run the cell again."
                    )
                await asyncio.sleep(self.auth_poll_interval)
                result = await self.api.propagate_credentials(endpoint, auth_type, dryrun=True)
        elif not result.get("success"):
            return (
                f"Colab refused to pass your credentials for {what} to the runtime (its dry run"
                " gave neither success nor an authorization URL). Check `cgpu-kernel auth"
                " status` (the account needs the colaboratory scope) and try again."
            )
        result = await self.api.propagate_credentials(endpoint, auth_type, dryrun=False)
        if not result.get("success"):
            return f"Colab could not pass your credentials for {what} to the runtime. Try again."
        if url:
            notify(f"cgpu-kernel: access to {what} granted.")
        return None
