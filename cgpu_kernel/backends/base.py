"""The one small interface every backend implements.

A backend answers: where is the remote Jupyter server, how do I authenticate to it, how is a
remote kernel started, interrupted, checked and stopped. The proxy kernel (``proxy.kernel`` and
``proxy.supervisor``) calls these methods from its event loop; the relay never sees a backend.

Backends: ``jupyter`` (any Jupyter server or gateway), ``local`` (a private jupyter-server on
loopback, the embedded default), ``colab`` (a Colab runtime: assignment, keep-alive and
proxy-token refresh wrap the same Jupyter REST and WebSocket calls).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from cgpu_kernel.core.wire import Message
from cgpu_kernel.exceptions import ContentsUnsupportedError

#: Seconds on top of a backend's ``launch_timeout`` for the start request and the proxy's
#: startup deadline (the gateway answers after the launch; the channels still have to open).
LAUNCH_SLACK = 30.0


class KernelHealth(Enum):
    """What the remote server says about our kernel, asked after a connection dropped."""

    ALIVE = "alive"
    GONE = "gone"  # deleted, dead, or the server restarted without it
    AUTH_EXPIRED = "auth_expired"  # credentials refused: re-authenticate before judging
    UNREACHABLE = "unreachable"  # the server did not answer at all


@dataclass(frozen=True)
class WebSocketTarget:
    """Where the kernel's channels WebSocket is and how to open it: plain data, no I/O.

    Built by :meth:`Backend.websocket_request`, consumed by
    :meth:`cgpu_kernel.proxy.connection.RemoteChannels.open`. ``headers`` carry the credentials
    (never the URL); ``connect_timeout`` bounds the TCP/TLS connection, ``handshake_timeout``
    the whole opening.
    """

    url: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    validate_cert: bool = True
    ca_certs: str | None = None
    connect_timeout: float = 20.0
    handshake_timeout: float = 20.0


@dataclass(frozen=True)
class ContentsTarget:
    """Where the remote kernel's files are: the server's Contents API and the kernel's folder.

    Built by :meth:`Backend.contents_target`, used by
    :class:`cgpu_kernel.backends.contents.ContentsClient` (the ``%cgpu`` magic, ``cgpu-kernel
    files``). ``headers`` is called per request, so a renewed token is used at once; ``cwd`` is
    the kernel's working directory as a Contents API path (``""``: the server's root).
    """

    base_url: str
    headers: Callable[[], Mapping[str, str]] = field(repr=False)
    cwd: str = ""
    validate_cert: bool = True
    ca_certs: str | None = None
    name: str = "the remote Jupyter server"


class Notify(Protocol):
    """Shows a line from the proxy in the output of the cell a remote request belongs to."""

    def __call__(self, text: str, *, link: str | None = None) -> None: ...


class BackendOptions(Protocol):
    """The options a backend reads in :meth:`Backend.from_options`.

    :class:`cgpu_kernel.proxy.options.ProxyKernel` has them all (each is a trait there, with its
    help text); the protocol keeps ``backends`` from importing the proxy.
    """

    @property
    def url(self) -> str: ...
    @property
    def remote_kernel(self) -> str: ...
    @property
    def local_server(self) -> str: ...
    @property
    def local_server_idle_timeout(self) -> float: ...
    @property
    def validate_cert(self) -> bool: ...
    @property
    def ca_certs(self) -> str: ...
    @property
    def request_timeout(self) -> float: ...
    @property
    def colab_url(self) -> str: ...
    @property
    def gpu(self) -> str: ...
    @property
    def high_memory(self) -> bool: ...
    @property
    def gpu_fallback(self) -> str: ...
    @property
    def keep_runtime(self) -> bool: ...
    @property
    def keep_alive_interval(self) -> float: ...
    @property
    def idle_timeout(self) -> float: ...
    @property
    def colab_auth_wait(self) -> float: ...
    @property
    def colab_client_agent(self) -> str: ...
    @property
    def colab_runtime_version(self) -> str: ...
    @property
    def colab_endpoint(self) -> str: ...

    def token_provider(self) -> Callable[[], str | None]:
        """Reads the remote server's token anew on each call (token file, else CGPU_TOKEN)."""
        ...

    def notebook_key(self) -> str | None:
        """Which Colab runtime is this notebook's (the option, else the connection file)."""
        ...

    def remote_kernel_env(self) -> dict[str, str]:
        """The ``KERNEL_*`` variables of the remote kernel's start request (never the token)."""
        ...


class Backend(abc.ABC):
    """How one proxy kernel finds, starts, and stops its remote kernel."""

    #: Shown to the user in notices and errors; never contains a secret.
    description: str = "the remote kernel"
    #: Seconds the remote server was told it may take to launch a kernel (a gateway's
    #: ``KERNEL_LAUNCH_TIMEOUT``), or None: the proxy's startup deadline is at least that.
    launch_timeout: float | None = None

    @classmethod
    def from_options(cls, options: BackendOptions) -> Backend:
        """The backend the proxy kernel's options describe (called by ``make_backend``).

        Raises :class:`~cgpu_kernel.exceptions.ConfigurationError` for options that cannot work.
        """
        raise NotImplementedError(f"{cls.__name__} is not built from options")

    @abc.abstractmethod
    async def start_kernel(self) -> str:
        """Make sure a remote kernel exists and return its id.

        Called by the proxy when it first needs the remote and again after the remote kernel was
        lost. Raises :class:`~cgpu_kernel.exceptions.RemoteError` subclasses with messages that
        say what to do.
        """

    @abc.abstractmethod
    def websocket_request(self, session_id: str) -> WebSocketTarget:
        """Where and how to open the kernel's channels WebSocket (URL, headers, TLS options)."""

    @abc.abstractmethod
    async def interrupt_kernel(self) -> None:
        """Interrupt the running cell (REST), so it works even when the kernel is busy."""

    @abc.abstractmethod
    async def kernel_health(self) -> KernelHealth:
        """Ask the server whether our kernel still exists (after a dropped connection)."""

    def intercepts(self, msg: Message) -> bool:
        """True for remote messages this backend answers itself instead of the frontend.

        The Colab backend claims ``colab_request`` (Drive and user-auth credentials), which no
        generic frontend understands. Called by the (sans-I/O) relay for every remote message:
        a pure predicate, cheap, that changes no state; what the backend learns from a message
        it learns in :meth:`observe`.
        """
        return False

    def announce_to(self, announce: Callable[[str], None]) -> None:  # noqa: B027 - optional
        """Receive the proxy's way to tell the user something outside any request (called once
        by ``proxy.kernel`` at start). The Colab backend says here, before its keep-alive
        stops, that the runtime may be reclaimed and how to keep it."""

    def observe(self, msg: Message) -> None:  # noqa: B027 - optional hook, nothing by default
        """See a message from the remote kernel (every one, before the relay routes it).

        Called by the proxy's I/O shell; the Colab backend tells activity from idleness here
        (keep-alive). Keep it cheap.
        """

    async def answer_kernel_request(self, msg: Message, notify: Notify) -> dict[str, Any] | None:
        """The ``input_reply`` content answering an intercepted ``msg``; None when the kernel
        expects no answer (Colab's fire-and-forget requests), so nothing is sent.

        ``notify(text, link=...)`` shows a short line in the cell's output (``link``: a URL the
        user must open, shown clickable where the frontend renders HTML). Only called for
        messages :meth:`intercepts` claimed.
        """
        raise NotImplementedError

    def contents_target(self) -> ContentsTarget:
        """The remote server's Contents API and the kernel's folder in it (for ``%cgpu``).

        Called by ``proxy.files`` once the kernel was started. Raises
        :exc:`~cgpu_kernel.exceptions.ContentsUnsupportedError` saying why when this backend
        has no files to reach.
        """
        raise ContentsUnsupportedError(
            f"{self.description} offers no way to reach its files (no Contents API)."
        )

    async def reauthenticate(self) -> bool:
        """Refresh expired credentials; True when there is something new worth retrying with.

        The Colab backend refreshes its runtime proxy token here; a plain Jupyter server token
        cannot be refreshed, so the default says no.
        """
        return False

    @abc.abstractmethod
    async def shutdown_kernel(self, *, restart: bool = False) -> None:
        """Delete the remote kernel (and anything started for it). Safe to call twice."""

    async def close(self) -> None:  # noqa: B027 - optional hook with nothing to do by default
        """Release clients and helpers at process exit, after :meth:`shutdown_kernel`."""
