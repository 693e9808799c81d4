"""The ``jupyter`` backend: any Jupyter server, Jupyter Kernel Gateway or Enterprise Gateway.

REST (``/api/kernelspecs``, ``/api/kernels``) starts, interrupts, checks and deletes the remote
kernel; the channels WebSocket is opened by ``connection``. The token is sent only in the
``Authorization`` header: never in a URL, never in a log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from cgpu_kernel.backends import registry
from cgpu_kernel.backends.base import (
    LAUNCH_SLACK,
    Backend,
    BackendOptions,
    ContentsTarget,
    KernelHealth,
    WebSocketTarget,
)
from cgpu_kernel.backends.http import (
    USER_AGENT,
    Service,
    TLSOptions,
    build_request,
    fetch,
    is_transient,
    means_gone,
    safe_url,
)
from cgpu_kernel.exceptions import (
    ConfigurationError,
    ContentsUnsupportedError,
    RemoteAuthError,
    RemoteError,
    RemoteKernelGoneError,
    RemoteKernelSpecError,
    RemoteProtocolError,
    RemoteUnreachableError,
)

log = logging.getLogger(__name__)

#: Seconds a liveness check may take while reconnecting (a blackholed path must not stall it).
HEALTH_TIMEOUT = 5.0
SHUTDOWN_RETRY_FOR = 10.0  # seconds a DELETE answered with a 5xx is tried again
SHUTDOWN_RETRY_DELAY = 0.5

#: Returns the token to use now (None for a server without one).
TokenProvider = Callable[[], "str | None"]


def normalize_base_url(url: str) -> str:
    """``http://host:port/base/`` from what a user typed; refuses credentials in the URL."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigurationError(
            f"{safe_url(url)!r} is not an http(s) URL. Give the remote Jupyter server's base URL,"
            " for example --url https://jupyter.example.org/user/me/"
        )
    if "token=" in parts.query or parts.username or parts.password:
        raise ConfigurationError(
            "The server URL carries a credential. Pass the URL without it and give the token in"
            " the CGPU_TOKEN environment variable or a --token-file, so it never lands in"
            " kernel.json, a process list or a log."
        )
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def parse_launch_timeout(kernel_env: dict[str, str]) -> float | None:
    """Seconds the gateway may take to launch the kernel, from ``KERNEL_LAUNCH_TIMEOUT`` (which
    Enterprise Gateway honours); None when not given."""
    raw = kernel_env.get("KERNEL_LAUNCH_TIMEOUT")
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigurationError(
            f"KERNEL_LAUNCH_TIMEOUT={raw!r} is not a number of seconds: set it to how long the"
            " gateway may take to launch a kernel, e.g. 300, or unset it."
        )
    return seconds


class JupyterServerClient:
    """Small REST client for one Jupyter server, mapping failures to errors that say what to do."""

    def __init__(
        self,
        base_url: str,
        token: str | TokenProvider | None,
        *,
        validate_cert: bool = True,
        ca_certs: str | None = None,
        extra_headers: dict[str, str] | None = None,
        request_timeout: float = 30.0,
        timeout_option: str = "--request-timeout (CGPU_REQUEST_TIMEOUT)",
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        #: how the user raises ``request_timeout``, named when it runs out ("": not at all)
        self.timeout_option = timeout_option
        self._token = token
        self.last_token_used: str | None = None
        self.validate_cert = validate_cert
        self.ca_certs = ca_certs
        self.extra_headers = dict(extra_headers or {})
        self.request_timeout = request_timeout
        self._http = AsyncHTTPClient(force_instance=True)

    @property
    def token(self) -> str | None:
        """The current token: read anew each time when given as a provider (a renewed token
        file takes effect on the next request, no restart needed)."""
        return self._token() if callable(self._token) else self._token

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, **self.extra_headers}
        token = self.last_token_used = self.token
        if token:
            headers["Authorization"] = f"token {token}"
        return headers

    @property
    def tls(self) -> TLSOptions:
        return TLSOptions(self.validate_cert, self.ca_certs)

    def service(self) -> Service:
        """This server as the HTTP seam names it in errors."""
        return Service(
            name=f"the Jupyter server at {safe_url(self.base_url)}",
            no_answer_hint="Check that it is running and that the URL is right.",
            network_hint=(
                "Check that it is running, that the URL is right, and (for https) that its"
                " certificate is valid."
            ),
            auth_error=self._refused,
            timeout_option=self.timeout_option,
        )

    def _refused(self, status: int, url: str) -> RemoteAuthError:
        return RemoteAuthError(
            f"The Jupyter server at {safe_url(self.base_url)} refused our credentials"
            f" (HTTP {status}). Set CGPU_TOKEN (or --token-file) to the server's token.",
            url=url,
            status=status,
        )

    def http_request(self, url: str, *, request_timeout: float = 30.0) -> HTTPRequest:
        """A GET of ``url`` with this server's headers and TLS options (``cgpu-kernel status``
        reads the Colab runtime's resources with it)."""
        return build_request(
            url, headers=self.headers(), tls=self.tls, request_timeout=request_timeout
        )

    def websocket_target(self, url: str, *, connect_timeout: float = 15.0) -> WebSocketTarget:
        """Where and how to open a WebSocket on this server (same headers and TLS as REST)."""
        return WebSocketTarget(
            url,
            self.headers(),
            validate_cert=self.validate_cert,
            ca_certs=self.ca_certs,
            connect_timeout=connect_timeout,
        )

    async def call(
        self, method: str, path: str, body: Any = None, *, timeout: float | None = None
    ) -> Any:
        """One REST call; returns the decoded JSON (None for an empty body)."""
        timeout = timeout or self.request_timeout
        url = self.base_url + path
        request = build_request(
            url,
            method=method,
            headers=self.headers(),
            body=None if body is None else json.dumps(body),
            tls=self.tls,
            connect_timeout=min(10.0, timeout),
            request_timeout=timeout,
        )
        response = await fetch(self._http, request, self.service())
        if not response.body:
            return None
        try:
            return json.loads(response.body)
        except ValueError:
            where = safe_url(url)
            kind = response.headers.get("Content-Type", "unknown content")
            raise RemoteProtocolError(
                f"{where} answered with {kind}, not the JSON of a Jupyter server API. Check that"
                " the URL is the server's base URL (where /api/kernels lives).",
                url=where,
            ) from None

    def close(self) -> None:
        self._http.close()


class JupyterBackend(Backend):
    """A remote kernel on a Jupyter server we can reach over HTTP(S)."""

    def __init__(
        self,
        base_url: str,
        token: str | TokenProvider | None,
        kernel_name: str = "python3",
        *,
        validate_cert: bool = True,
        ca_certs: str | None = None,
        record_for_reclaim: bool = True,
        kernel_env: dict[str, str] | None = None,
        request_timeout: float = 30.0,
    ) -> None:
        self.client = JupyterServerClient(
            base_url,
            token,
            validate_cert=validate_cert,
            ca_certs=ca_certs,
            request_timeout=request_timeout,
        )
        self.kernel_name = kernel_name
        #: the start request's ``env``: KERNEL_* variables a gateway passes to its process
        #: proxy (Enterprise Gateway: user, namespace, image, launch timeout, ...)
        self.kernel_env = dict(kernel_env or {})
        self.launch_timeout = parse_launch_timeout(self.kernel_env)
        self.kernel_id: str | None = None
        self.record_for_reclaim = record_for_reclaim
        #: the kernel's folder as a Contents API path (see :meth:`contents_target`); None: the
        #: server picks (Colab's runtime, whose kernels keep their usual /content)
        self.kernel_path: str | None = ""
        self.description = f"the {kernel_name!r} kernel at {safe_url(self.client.base_url)}"

    @classmethod
    def from_options(cls, options: BackendOptions) -> JupyterBackend:
        """``--url``, ``--remote-kernel``, the token (file or CGPU_TOKEN), the TLS options and
        ``--request-timeout``."""
        if not options.url:
            raise ConfigurationError(
                "The jupyter backend needs the server's URL: reinstall the kernelspec with"
                " --url, or set CGPU_URL."
            )
        return cls(
            options.url,
            options.token_provider(),
            options.remote_kernel,
            validate_cert=options.validate_cert,
            ca_certs=options.ca_certs or None,
            kernel_env=options.remote_kernel_env(),
            request_timeout=options.request_timeout,
        )

    @property
    def base_url(self) -> str:
        return self.client.base_url

    async def start_kernel(self) -> str:
        if self.kernel_id is not None:
            try:
                model = await self.client.call("GET", self._kernel_path())
            except RemoteProtocolError as exc:
                if not means_gone(exc):
                    raise  # a 5xx (a reverse proxy's 502): says nothing about the kernel
                model = None  # 404: the server no longer knows it
            # (unreachable, a 5xx or refused credentials propagate: the kernel may well be
            # alive, so it is neither replaced nor forgotten)
            if isinstance(model, dict) and model.get("execution_state") != "dead":
                return self.kernel_id
            self._forget_kernel()
        if self.record_for_reclaim:
            await registry.reclaim_orphans(self.client)
        specs = await self.client.call("GET", "api/kernelspecs")
        names = sorted((specs or {}).get("kernelspecs", {})) if isinstance(specs, dict) else []
        if not isinstance(specs, dict) or "kernelspecs" not in specs:
            raise RemoteProtocolError(
                f"{safe_url(self.base_url)} does not list kernelspecs like a Jupyter server."
            )
        if self.kernel_name not in names:
            raise RemoteKernelSpecError(
                f"The server at {safe_url(self.base_url)} has no kernelspec named"
                f" {self.kernel_name!r}. Available: {', '.join(names) or 'none'}. Reinstall with"
                " --remote-kernel set to one of them."
            )
        # ``path`` "" starts the kernel in the server's root_dir (jupyter-server's
        # ``cwd_for_path``), where the Contents API's "" is: without it the kernel runs in
        # the server process's own cwd, which the Contents API cannot name (see contents_target)
        body: dict[str, Any] = {"name": self.kernel_name}
        if self.kernel_path is not None:
            body["path"] = self.kernel_path
        if self.kernel_env:
            body["env"] = self.kernel_env
        # A gateway answers once the kernel is launched (a pod scheduled, its image pulled):
        # the request may take as long as the launch is allowed to.
        timeout = max(self.client.request_timeout, (self.launch_timeout or 0.0) + LAUNCH_SLACK)
        try:
            model = await self.client.call("POST", "api/kernels", body, timeout=timeout)
        except RemoteAuthError as exc:
            if exc.status != 403 or not self.kernel_env:
                raise  # (Colab's runtime and the local server get no env: not a gateway)
            raise self._start_refused(exc) from None
        if not isinstance(model, dict) or not isinstance(model.get("id"), str):
            raise RemoteProtocolError(
                f"{safe_url(self.base_url)} started a kernel but did not say its id."
            )
        self.kernel_id = model["id"]
        if self.record_for_reclaim:
            registry.record(self.base_url, self.kernel_id)
        log.info("started remote kernel %s on %s", self.kernel_id, safe_url(self.base_url))
        return self.kernel_id

    def _start_refused(self, exc: RemoteAuthError) -> RemoteAuthError:
        """A 403 on the start request, just after the same token listed the kernelspecs: the
        credentials are fine, the gateway refuses this start (Enterprise Gateway does for a
        user it does not authorize, or past its kernel limits)."""
        user = self.kernel_env.get("KERNEL_USERNAME", "?")
        return RemoteAuthError(
            f"{safe_url(self.base_url)} accepted our token but refused to start a kernel"
            f" (HTTP 403) for KERNEL_USERNAME={user!r}. Enterprise Gateway refuses users in"
            " EG_UNAUTHORIZED_USERS (root by default) or missing from EG_AUTHORIZED_USERS, and"
            " any start past its max_kernels or max_kernels_per_user: set KERNEL_USERNAME in the"
            " frontend's environment (or --option KERNEL_USERNAME=...), shut down other"
            " kernels, or ask the gateway's admin.",
            url=exc.url,
            status=403,
        )

    def _kernel_path(self) -> str:
        if self.kernel_id is None:
            raise RemoteKernelGoneError("No remote kernel has been started yet.")
        return f"api/kernels/{quote(self.kernel_id)}"

    def websocket_request(self, session_id: str) -> WebSocketTarget:
        scheme = "wss" if self.base_url.startswith("https") else "ws"
        url = (
            scheme
            + self.base_url[self.base_url.index(":") :]
            + self._kernel_path()
            + f"/channels?session_id={quote(session_id)}"
        )
        return self.client.websocket_target(url)

    async def interrupt_kernel(self) -> None:
        if self.kernel_id is None:
            return  # nothing started yet: the relay already cancelled the queued cells
        await self.client.call("POST", self._kernel_path() + "/interrupt", {})

    async def kernel_health(self) -> KernelHealth:
        if self.kernel_id is None:
            return KernelHealth.GONE
        try:
            model = await self.client.call("GET", self._kernel_path(), timeout=HEALTH_TIMEOUT)
        except RemoteAuthError:
            return KernelHealth.AUTH_EXPIRED
        except RemoteUnreachableError:
            return KernelHealth.UNREACHABLE
        except RemoteProtocolError as exc:
            if means_gone(exc):
                return KernelHealth.GONE  # 404: the server does not know it any more
            # A 5xx (a 502/503 from a reverse proxy in front of the server, a server failing
            # for now) or an answer that is not JSON: nothing is known about the kernel, so it
            # is retried within the reconnect budget like a server that does not answer.
            level = logging.INFO if is_transient(exc) else logging.WARNING
            log.log(level, "kernel health unknown for now: %s", exc)
            return KernelHealth.UNREACHABLE
        if isinstance(model, dict) and model.get("execution_state") == "dead":
            return KernelHealth.GONE
        return KernelHealth.ALIVE

    async def shutdown_kernel(self, *, restart: bool = False) -> None:
        """Delete the remote kernel. A 5xx is tried again for a few seconds: jupyter-server
        answers 500 to a DELETE while it restarts a kernel that crashed, which is just when a
        proxy with ``on_remote_death = exit`` ends; giving up then would leave the restarted
        kernel running (until ``reclaim``)."""
        if self.kernel_id is None:
            return
        deadline = time.monotonic() + SHUTDOWN_RETRY_FOR
        while True:
            try:
                await self.client.call("DELETE", self._kernel_path())
            except RemoteError as exc:
                failing = exc.status is not None and exc.status >= 500  # not: no answer at all
                if failing and time.monotonic() < deadline:
                    log.info("deleting the remote kernel failed for now (%s); trying again", exc)
                    await asyncio.sleep(SHUTDOWN_RETRY_DELAY)
                    continue
                self._shutdown_failed(exc)
                return
            break
        self._forget_kernel()

    def _shutdown_failed(self, exc: RemoteError) -> None:
        if means_gone(exc):
            log.info("remote kernel was already gone: %s", exc)
            self._forget_kernel()
            return
        # Keep the reclaim record: the next cgpu kernel on this server, or
        # `cgpu-kernel reclaim`, deletes the kernel once the server answers again.
        log.warning("could not delete remote kernel %s: %s", self.kernel_id, exc)
        self.kernel_id = None

    def _forget_kernel(self) -> None:
        if self.kernel_id is not None and self.record_for_reclaim:
            registry.forget(self.base_url, self.kernel_id)
        self.kernel_id = None

    def contents_target(self) -> ContentsTarget:
        """The server's Contents API; the kernel runs in :attr:`kernel_path` (sent as the
        kernel's ``path`` when it was started). A Kernel Gateway has no Contents API: the
        first call answers 404 and ``backends.contents`` says so."""
        if self.kernel_path is None:
            raise ContentsUnsupportedError(
                f"The folder of {self.description} is not known, so files cannot be placed"
                " next to it."
            )
        return ContentsTarget(
            self.client.base_url,
            self.client.headers,
            cwd=self.kernel_path,
            validate_cert=self.client.validate_cert,
            ca_certs=self.client.ca_certs,
            name=f"the Jupyter server at {safe_url(self.client.base_url)}",
        )

    async def reauthenticate(self) -> bool:
        """True when the token changed (a renewed token file) since the request that failed."""
        return self.client.token != self.client.last_token_used

    async def close(self) -> None:
        self.client.close()
