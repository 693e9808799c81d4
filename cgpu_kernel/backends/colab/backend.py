"""The ``colab`` backend: a Google Colab runtime behind the proxy kernel (the state machine).

Every Colab detail lives in this package (FIELD-NOTES section 4): the JSON's shapes in
:mod:`.models`, the ``tun/m`` calls in :mod:`.api`, keep-alive in :mod:`.keepalive`,
``colab_request`` in :mod:`.credentials`, Google sign-in in :mod:`.auth`. The endpoints are
undocumented and change, so both base URLs are constructor arguments (the Colab service, and
whatever ``runtimeProxyInfo.url`` the assignment names) and the tests point them at a loopback
double.

What it does, in order:

* **Assignment.** ``GET tun/m/assign?nbh=...`` returns the runtime already assigned to this
  notebook hash (reused: no second runtime is paid for), or an XSRF token that a ``POST`` of the
  same URL with ``X-Goog-Colab-Token`` turns into a new assignment. The accelerator comes from
  ``gpu`` (``T4``, ``L4``, ``G4``, ``A100``, ``H100``, TPUs ``V5E1``/``V6E1``, or ``none``), high
  memory from ``high_memory`` (``shape=hm``, never sent for L4 and TPUs, which come on one machine
  only: colab-vscode ``buildAssignUrl``); other accelerators are tried only when the user listed
  them in ``fallback``. Each refusal (no quota, not entitled (400), denied, too many runtimes or
  usage limit (412), accelerator unavailable (503)) is its own error that says what to do.
  ``colab_endpoint`` attaches to a runtime that already exists instead (never released).
* **The runtime** is a Jupyter server at ``runtimeProxyInfo.url``: a :class:`JupyterBackend`
  does the kernel REST calls and builds the WebSocket request, with
  ``X-Colab-Runtime-Proxy-Token`` and ``X-Colab-Client-Agent`` in its ``extra_headers`` (never
  in a URL). The proxy token is short-lived: a background task renews it ahead of expiry from
  the dedicated ``runtime-proxy-token`` endpoint (never from the listing), and
  a 401/404 from the runtime is never taken for a dead runtime before the assignments have been
  listed again (an expired token answers exactly like a deleted runtime).
* **Keep-alive.** ``GET tun/m/<endpoint>/keep-alive/`` every ``keep_alive_interval`` seconds
  while the kernel is in use; after ``idle_timeout`` seconds without a running cell it stops, so
  an abandoned notebook stops burning compute units (Colab reclaims the idle runtime). Activity
  is seen in the remote's messages (:meth:`ColabBackend.observe` sees every one) and can be
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
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from cgpu_kernel.backends.base import (
    Backend,
    BackendOptions,
    ContentsTarget,
    KernelHealth,
    Notify,
    WebSocketTarget,
)
from cgpu_kernel.backends.colab.api import (
    CLIENT_AGENT,
    CLIENT_AGENT_HEADER,
    KEEP_ALIVE_TIMEOUT,
    PROXY_TOKEN_HEADER,
    ColabAPI,
)
from cgpu_kernel.backends.colab.auth import load_tokens
from cgpu_kernel.backends.colab.credentials import Credentials
from cgpu_kernel.backends.colab.keepalive import KeepAlive
from cgpu_kernel.backends.colab.models import (
    DEFAULT_COLAB_URL,
    AccessTokens,
    Assignment,
    RuntimeProxy,
    check_name,
    ignores_high_memory,
    label,
    normalize_accelerator,
    notebook_hash,
)
from cgpu_kernel.backends.jupyter import JupyterBackend
from cgpu_kernel.core.wire import Message
from cgpu_kernel.exceptions import (
    ColabAuthError,
    ColabError,
    ColabQuotaError,
    ColabRuntimeGoneError,
    ColabTooManyRuntimesError,
    ColabUnavailableError,
    ConfigurationError,
    ContentsUnsupportedError,
    RemoteAuthError,
    RemoteError,
    RemoteKernelGoneError,
    RemoteProtocolError,
    RemoteUnreachableError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


#: The Colab kernel's working directory (/content) as a Contents API path.
COLAB_KERNEL_FOLDER = "content"


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
        auth_wait: float = 100.0,
        auth_poll_interval: float = 3.0,
        validate_cert: bool = True,
        ca_certs: str | None = None,
        client_agent: str = CLIENT_AGENT,
        runtime_version: str = "",
        endpoint: str = "",
        keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT,
    ) -> None:
        client_agent = client_agent.strip() or CLIENT_AGENT
        self.api = ColabAPI(
            tokens,
            colab_url,
            client_agent=client_agent,
            validate_cert=validate_cert,
            ca_certs=ca_certs,
            keep_alive_timeout=keep_alive_timeout,
        )
        #: ``runtime_version_label`` to pin (colab-vscode ``buildAssignUrl``); empty: latest.
        self.runtime_version = runtime_version.strip()
        #: An existing runtime to attach to instead of assigning one (never released by us).
        self.attach_endpoint = endpoint.strip()
        if self.attach_endpoint:
            try:
                check_name(self.attach_endpoint, "endpoint")
            except RemoteError:
                raise ConfigurationError(
                    f"colab_endpoint {endpoint!r} is not a Colab endpoint name (`cgpu-kernel"
                    " status` lists this account's runtimes)."
                ) from None
        self.gpu = normalize_accelerator(gpu)
        self.fallback = [a for a in map(normalize_accelerator, fallback) if a != self.gpu]
        self.high_memory = high_memory
        #: Colab's notebook hash: the same ``notebook_key`` finds the same runtime again.
        self.nbh = notebook_hash(notebook_key)
        self.remote_kernel = remote_kernel
        self.keep_runtime = keep_runtime
        self.token_refresh_margin = token_refresh_margin
        self.validate_cert = validate_cert
        self.ca_certs = ca_certs
        self.client_agent = client_agent
        self.description = f"a Colab {label(self.gpu)} runtime"
        self.assignment: Assignment | None = None
        self.runtime: JupyterBackend | None = None
        self.keepalive = KeepAlive(
            self.api, interval=keep_alive_interval, idle_timeout=idle_timeout
        )
        self.credentials = Credentials(
            self.api, auth_wait=auth_wait, auth_poll_interval=auth_poll_interval
        )
        self._lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_options(cls, options: BackendOptions) -> ColabBackend:
        """The ``colab_*``/``gpu*``/keep-alive options, and the Google sign-in (:mod:`.auth`)."""
        return cls(
            load_tokens(),
            colab_url=options.colab_url,
            gpu=options.gpu,
            high_memory=options.high_memory,
            fallback=[name for name in options.gpu_fallback.split(",") if name.strip()],
            notebook_key=options.notebook_key(),
            remote_kernel=options.remote_kernel,
            keep_runtime=options.keep_runtime,
            keep_alive_interval=options.keep_alive_interval,
            idle_timeout=options.idle_timeout,
            auth_wait=options.colab_auth_wait,
            validate_cert=options.validate_cert,
            ca_certs=options.ca_certs or None,
            client_agent=options.colab_client_agent,
            runtime_version=options.colab_runtime_version,
            endpoint=options.colab_endpoint,
        )

    # --- assignment -----------------------------------------------------------------------------

    async def _attach(self) -> Assignment:
        """The runtime ``colab_endpoint`` names, from this account's listing (a runtime started
        in a browser or by another kernel); its proxy token from the dedicated endpoint."""
        endpoint = self.attach_endpoint
        for item in await self.api.assignments():
            if item.get("endpoint") == endpoint:
                assignment = Assignment.parse(item, self.api.base_url, reused=True, attached=True)
                assignment.proxy = None  # the listing's token may be the first, old one
                return assignment
        raise ColabRuntimeGoneError(
            f"The Colab runtime {endpoint} (colab_endpoint) is not assigned to this account."
            " `cgpu-kernel status` lists the runtimes you can attach to; clear colab_endpoint"
            " to have one assigned."
        )

    async def _assign_with_fallback(self) -> Assignment:
        """The first accelerator of ``[gpu, *fallback]`` Colab assigns (refusals that another
        accelerator may not get: quota, not entitled (400), 412, unavailable (503))."""
        refused: list[ColabError] = []
        for accelerator in [self.gpu, *self.fallback]:
            if self.high_memory and ignores_high_memory(accelerator):
                log.warning(
                    "%s comes on one machine shape only: asking without high memory (shape)",
                    accelerator,
                )
            try:
                assignment = await self.api.assign(
                    self.nbh, accelerator, self.high_memory, self.runtime_version
                )
            except (ColabQuotaError, ColabUnavailableError, ColabTooManyRuntimesError) as exc:
                refused.append(exc)
                if self.fallback:
                    log.warning("%s", exc)
                continue
            break
        else:
            last = refused[-1]
            text = str(last)
            if len(refused) > 1:
                tried = ", ".join(label(a) for a in [self.gpu, *self.fallback])
                text = (
                    f"Colab assigned none of the accelerators allowed ({tried}). The last"
                    f" refusal: {text}"
                )
            raise type(last)(text + await self._entitlements()) from None
        return assignment

    async def _entitlements(self) -> str:
        """What the account may ask for, to add to a refusal; "" when Colab does not say.

        colab-vscode asks ``v1/user-info`` for this; its host may refuse our tokens
        (google-colab-cli AGENTS.md), so a refusal here only leaves the sentence out.
        """
        try:
            info = await self.api.user_info()
        except RemoteError as exc:
            log.info("Colab's user-info was not available (%s)", exc)
            return ""
        return " " + info.describe()

    async def assign(self) -> Assignment:
        """Get a runtime: ``colab_endpoint``'s, the one already assigned to this notebook hash,
        else a new one. A reused or attached runtime's token comes from the dedicated
        endpoint (an old one may come with it)."""
        if self.attach_endpoint:
            assignment = await self._attach()
        else:
            assignment = await self._assign_with_fallback()
        if assignment.proxy is None or assignment.reused:
            fresh = await self.api.proxy_token(assignment.endpoint)
            if fresh is None:
                raise ColabRuntimeGoneError(
                    f"Colab no longer has the runtime {assignment.endpoint}. Run the cell again."
                )
            assignment.proxy = fresh
        how = "reusing" if assignment.reused else "assigned"
        log.info(
            "%s Colab runtime %s (%s; tier %s)",
            "attached to" if assignment.attached else how,
            assignment.endpoint,
            label(assignment.accelerator),
            assignment.tier,
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
        # Colab's kernels keep the folder the runtime gives them (/content): no ``path`` sent,
        # and no %cgpu files until that folder's Contents path is known (see contents_target)
        self.runtime.kernel_path = None
        self._use_proxy(assignment.proxy)
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
        """A fresh proxy token from the dedicated endpoint, once the listing says the runtime is
        still assigned (:meth:`ColabAPI.runtime_proxy`); False when the runtime is gone.

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

    def contents_target(self) -> ContentsTarget:
        """The runtime's Contents API, through the runtime proxy (its token header, refreshed
        in place, is read per request). The kernel's folder is ``/content``: the Contents
        path ``content``, the folder Google's VS Code extension mounts
        (colab-vscode ``src/jupyter/contents/file-system.ts``, ``mount``)."""
        if self.runtime is None:
            raise ContentsUnsupportedError(
                "No Colab runtime is assigned yet: run a cell first, then the transfer again."
            )
        client = self.runtime.client
        return ContentsTarget(
            client.base_url,
            client.headers,
            cwd=COLAB_KERNEL_FOLDER,
            validate_cert=client.validate_cert,
            ca_certs=client.ca_certs,
            name=self.runtime.description,
        )

    def websocket_request(self, session_id: str) -> WebSocketTarget:
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
        if restart or self.keep_runtime or assignment.attached:
            why = (
                "restarting"
                if restart
                else "keep_runtime is set"
                if self.keep_runtime
                else "this kernel attached to it, did not assign it"
            )
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
        self.keepalive.note_activity()

    def idle_for(self) -> float:
        """Seconds since the last sign of use; 0 while a cell runs."""
        return self.keepalive.idle_for()

    @property
    def keep_alives_sent(self) -> int:
        """Keep-alive calls that Colab accepted (for ``status`` and tests)."""
        return self.keepalive.sent

    @property
    def keep_alive_paused(self) -> bool:
        """True while idleness has stopped the keep-alive calls."""
        return self.keepalive.paused

    def intercepts(self, msg: Message) -> bool:
        """``colab_request`` is ours to answer (:meth:`answer_kernel_request`); pure."""
        return msg.msg_type == "colab_request"

    def announce_to(self, announce: Callable[[str], None]) -> None:
        """The coming keep-alive stop goes to the user, not only the log (colab-vscode
        ``keep-alive.ts`` asks the user before it stops)."""
        self.keepalive.announce = announce

    def observe(self, msg: Message) -> None:
        """Every remote message: a user's cell running is use (keep-alive)."""
        self.keepalive.observe(msg)

    def _start_tasks(self) -> None:
        self._stop_tasks()
        assert self.assignment is not None
        for coroutine in (self.keepalive.run(self.assignment.endpoint), self._token_loop()):
            task = asyncio.ensure_future(coroutine)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _stop_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()

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

    async def answer_kernel_request(self, msg: Message, notify: Notify) -> dict[str, Any] | None:
        """Answer Colab's ``colab_request`` (:mod:`.credentials`; None: no answer expected); a
        request during a cell is use, so keep-alive hears of it."""
        self.note_activity()  # code is running in the runtime
        endpoint = self.assignment.endpoint if self.assignment else None
        return await self.credentials.answer(msg, endpoint, notify)
