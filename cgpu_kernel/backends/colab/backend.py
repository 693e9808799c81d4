"""The ``colab`` backend: a Google Colab runtime behind the proxy kernel.

Every Colab detail lives in this module (FIELD-NOTES section 4): the endpoints are undocumented
and change, so both base URLs are constructor arguments (the Colab service, and whatever
``runtimeProxyInfo.url`` the assignment names) and the tests point them at a loopback double.

What it does, in order:

* **Assignment.** ``GET tun/m/assign?nbh=...`` returns the runtime already assigned to this
  notebook hash (reused: no second runtime is paid for), or an XSRF token that a ``POST`` of the
  same URL with ``X-Goog-Colab-Token`` turns into a new assignment. The accelerator comes from
  ``gpu`` (``T4``, ``L4``, ``A100``, ``H100``, ... or ``none``), high memory from ``high_memory``
  (``shape=hm``, implied for L4 and TPUs); other accelerators are tried only when the user listed
  them in ``fallback``. Each refusal (no quota, denied, too many runtimes, accelerator
  unavailable) is its own error that says what to do.
* **The runtime** is a Jupyter server at ``runtimeProxyInfo.url``: a :class:`JupyterBackend`
  does the kernel REST calls and builds the WebSocket request, with
  ``X-Colab-Runtime-Proxy-Token`` and ``X-Colab-Client-Agent`` in its ``extra_headers`` (never
  in a URL). The proxy token is short-lived: a background task renews it ahead of expiry, and
  a 401/404 from the runtime is never taken for a dead runtime before the assignments have been
  listed again (an expired token answers exactly like a deleted runtime).
* **Keep-alive.** ``GET tun/m/<endpoint>/keep-alive/`` every ``keep_alive_interval`` seconds
  while the kernel is in use; after ``idle_timeout`` seconds without a running cell it stops, so
  an abandoned notebook stops burning compute units (Colab reclaims the idle runtime). Activity
  is seen in the remote's messages (:meth:`ColabBackend.intercepts` watches every one) and can be
  reported by the proxy with :meth:`ColabBackend.note_activity`.
* **colab_request.** ``drive.mount()`` and ``auth.authenticate_user()`` make the kernel ask the
  *client* for credentials; :meth:`ColabBackend.answer_kernel_request` runs Colab's credentials
  propagation (dry run, XSRF ``POST``, the authorization URL shown in the cell when the user must
  act, then the real run) and answers on stdin. Unknown request types get an error reply, never
  silence (which would hang the cell).
* **Release.** :meth:`ColabBackend.shutdown_kernel` deletes the kernel and unassigns the runtime
  (``GET`` then XSRF ``POST`` of ``tun/m/unassign/<endpoint>``), except on a restart, when the
  user asked to keep it, or while other kernels still run on it.

Nothing here logs or formats a token: the Google access token travels only in the
``Authorization`` header, the proxy token only in its own header.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from cgpu_kernel.backends.base import Backend, KernelHealth
from cgpu_kernel.backends.jupyter import JupyterBackend
from cgpu_kernel.core.wire import Message
from cgpu_kernel.exceptions import (
    ColabAuthError,
    ColabDeniedError,
    ColabError,
    ColabHTTPError,
    ColabQuotaError,
    ColabRuntimeGoneError,
    ColabTooManyRuntimesError,
    ColabUnavailableError,
    ConfigurationError,
    RemoteAuthError,
    RemoteError,
    RemoteKernelGoneError,
    RemoteProtocolError,
    RemoteUnreachableError,
)

log = logging.getLogger(__name__)

DEFAULT_COLAB_URL = "https://colab.research.google.com/"
CLIENT_AGENT = "cgpu-kernel"
XSSI_PREFIX = b")]}'"
PROXY_TOKEN_HEADER = "X-Colab-Runtime-Proxy-Token"  # noqa: S105 - a header name
CLIENT_AGENT_HEADER = "X-Colab-Client-Agent"
XSRF_HEADER = "X-Goog-Colab-Token"
TUNNEL_HEADER = "X-Colab-Tunnel"

#: Accelerators Colab has offered; others are passed through as typed (uppercased).
GPUS = ("T4", "L4", "A100", "H100")
TPUS = ("V28", "V5E1", "V6E1")
#: Accelerators that only come on a high-memory machine (``shape=hm``).
HIGHMEM_ONLY = frozenset({"L4", "V28", "V5E1", "V6E1"})
#: ``colab_request`` auth types answered by credentials propagation.
AUTH_TYPES = ("dfs_ephemeral", "auth_user_ephemeral")
#: Assignment outcomes (POST ``tun/m/assign``).
OUTCOME_SUCCESS = 4
OUTCOMES_NO_QUOTA = (1, 2)
OUTCOME_DENIED = 5

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~-]*$")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_NOTEBOOK_NAMESPACE = uuid.UUID("5d1c6f0e-8a5b-4b8f-9a39-3c2b0f0c6a11")

T = TypeVar("T")


# --- helpers ------------------------------------------------------------------------------------


class AccessTokens(Protocol):
    """Where the Google access token comes from (see :mod:`cgpu_kernel.backends.colab.auth`)."""

    async def access_token(self, *, refresh: bool = False) -> str:
        """A current access token; ``refresh`` asks for a new one (the last was refused)."""
        ...


def notebook_hash(seed: str | None = None) -> str:
    """Colab's ``nbh``: a UUID with ``-`` turned to ``_``, padded with ``.`` to 44 characters.

    The same ``seed`` (a connection file's path, a user-chosen key) gives the same hash, so a
    restarted kernel finds its runtime again; no seed gives a fresh one.
    """
    ident = uuid.uuid5(_NOTEBOOK_NAMESPACE, seed) if seed else uuid.uuid4()
    return str(ident).replace("-", "_").ljust(44, ".")


def normalize_accelerator(value: str) -> str:
    """``T4``, ``a100`` -> ``A100``, ``none``/``cpu``/empty -> ``none``; refuses odd names."""
    name = value.strip().upper()
    if name in ("", "NONE", "CPU"):
        return "none"
    if not re.fullmatch(r"[A-Z0-9]{1,16}", name):
        raise ConfigurationError(
            f"{value!r} is not an accelerator name. Choose one of {', '.join(GPUS)}, a TPU such"
            f" as {TPUS[0]}, or none."
        )
    return name


def assignment_query(nbh: str, accelerator: str, high_memory: bool) -> dict[str, str]:
    """The query of ``tun/m/assign`` for one accelerator."""
    query = {"nbh": nbh}
    if accelerator != "none":
        query["variant"] = "TPU" if accelerator in TPUS else "GPU"
        query["accelerator"] = accelerator
    if high_memory or accelerator in HIGHMEM_ONLY:
        query["shape"] = "hm"
    return query


def check_service_url(url: str, what: str) -> str:
    """``https://host/path/`` (``http`` only on loopback, for test doubles); no credentials."""
    parts = urlsplit(url.strip())
    host = parts.hostname or ""
    if (
        parts.scheme not in ("http", "https")
        or not parts.netloc
        or (parts.scheme == "http" and host not in _LOOPBACK)
    ):
        raise ConfigurationError(
            f"The {what} URL must be an https:// URL (http only on loopback), got"
            f" {parts.scheme or 'no scheme'}://{host}."
        )
    if parts.username or parts.password or parts.query:
        raise ConfigurationError(f"The {what} URL must not carry credentials or a query.")
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def parse_json(body: bytes, where: str) -> Any:
    """JSON from a Colab response, without its XSSI prefix (``)]}'`` and a newline)."""
    text = body.lstrip()
    if text.startswith(XSSI_PREFIX):
        text = text[len(XSSI_PREFIX) :]
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise RemoteProtocolError(
            f"{where} did not answer with JSON: Colab's API may have changed. Check for a newer"
            " cgpu-kernel."
        ) from None


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise RemoteProtocolError(
            f"Colab sent no usable {what}: its API may have changed. Check for a newer cgpu-kernel."
        )
    return value


@dataclass
class RuntimeProxy:
    """Where the runtime's Jupyter server is and the short-lived token that opens it."""

    url: str
    token: str = field(repr=False)
    lifetime: float
    obtained_at: float

    @property
    def expires_at(self) -> float:
        return self.obtained_at + self.lifetime

    @classmethod
    def parse(cls, info: Any, colab_url: str) -> RuntimeProxy | None:
        """From ``runtimeProxyInfo`` (or the runtime-proxy-token answer); None when absent."""
        if not isinstance(info, dict):
            return None
        url, token = info.get("url"), info.get("token")
        if not isinstance(url, str) or not isinstance(token, str) or not token:
            return None
        lifetime: Any = info.get("tokenExpiresInSeconds", info.get("tokenTtl", 3600))
        if isinstance(lifetime, str):
            lifetime = lifetime.rstrip("s")
        try:
            seconds = float(lifetime)
        except (TypeError, ValueError):
            seconds = 3600.0
        proxy_url = check_service_url(url, "runtime proxy")
        if urlsplit(proxy_url).scheme == "http" and urlsplit(colab_url).scheme != "http":
            raise RemoteProtocolError("Colab named a runtime proxy without TLS; refusing it.")
        return cls(proxy_url, token, max(seconds, 1.0), time.monotonic())


@dataclass
class Assignment:
    """One Colab runtime assigned to us."""

    endpoint: str
    accelerator: str
    variant: str = ""
    machine_shape: str = ""
    proxy: RuntimeProxy | None = None
    reused: bool = False
    idle_timeout: float | None = None

    @classmethod
    def parse(cls, data: dict[str, Any], colab_url: str, *, reused: bool) -> Assignment:
        fit = data.get("fit")
        return cls(
            endpoint=_check_name(data.get("endpoint"), "runtime endpoint"),
            accelerator=str(data.get("accelerator") or data.get("acc") or "none").upper(),
            variant=str(data.get("variant", "")),
            machine_shape=str(data.get("machineShape", "")),
            proxy=RuntimeProxy.parse(data.get("runtimeProxyInfo"), colab_url),
            reused=reused,
            idle_timeout=float(fit) if isinstance(fit, int | float) else None,
        )


# --- the Colab service ----------------------------------------------------------------------------


class ColabAPI:
    """The Colab service calls (``tun/m/...``), with headers, XSSI and XSRF handled."""

    def __init__(
        self,
        tokens: AccessTokens,
        base_url: str = DEFAULT_COLAB_URL,
        *,
        client_agent: str = CLIENT_AGENT,
        validate_cert: bool = True,
        ca_certs: str | None = None,
        request_timeout: float = 60.0,
    ) -> None:
        self.tokens = tokens
        self.base_url = check_service_url(base_url, "Colab")
        self.client_agent = client_agent
        self.validate_cert = validate_cert
        self.ca_certs = ca_certs
        self.request_timeout = request_timeout
        self._http = AsyncHTTPClient(force_instance=True)

    async def call(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """One call; decoded JSON. A refused access token is refreshed and retried once."""
        url = self.base_url + path + "?" + urlencode({"authuser": "0", **(query or {})})
        where = f"Colab ({self.base_url}{path})"
        for attempt in range(2):
            token = await self.tokens.access_token(refresh=attempt > 0)
            request = HTTPRequest(
                url,
                method=method,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Accept": "application/json",
                    "User-Agent": self.client_agent,
                    CLIENT_AGENT_HEADER: self.client_agent,
                    **(headers or {}),
                },
                body=b"" if method == "POST" else None,
                validate_cert=self.validate_cert,
                ca_certs=self.ca_certs,
                follow_redirects=False,
                connect_timeout=min(20.0, self.request_timeout),
                request_timeout=self.request_timeout,
            )
            try:
                response = await self._http.fetch(request)
            except HTTPClientError as exc:
                if exc.code == 599 or exc.response is None:
                    raise RemoteUnreachableError(
                        f"Could not reach {where}: {exc.message}. Check the network (and"
                        " --colab-url if you changed it)."
                    ) from None
                if exc.code == 401 and attempt == 0:
                    continue  # an expired access token: refresh it and try once more
                if exc.code in (401, 403) or 300 <= exc.code < 400:
                    raise ColabAuthError(
                        f"Google refused our credentials for Colab (HTTP {exc.code}). Sign in"
                        " again with `cgpu-kernel auth login` (or renew CGPU_GOOGLE_ACCESS_TOKEN),"
                        " then run the cell again."
                    ) from None
                raise ColabHTTPError(
                    f"{method} {where} failed with HTTP {exc.code}.", exc.code
                ) from None
            except (OSError, ssl.SSLError) as exc:
                raise RemoteUnreachableError(
                    f"Could not reach {where}: {exc}. Check the network and the system's TLS"
                    " certificates."
                ) from None
            return parse_json(response.body or b"", where)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _xsrf_post(self, path: str, query: dict[str, str] | None = None) -> Any:
        """Colab's two-step write: ``GET`` gives an XSRF token, ``POST`` it back."""
        first = await self.call("GET", path, query)
        xsrf = first.get("token") if isinstance(first, dict) else None
        if not isinstance(xsrf, str) or not xsrf:
            raise RemoteProtocolError(
                f"Colab's {path} gave no XSRF token: its API may have changed. Check for a newer"
                " cgpu-kernel."
            )
        return await self.call("POST", path, query, {XSRF_HEADER: xsrf})

    async def assign(self, nbh: str, accelerator: str, high_memory: bool) -> Assignment:
        """The runtime for ``nbh``: the one already assigned, else a new one."""
        query = assignment_query(nbh, accelerator, high_memory)
        try:
            got = await self.call("GET", "tun/m/assign", query)
            if isinstance(got, dict) and "endpoint" in got:
                return Assignment.parse(got, self.base_url, reused=True)
            xsrf = got.get("token") if isinstance(got, dict) else None
            if not isinstance(xsrf, str) or not xsrf:
                raise RemoteProtocolError(
                    "Colab's assign answer has neither a runtime nor an XSRF token: its API may"
                    " have changed. Check for a newer cgpu-kernel."
                )
            posted = await self.call("POST", "tun/m/assign", query, {XSRF_HEADER: xsrf})
        except ColabHTTPError as exc:
            raise _assign_http_error(exc.code, accelerator) from None
        if not isinstance(posted, dict):
            raise RemoteProtocolError("Colab's assignment answer is not an object.")
        outcome = posted.get("outcome")
        if outcome in OUTCOMES_NO_QUOTA:
            raise ColabQuotaError(
                f"Colab has no quota for a {_label(accelerator)} runtime for this account right"
                f" now (outcome {outcome}): the free usage limit or the compute units are used"
                " up. Wait and try again later, choose another accelerator (--gpu, or --gpu none"
                " for a CPU runtime), allow fallbacks with --gpu-fallback, or add compute units"
                " at https://colab.research.google.com/signup."
            )
        if outcome == OUTCOME_DENIED:
            raise ColabDeniedError(
                f"Colab denied a {_label(accelerator)} runtime to this account (outcome 5). Open"
                " https://colab.research.google.com in a browser, signed in as the same account,"
                " to see why; cgpu-kernel cannot lift this."
            )
        if "endpoint" not in posted:
            raise RemoteProtocolError(
                f"Colab gave no runtime (outcome {outcome!r}): its API may have changed. Check"
                " for a newer cgpu-kernel."
            )
        return Assignment.parse(posted, self.base_url, reused=False)

    async def assignments(self) -> list[dict[str, Any]]:
        data = await self.call("GET", "tun/m/assignments")
        items = data.get("assignments", []) if isinstance(data, dict) else data
        return [item for item in items or [] if isinstance(item, dict)]

    async def runtime_proxy(self, endpoint: str) -> RuntimeProxy | None:
        """A fresh proxy token for ``endpoint``; None when Colab no longer lists it."""
        for item in await self.assignments():
            if item.get("endpoint") != endpoint:
                continue
            proxy = RuntimeProxy.parse(item.get("runtimeProxyInfo"), self.base_url)
            if proxy is not None:
                return proxy
            data = await self.call(
                "GET", "tun/m/runtime-proxy-token", {"endpoint": endpoint, "port": "8080"}
            )
            proxy = RuntimeProxy.parse(data, self.base_url)
            if proxy is None:
                raise RemoteProtocolError(
                    "Colab gave no runtime proxy token: its API may have changed. Check for a"
                    " newer cgpu-kernel."
                )
            return proxy
        return None

    async def unassign(self, endpoint: str) -> None:
        await self._xsrf_post(f"tun/m/unassign/{quote(_check_name(endpoint, 'endpoint'))}")

    async def keep_alive(self, endpoint: str) -> None:
        await self.call(
            "GET",
            f"tun/m/{quote(_check_name(endpoint, 'endpoint'))}/keep-alive/",
            headers={TUNNEL_HEADER: "Google"},
        )

    async def propagate_credentials(
        self, endpoint: str, auth_type: str, *, dryrun: bool
    ) -> dict[str, Any]:
        """``{success, unauthorized_redirect_uri?}`` from Colab's credentials propagation."""
        result = await self._xsrf_post(
            f"tun/m/credentials-propagation/{quote(_check_name(endpoint, 'endpoint'))}",
            {
                "authtype": auth_type,
                "version": "2",
                "dryrun": "true" if dryrun else "false",
                "propagate": "true",
                "record": "false",
            },
        )
        if not isinstance(result, dict):
            raise RemoteProtocolError("Colab's credentials propagation answer is not an object.")
        return result

    def close(self) -> None:
        self._http.close()


def _label(accelerator: str) -> str:
    return "CPU-only" if accelerator == "none" else accelerator


def _assign_http_error(code: int, accelerator: str) -> ColabError:
    if code == 412:
        return ColabTooManyRuntimesError(
            "This account already has as many Colab runtimes as Colab allows (HTTP 412). Release"
            " one with `cgpu-kernel release ENDPOINT` (`cgpu-kernel status` lists them) or in"
            " Colab's Runtime > Manage sessions, then run the cell again."
        )
    if code == 503:
        return ColabUnavailableError(
            f"Colab has no {_label(accelerator)} available right now (HTTP 503). Try again in a"
            " few minutes, choose another accelerator with --gpu, or allow fallbacks with"
            " --gpu-fallback."
        )
    return ColabError(
        f"Colab refused to assign a {_label(accelerator)} runtime (HTTP {code}). Check"
        " `cgpu-kernel auth status`, try again later, or check for a newer cgpu-kernel."
    )


# --- the backend ----------------------------------------------------------------------------------


class ColabBackend(Backend):
    """A kernel on a Colab runtime: assignment, keep-alive, proxy tokens, credentials."""

    def __init__(
        self,
        tokens: AccessTokens,
        *,
        colab_url: str = DEFAULT_COLAB_URL,
        gpu: str = "T4",
        high_memory: bool = False,
        fallback: Sequence[str] = (),
        notebook_key: str | None = None,
        remote_kernel: str = "python3",
        keep_runtime: bool = False,
        keep_alive_interval: float = 60.0,
        idle_timeout: float = 3600.0,
        token_refresh_margin: float = 300.0,
        auth_wait: float = 300.0,
        auth_poll_interval: float = 3.0,
        validate_cert: bool = True,
        ca_certs: str | None = None,
        client_agent: str = CLIENT_AGENT,
    ) -> None:
        self.api = ColabAPI(
            tokens,
            colab_url,
            client_agent=client_agent,
            validate_cert=validate_cert,
            ca_certs=ca_certs,
        )
        self.gpu = normalize_accelerator(gpu)
        self.fallback = [a for a in map(normalize_accelerator, fallback) if a != self.gpu]
        self.high_memory = high_memory
        #: Colab's notebook hash: the same ``notebook_key`` finds the same runtime again.
        self.nbh = notebook_hash(notebook_key)
        self.remote_kernel = remote_kernel
        self.keep_runtime = keep_runtime
        self.keep_alive_interval = keep_alive_interval
        self.idle_timeout = idle_timeout
        self.token_refresh_margin = token_refresh_margin
        self.auth_wait = auth_wait
        self.auth_poll_interval = auth_poll_interval
        self.validate_cert = validate_cert
        self.ca_certs = ca_certs
        self.client_agent = client_agent
        self.description = f"a Colab {_label(self.gpu)} runtime"
        self.assignment: Assignment | None = None
        self.runtime: JupyterBackend | None = None
        #: Keep-alive calls that Colab accepted (for ``status`` and tests).
        self.keep_alives_sent = 0
        self.keep_alive_paused = False
        self._last_activity = time.monotonic()
        self._busy = False
        self._activity: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # --- assignment -----------------------------------------------------------------------------

    async def assign(self) -> Assignment:
        """Get a runtime: the one already assigned to this notebook hash, else a new one."""
        refused: list[ColabError] = []
        for accelerator in [self.gpu, *self.fallback]:
            try:
                assignment = await self.api.assign(self.nbh, accelerator, self.high_memory)
            except (ColabQuotaError, ColabUnavailableError) as exc:
                refused.append(exc)
                if self.fallback:
                    log.warning("%s", exc)
                continue
            break
        else:
            if len(refused) == 1:
                raise refused[0]
            tried = ", ".join(_label(a) for a in [self.gpu, *self.fallback])
            raise type(refused[-1])(
                f"Colab assigned none of the accelerators allowed ({tried}). The last refusal:"
                f" {refused[-1]}"
            )
        if assignment.proxy is None:
            assignment.proxy = await self.api.runtime_proxy(assignment.endpoint)
            if assignment.proxy is None:
                raise ColabRuntimeGoneError(
                    "Colab assigned a runtime and then no longer listed it. Run the cell again."
                )
        log.info(
            "%s Colab runtime %s (%s)",
            "reusing" if assignment.reused else "assigned",
            assignment.endpoint,
            _label(assignment.accelerator),
        )
        self.assignment = assignment
        self.runtime = JupyterBackend(
            assignment.proxy.url,
            None,
            self.remote_kernel,
            validate_cert=self.validate_cert,
            ca_certs=self.ca_certs,
            record_for_reclaim=False,
        )
        self.runtime.description = f"the Colab runtime {assignment.endpoint}"
        self._use_proxy(assignment.proxy)
        self._last_activity = time.monotonic()
        self._start_tasks()
        return assignment

    def _use_proxy(self, proxy: RuntimeProxy) -> None:
        assert self.assignment is not None and self.runtime is not None
        self.assignment.proxy = proxy
        self.runtime.client.base_url = proxy.url
        self.runtime.client.extra_headers = {
            PROXY_TOKEN_HEADER: proxy.token,
            CLIENT_AGENT_HEADER: self.client_agent,
        }

    async def refresh_proxy_token(self) -> bool:
        """List the assignments again for a fresh proxy token; False when the runtime is gone.

        Raises :class:`RemoteError` when Colab could not say (unreachable, credentials).
        """
        if self.assignment is None:
            return False
        proxy = await self.api.runtime_proxy(self.assignment.endpoint)
        if proxy is None:
            return False
        self._use_proxy(proxy)
        log.debug("renewed the runtime proxy token (valid %g s)", proxy.lifetime)
        return True

    async def _ensure_fresh_token(self) -> None:
        proxy = self.assignment.proxy if self.assignment else None
        if proxy is not None and proxy.expires_at - time.monotonic() < min(
            60.0, proxy.lifetime / 4
        ):
            await self._refresh_or_gone()

    async def _refresh_or_gone(self) -> None:
        if not await self.refresh_proxy_token():
            endpoint = self.assignment.endpoint if self.assignment else "?"
            self._drop_assignment()
            raise ColabRuntimeGoneError(
                f"The Colab runtime {endpoint} is gone (Colab reclaimed it, or it was released):"
                " its variables are lost. Run the cell again for a fresh runtime."
            )

    async def _on_runtime(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call`` against the runtime; a refusal (401/403/404) re-lists and retries once."""
        await self._ensure_fresh_token()
        try:
            return await call()
        except (RemoteAuthError, RemoteProtocolError):
            await self._refresh_or_gone()
        try:
            return await call()
        except RemoteAuthError:
            raise ColabAuthError(
                f"{self.description} refused a freshly issued proxy token. Sign in again with"
                " `cgpu-kernel auth login`, then run the cell again."
            ) from None

    def _drop_assignment(self) -> None:
        self._stop_tasks()
        self.assignment = None
        if self.runtime is not None:
            self.runtime.client.close()
        self.runtime = None

    # --- Backend ------------------------------------------------------------------------------

    async def start_kernel(self) -> str:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            for _ in range(2):
                if self.assignment is None:
                    await self.assign()
                runtime = self.runtime
                assert runtime is not None
                if runtime.kernel_id is not None:
                    health = await self.kernel_health()
                    if health is KernelHealth.ALIVE:
                        return runtime.kernel_id
                    if health is KernelHealth.UNREACHABLE:
                        raise RemoteUnreachableError(
                            f"{self.description} does not answer. Run the cell again to retry."
                        )
                    if health is KernelHealth.AUTH_EXPIRED:
                        raise ColabAuthError(
                            f"{self.description} refused a fresh proxy token. Sign in again"
                            " with `cgpu-kernel auth login`, then run the cell again."
                        )
                    continue  # GONE: kernel_health forgot the kernel or the runtime
                try:
                    kernel_id = await self._on_runtime(runtime.start_kernel)
                except ColabRuntimeGoneError:
                    continue  # reclaimed between assignment and start: assign again
                self.note_activity()  # starting a kernel is use: keep-alive (re)starts
                return kernel_id
        raise ColabRuntimeGoneError(
            "Colab reclaimed the runtime twice while the kernel was starting. Run the cell again."
        )

    def websocket_request(self, session_id: str) -> HTTPRequest:
        if self.runtime is None:
            raise RemoteKernelGoneError("No Colab runtime is assigned yet.")
        return self.runtime.websocket_request(session_id)

    async def interrupt_kernel(self) -> None:
        if self.runtime is None:
            return
        await self._on_runtime(self.runtime.interrupt_kernel)

    async def kernel_health(self) -> KernelHealth:
        runtime = self.runtime
        if self.assignment is None or runtime is None or runtime.kernel_id is None:
            return KernelHealth.GONE
        health = await runtime.kernel_health()
        if health in (KernelHealth.ALIVE, KernelHealth.UNREACHABLE):
            return health
        # 401/403/404: an expired proxy token answers exactly like a dead runtime. Ask Colab.
        try:
            listed = await self.refresh_proxy_token()
        except ColabAuthError:
            return KernelHealth.AUTH_EXPIRED
        except RemoteError as exc:
            log.info("could not list the Colab runtimes: %s", exc)
            return KernelHealth.UNREACHABLE
        if not listed:
            log.warning("the Colab runtime %s is no longer assigned", self.assignment.endpoint)
            self._drop_assignment()
            return KernelHealth.GONE
        health = await runtime.kernel_health()
        if health is KernelHealth.GONE:
            runtime.kernel_id = None  # the runtime lives; only the kernel is gone
        return health

    async def reauthenticate(self) -> bool:
        """Renew the runtime proxy token (and, if refused, the Google access token)."""
        proxy = self.assignment.proxy if self.assignment else None
        old = proxy.token if proxy else None
        try:
            listed = await self.refresh_proxy_token()
        except RemoteError as exc:
            log.warning("could not renew the Colab runtime proxy token: %s", exc)
            return False
        new = self.assignment.proxy if listed and self.assignment else None
        return new is not None and new.token != old

    async def shutdown_kernel(self, *, restart: bool = False) -> None:
        """Delete the kernel; unassign the runtime unless restarting, kept, or still in use.

        Safe to call twice: after the first call this backend holds no runtime, whether it was
        released or kept (a restart must not be followed by a release from the same process).
        """
        self._stop_tasks()
        assignment, runtime = self.assignment, self.runtime
        if assignment is None or runtime is None:
            return
        try:
            if runtime.kernel_id is not None:
                await self._on_runtime(runtime.shutdown_kernel)
        except RemoteError as exc:
            log.warning("could not delete the kernel on the Colab runtime: %s", exc)
        if self.assignment is None:
            return  # the runtime itself is gone: nothing to release
        endpoint = assignment.endpoint
        if restart or self.keep_runtime:
            why = "restarting" if restart else "keep_runtime is set"
            log.info("keeping the Colab runtime %s (%s)", endpoint, why)
            self._drop_assignment()
            return
        try:
            others = await runtime.client.call("GET", "api/kernels")
        except RemoteError:
            others = []
        if isinstance(others, list) and others:
            log.info(
                "not releasing the Colab runtime %s: %d other kernel(s) still run on it",
                endpoint,
                len(others),
            )
            self._drop_assignment()
            return
        try:
            await self.api.unassign(endpoint)
        except RemoteError as exc:
            log.warning(
                "could not release the Colab runtime %s (%s); run `cgpu-kernel release %s`",
                endpoint,
                exc,
                endpoint,
            )
        else:
            log.info("released the Colab runtime %s", endpoint)
        self._drop_assignment()

    async def close(self) -> None:
        self._stop_tasks()
        if self.runtime is not None:
            await self.runtime.close()
        self.api.close()

    # --- activity and keep-alive --------------------------------------------------------------

    def note_activity(self) -> None:
        """The user did something (sent a cell): keep the runtime alive, resuming keep-alive."""
        self._last_activity = time.monotonic()
        if self._activity is not None:
            self._activity.set()

    def idle_for(self) -> float:
        """Seconds since the last sign of use; 0 while a cell runs."""
        return 0.0 if self._busy else time.monotonic() - self._last_activity

    def intercepts(self, msg: Message) -> bool:
        if msg.msg_type == "colab_request":
            return True
        if msg.parent_header.get("msg_type") == "execute_request":
            if msg.msg_type == "status":
                self._busy = msg.content.get("execution_state") == "busy"
            self.note_activity()
        return False

    def _start_tasks(self) -> None:
        self._stop_tasks()
        self._activity = asyncio.Event()
        for coroutine in (self._keep_alive_loop(), self._token_loop()):
            task = asyncio.ensure_future(coroutine)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _stop_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()

    async def _keep_alive_loop(self) -> None:
        assert self._activity is not None
        while self.assignment is not None:
            if self.idle_for() >= self.idle_timeout:
                if not self.keep_alive_paused:
                    self.keep_alive_paused = True
                    log.warning(
                        "no cell has run for %.0f s: stopped keeping the Colab runtime alive so"
                        " Colab can reclaim it; the next cell resumes (if it is still there)",
                        self.idle_for(),
                    )
                self._activity.clear()
                await self._activity.wait()
                continue
            self.keep_alive_paused = False
            try:
                await self.api.keep_alive(self.assignment.endpoint)
                self.keep_alives_sent += 1
            except ColabHTTPError as exc:
                if exc.code == 404:
                    log.warning("Colab no longer knows the runtime: stopped its keep-alive")
                    return
                log.warning("keep-alive for the Colab runtime failed: %s", exc)
            except RemoteError as exc:
                log.warning("keep-alive for the Colab runtime failed: %s", exc)
            self._activity.clear()
            try:
                await asyncio.wait_for(self._activity.wait(), self.keep_alive_interval)
                # activity during the wait: no extra call, just keep the rhythm
                await asyncio.sleep(
                    max(0.0, self.keep_alive_interval - (time.monotonic() - self._last_activity))
                )
            except asyncio.TimeoutError:
                pass

    async def _token_loop(self) -> None:
        while self.assignment is not None and self.assignment.proxy is not None:
            proxy = self.assignment.proxy
            lead = max(proxy.lifetime - self.token_refresh_margin, proxy.lifetime / 2)
            await asyncio.sleep(max(0.0, proxy.obtained_at + lead - time.monotonic()))
            try:
                if not await self.refresh_proxy_token():
                    log.warning("the Colab runtime is no longer listed; stopped renewing its token")
                    return
            except RemoteError as exc:
                log.warning("could not renew the Colab runtime proxy token: %s", exc)
                await asyncio.sleep(min(30.0, max(1.0, proxy.lifetime / 10)))

    # --- colab_request ------------------------------------------------------------------------

    async def answer_kernel_request(
        self, msg: Message, notify: Callable[[str], None]
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
            outcome = await self._propagate(auth_type, notify)
        except Exception as exc:  # an answer must go back, or the cell hangs
            log.warning("credentials propagation failed: %s", exc)
            outcome = f"cgpu-kernel could not pass your Google credentials to the runtime: {exc}"
            notify(f"cgpu-kernel: {outcome}")
        return reply(outcome)

    async def _propagate(self, auth_type: str, notify: Callable[[str], None]) -> str | None:
        """Run credentials propagation; an error text for the kernel, or None on success."""
        if self.assignment is None:
            return "No Colab runtime is assigned to this kernel. Run the cell again."
        endpoint = self.assignment.endpoint
        what = "Google Drive" if auth_type == "dfs_ephemeral" else "your Google account"
        result = await self.api.propagate_credentials(endpoint, auth_type, dryrun=True)
        url = result.get("unauthorized_redirect_uri")
        if isinstance(url, str) and url:
            shown = _safe_link(url)
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


def _safe_link(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOOPBACK):
        return url
    return None
