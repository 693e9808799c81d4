"""TEST DOUBLE of Google Colab's runtime service. This is NOT Colab and proves nothing about it.

Written from ``../shared/FIELD-NOTES.md`` section 4 and from what Google's own clients send and
expect: colab-vscode (``googlecolab/colab-vscode``, TypeScript: **VSC**), google-colab-cli
(``googlecolab/google-colab-cli``, Python, whose ``AGENTS.md`` records what was verified live:
**CLI**), colabtools (``googlecolab/colabtools``, the code inside the runtime: **CT**). The real
service cannot be reached from the test machines. What it reproduces, and from where:

* every ``tun/m`` call wants ``authuser=0``, ``Authorization: Bearer <access token>`` and
  ``X-Colab-Client-Agent``; every JSON answer starts with the XSSI prefix ``)]}'`` + newline
  (VSC ``src/colab/headers.ts``, ``client/v1/index.ts``; CLI ``client.py``). ``allowed_agents``
  makes it refuse other agents with a 400 naming the client agent (invented wording: no client
  documents how a refused agent is answered);
* assignment (VSC ``client/v1/index.ts`` ``assign``/``buildAssignUrl``, ``api.ts``): ``GET
  tun/m/assign?nbh=...`` returns the runtime already assigned to that notebook hash, else an
  XSRF token that must come back in ``X-Goog-Colab-Token`` on the ``POST``; outcomes 1/2 (no
  quota) and 5 (denied) per ``api.ts`` ``Outcome``; ``variant`` 1 for GPUs, 2 for TPUs, 0 CPU;
  ``runtime_version_label`` accepted and recorded. L4 and TPUs come on one shape only
  (``HIGHMEM_ONLY_ACCELERATORS``): a ``shape=hm`` for them is refused with 400 (Google's
  clients never send it; the 400 is the issue's model, not observed);
* refusals: HTTP 412 for ``assign_status=412`` (too many assignments: VSC ``assignments.ts``,
  CLI ``client.py``) and per accelerator for ``usage_limited`` (a free account's GPU usage limit
  while CPU works: reported in google-colab-cli issue 73, unverified); HTTP 400 for
  ``not_entitled`` accelerators (CLI ``commands/session.py``); HTTP 503 for ``unavailable``
  (VSC ``AcceleratorUnavailableError``);
* unassign (``GET`` then XSRF ``POST``: VSC and CLI ``unassign``); ``tun/m/assignments`` (CLI
  ``client.py``) lists each runtime with the proxy token issued **at assignment** (old, and
  expired after its lifetime: no client refreshes from it);
* ``tun/m/runtime-proxy-token?endpoint=&port=8080`` (VSC ``refreshConnection`` before 2026-02)
  demands ``X-Colab-Tunnel: Google`` (400 without: CLI says so of ``/tun/m`` TFE paths) and
  answers ``{token, tokenExpiresInSeconds, url}``;
* keep-alive (VSC ``sendKeepAlive``, CLI ``keep_alive_assignment``) wants ``X-Colab-Tunnel:
  Google``, counts every ping on arrival, and with ``keep_alive_answer_every`` (0: never, n:
  every n-th) holds the others open without an answer, as the live runtime often does (CLI
  AGENTS.md, verified live 2026-06-15);
* credentials propagation (VSC ``src/auth/ephemeral.ts``, ``propagateCredentials``): GET for an
  XSRF token, POST it; ``needs_user``: a dry run (and a real run) before consent answers
  ``{success: false, unauthorized_redirect_uri}``, the test opens that URL (standing in for the
  user), after which both succeed; every call is recorded in ``propagation_calls``;
* the runtime proxy at ``runtimeProxyInfo.url`` (``/runtime/<endpoint>/``): it checks the
  short-lived ``X-Colab-Runtime-Proxy-Token`` on every REST call and WebSocket upgrade (an
  expired or unknown token gets 404, like a dead runtime, or 401 if configured), and proxies
  ``/api/...`` and the kernel channels WebSocket to a REAL jupyter-server. Optionally it closes
  a WebSocket when the token that opened it expires (the harshest thing a real proxy could do).
  ``api/colab/resources`` answers in VSC's shape (``memory``, ``gpus[{memoryUsedBytes, ...}]``).
* ``v1/user-info`` (VSC ``client/v1/index.ts`` ``getUserInfo``, schema in ``api.ts``
  ``UserInfoSchema``; on Google's API host, so no ``authuser``): by default refused with 403
  ``USER_PROJECT_DENIED``, as CLI AGENTS.md found that host answering ordinary user tokens; with
  ``user_info`` set, that answer. Assignments carry ``subTier`` (``api.ts``: 0 unknown, 1 Pro,
  2 Pro+) from ``sub_tier``.

:data:`COLAB_REQUEST_HELPER` is code for the *remote* ipykernel that sends ``colab_request``
the way colabtools does (CT ``google/colab/_message.py``): on **iopub**, a ``parent_header``
holding only the session (``drive.mount``, ``auth.authenticate_user``) or the cell's full
parent with no ``colab_msg_id`` (``_system_commands.py``'s fire-and-forget ``cell_*_stdin``
around a ``!command``), and reads the answer from stdin as ``read_reply_from_input`` does (any
message's ``content.value``; None on time-out; ``MessageError`` on ``error``). Written from
those facts, not copied.

The double runs its own tornado IOLoop in a thread, on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from tornado import httpclient, web, websocket
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.netutil import bind_sockets

XSSI = b")]}'\n"

COLAB_REQUEST_HELPER = r"""
def _colab_messaging():
    # The shape of colabtools' google/colab/_message.py (send_request, read_reply_from_input,
    # blocking_request), written from its facts for a plain ipykernel.
    import itertools, time
    import zmq

    class MessageError(Exception):
        pass

    ids = itertools.count(1)

    def send_request(request_type, body, parent=None, expect_reply=True):
        kernel = get_ipython().kernel
        metadata = {"colab_request_type": request_type}
        request_id = None
        if expect_reply:
            request_id = next(ids)
            metadata["colab_msg_id"] = request_id  # an int
        if parent is None:
            cell = kernel.get_parent("shell")
            parent = {"header": {"session": cell["header"]["session"]}} if cell else None
        msg = kernel.session.msg(
            "colab_request", content={"request": body}, metadata=metadata, parent=parent
        )
        kernel.session.send(kernel.iopub_socket, msg)
        return request_id

    def read_reply_from_input(request_id, timeout_sec=None):
        kernel = get_ipython().kernel
        deadline = time.time() + timeout_sec if timeout_sec else None
        while deadline is None or time.time() < deadline:
            try:
                _, reply = kernel.session.recv(kernel.stdin_socket, zmq.NOBLOCK)
            except Exception:
                reply = None
            value = reply.get("content", {}).get("value", "") if reply else None
            if not isinstance(value, dict):
                time.sleep(0.025)
                continue
            if value.get("type") == "colab_reply" and value.get("colab_msg_id") == request_id:
                if "error" in value:
                    raise MessageError(value["error"])
                return value.get("data", None)
        return None

    def blocking_request(request_type, request="", timeout_sec=5, parent=None):
        return read_reply_from_input(
            send_request(request_type, request, parent=parent), timeout_sec
        )

    return MessageError, send_request, blocking_request


MessageError, send_request, blocking_request = _colab_messaging()


def drive_mount_request(timeout_ms=120000):
    # drive.py _mount: request_auth dfs_ephemeral, session-only parent, timeout_ms/1000
    return blocking_request(
        "request_auth", {"authType": "dfs_ephemeral"}, timeout_sec=timeout_ms / 1000
    )


def authenticate_user_request():
    # auth.py authenticate_user with USE_AUTH_EPHEM=1: auth_user_ephemeral, no timeout
    return blocking_request("request_auth", {"authType": "auth_user_ephemeral"}, timeout_sec=None)


def colab_request(request_type, request, timeout=60.0):
    return blocking_request(request_type, request, timeout_sec=timeout)


def shell_command(command):
    # _system_commands.py _run_command: cell_display_stdin, cell_update_stdin (echo state),
    # the output, cell_remove_stdin; fire-and-forget, with the cell's full parent
    import subprocess, sys
    cell = get_ipython().kernel.get_parent("shell")
    send_request("cell_display_stdin", {"delayMillis": 500}, parent=cell, expect_reply=False)
    send_request("cell_update_stdin", {"echo": True}, parent=cell, expect_reply=False)
    out = subprocess.run(command, shell=True, capture_output=True, text=True).stdout
    sys.stdout.write(out)
    sys.stdout.flush()
    send_request("cell_remove_stdin", {}, parent=cell, expect_reply=False)
"""


#: Accelerators that come on one (high-memory) shape only (VSC ``api.ts``).
HIGHMEM_ONLY = {"L4", "V28", "V5E1", "V6E1"}
TPUS = {"V28", "V5E1", "V6E1"}


@dataclass
class Runtime:
    endpoint: str
    nbh: str
    accelerator: str
    shape: str
    created: float = field(default_factory=time.monotonic)
    runtime_version: str = ""
    #: ``runtimeProxyInfo`` issued at assignment: what the listing keeps returning
    first_proxy_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProxyToken:
    endpoint: str
    expires_at: float


class ColabDouble:
    """The double's state; tests change its knobs and read its counters directly."""

    def __init__(
        self,
        jupyter_url: str,
        jupyter_token: str,
        *,
        access_token: str = "test-google-access-token",
        proxy_token_ttl: float = 3600.0,
    ) -> None:
        self.jupyter_url = jupyter_url.rstrip("/") + "/"
        self.jupyter_token = jupyter_token
        self.access_tokens = {access_token}
        self.refresh_tokens: set[str] = set()  # accepted by /token (a stand-in for Google's)
        self.token_refreshes = 0
        self.auth_codes: set[str] = set()
        self.proxy_token_ttl = proxy_token_ttl
        # knobs
        self.outcome = 4
        self.assign_status: int | None = None  # e.g. 412 or 503 on the POST
        self.unavailable: set[str] = set()  # accelerators answered with 503
        self.no_quota: set[str] = set()  # accelerators answered with outcome 2
        self.usage_limited: set[str] = set()  # accelerators answered with 412 (free tier)
        self.not_entitled: set[str] = set()  # accelerators answered with 400
        self.allowed_agents: set[str] | None = None  # None: any non-empty agent
        self.keep_alive_answer_every = 1  # 0: never answer; n: answer every n-th ping
        self.expired_status = 404
        self.close_websockets_on_expiry = False
        self.list_proxy_info = True  # False: listings lack runtimeProxyInfo
        self.credentials_mode = "authorized"  # or "needs_user", "error"
        self.user_info: dict[str, Any] | None = None  # None: v1/user-info refused (403)
        self.sub_tier = 0
        # state and counters
        self.user_info_queries: list[str] = []
        self.runtimes: dict[str, Runtime] = {}
        self.proxy_tokens: dict[str, ProxyToken] = {}
        self.xsrf: dict[str, str] = {}  # token -> what it allows
        self.keep_alives: Counter[str] = Counter()
        self.granted: set[tuple[str, str]] = set()
        self.propagated: list[tuple[str, str]] = []
        self.propagation_calls: list[tuple[str, bool]] = []  # (auth type, dry run) per POST
        self.assign_queries: list[dict[str, str]] = []  # every POST assign's query
        self.proxy_token_refreshes = 0
        self.keep_alive_times: list[float] = []
        self.released: list[str] = []
        self.calls: list[tuple[str, str]] = []
        self.seen_headers: list[dict[str, str]] = []
        self.refused_proxy_calls = 0
        self.websockets_opened = 0
        self.websockets_closed_on_expiry = 0
        self._counter = 0
        self._loop: IOLoop | None = None
        self._server: HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> ColabDouble:
        sockets = bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(asyncio.new_event_loop())
            self._loop = IOLoop.current()
            self._server = HTTPServer(self.application(), max_buffer_size=1 << 30)
            self._server.add_sockets(sockets)
            ready.set()
            self._loop.start()

        self._thread = threading.Thread(target=run, name="colab-double", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        loop, server = self._loop, self._server

        def shutdown() -> None:
            if server is not None:
                server.stop()
            loop.stop()

        loop.add_callback(shutdown)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def reset(self) -> None:
        """Knobs back to defaults, runtimes released (between tests)."""
        self.outcome = 4
        self.assign_status = None
        self.unavailable.clear()
        self.no_quota.clear()
        self.usage_limited.clear()
        self.not_entitled.clear()
        self.allowed_agents = None
        self.keep_alive_answer_every = 1
        self.propagation_calls.clear()
        self.assign_queries.clear()
        self.proxy_token_refreshes = 0
        self.keep_alive_times.clear()
        self.expired_status = 404
        self.close_websockets_on_expiry = False
        self.list_proxy_info = True
        self.credentials_mode = "authorized"
        self.user_info = None
        self.sub_tier = 0
        self.runtimes.clear()
        self.proxy_tokens.clear()
        self.keep_alives.clear()
        self.granted.clear()
        self.propagated.clear()
        self.released.clear()

    # --- helpers for handlers and tests ----------------------------------------------------

    def new_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}-{self._counter}-{secrets.token_hex(4)}"

    def mint_proxy_token(self, endpoint: str) -> dict[str, Any]:
        token = secrets.token_urlsafe(24)
        self.proxy_tokens[token] = ProxyToken(endpoint, time.monotonic() + self.proxy_token_ttl)
        return {
            "url": f"{self.url}runtime/{endpoint}/",
            "token": token,
            "tokenExpiresInSeconds": self.proxy_token_ttl,
        }

    def add_runtime(self, accelerator: str = "T4", *, nbh: str = "", shape: str = "") -> Runtime:
        """A runtime assigned outside the kernel (Colab in a browser, another client)."""
        accelerator = accelerator.upper()
        endpoint = self.new_id(f"gpu-{accelerator.lower()}-s")
        runtime = Runtime(
            endpoint, nbh or ("browser_" + secrets.token_hex(16)).ljust(44, "."), accelerator, shape
        )
        runtime.first_proxy_info = self.mint_proxy_token(endpoint)
        self.runtimes[endpoint] = runtime
        return runtime

    def assignment_json(self, runtime: Runtime) -> dict[str, Any]:
        """The POST assign answer (VSC ``api.ts`` assignment schema); the proxy info is the one
        issued at assignment."""
        accelerator = runtime.accelerator
        return {
            "accelerator": accelerator,
            "endpoint": runtime.endpoint,
            "fit": 5400,
            "sub": 1,
            "subTier": self.sub_tier,
            "outcome": 4,
            "variant": 0 if accelerator == "NONE" else 2 if accelerator in TPUS else 1,
            "machineShape": 1 if runtime.shape == "hm" or accelerator in HIGHMEM_ONLY else 0,
            "runtimeProxyInfo": dict(runtime.first_proxy_info),
        }

    def expire_proxy_tokens(self) -> None:
        """Every proxy token issued so far stops working now."""
        for token in self.proxy_tokens.values():
            token.expires_at = 0.0

    def grant_url(self, endpoint: str, auth_type: str) -> str:
        return f"{self.url}consent/{quote(endpoint)}/{quote(auth_type)}"

    def valid_proxy_token(self, endpoint: str, token: str | None) -> ProxyToken | None:
        record = self.proxy_tokens.get(token or "")
        if record is None or record.endpoint != endpoint or endpoint not in self.runtimes:
            return None
        if record.expires_at <= time.monotonic():
            return None
        return record

    def application(self) -> web.Application:
        kwargs = {"double": self}
        return web.Application(
            [
                (r"/tun/m/assign", AssignHandler, kwargs),
                (r"/tun/m/assignments", AssignmentsHandler, kwargs),
                (r"/tun/m/runtime-proxy-token", ProxyTokenHandler, kwargs),
                (r"/tun/m/unassign/([^/]+)", UnassignHandler, kwargs),
                (r"/tun/m/credentials-propagation/([^/]+)", PropagationHandler, kwargs),
                (r"/tun/m/([^/]+)/keep-alive/", KeepAliveHandler, kwargs),
                (r"/v1/user-info", UserInfoHandler, kwargs),
                (r"/consent/([^/]+)/([^/]+)", ConsentHandler, kwargs),
                (r"/token", OAuthTokenHandler, kwargs),
                (r"/o/oauth2/auth", OAuthConsentHandler, kwargs),
                (r"/runtime/([^/]+)/api/kernels/([^/]+)/channels", ChannelsProxy, kwargs),
                (r"/runtime/([^/]+)/api/colab/resources", ResourcesHandler, kwargs),
                (r"/runtime/([^/]+)/(api/.*)", RestProxy, kwargs),
                # assumed, not from Google's clients (they read files through the Contents
                # API's GET): the runtime proxy forwards /files/ like any other path
                (r"/runtime/([^/]+)/(files/.*)", RestProxy, kwargs),
            ],
            websocket_max_message_size=1 << 30,
        )


# --- the Colab service -------------------------------------------------------------------------


class ColabHandler(web.RequestHandler):
    double: ColabDouble

    def initialize(self, double: ColabDouble) -> None:
        self.double = double

    def check_xsrf_cookie(self) -> None:
        return None

    def prepare(self) -> None:
        double = self.double
        double.calls.append((self.request.method or "", self.request.path))
        double.seen_headers.append(dict(self.request.headers))
        if self.get_query_argument("authuser", None) != "0":
            raise web.HTTPError(400, "authuser=0 missing")
        agent = self.request.headers.get("X-Colab-Client-Agent")
        if not agent:
            raise web.HTTPError(400, "X-Colab-Client-Agent missing")
        if double.allowed_agents is not None and agent not in double.allowed_agents:
            raise web.HTTPError(400, reason="Unknown client agent")
        auth = self.request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in double.access_tokens:
            raise web.HTTPError(401)

    def reply(self, data: Any) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(XSSI + json.dumps(data).encode())

    def issue_xsrf(self, purpose: str) -> str:
        token = secrets.token_urlsafe(16)
        self.double.xsrf[token] = purpose
        return token

    def take_xsrf(self, purpose: str) -> None:
        token = self.request.headers.get("X-Goog-Colab-Token", "")
        if self.double.xsrf.pop(token, None) != purpose:
            raise web.HTTPError(400, "bad XSRF token")


class UserInfoHandler(ColabHandler):
    """``v1/user-info`` on Google's API host (VSC ``getUserInfo``): no ``authuser`` there."""

    def prepare(self) -> None:
        self.double.calls.append((self.request.method or "", self.request.path))
        self.double.user_info_queries.append(self.request.query)
        auth = self.request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.double.access_tokens:
            raise web.HTTPError(401)

    def get(self) -> None:
        if self.double.user_info is None:
            self.set_status(403, "Forbidden")
            self.finish(
                {
                    "error": {
                        "code": 403,
                        "status": "PERMISSION_DENIED",
                        "details": [{"reason": "USER_PROJECT_DENIED"}],
                    }
                }
            )
            return
        self.finish(self.double.user_info)


class AssignHandler(ColabHandler):
    def _query(self) -> tuple[str, str, str]:
        nbh = self.get_query_argument("nbh", "")
        if len(nbh) != 44 or "-" in nbh:
            raise web.HTTPError(400, "nbh must be 44 characters, no '-'")
        accelerator = self.get_query_argument("accelerator", "NONE").upper()
        return nbh, accelerator, self.get_query_argument("shape", "")

    def _existing(self, nbh: str) -> Runtime | None:
        return next((r for r in self.double.runtimes.values() if r.nbh == nbh), None)

    def get(self) -> None:
        nbh, accelerator, _shape = self._query()
        runtime = self._existing(nbh)
        if runtime is not None:
            self.reply(self.double.assignment_json(runtime))
            return
        variant = self.get_query_argument("variant", "DEFAULT")
        token = self.issue_xsrf(f"assign:{nbh}")
        self.reply({"acc": accelerator, "nbh": nbh, "p": False, "token": token, "variant": variant})

    def post(self) -> None:
        nbh, accelerator, shape = self._query()
        self.take_xsrf(f"assign:{nbh}")
        double = self.double
        double.assign_queries.append(
            {k: self.get_query_argument(k) for k in self.request.arguments}
        )
        if double.assign_status is not None:
            raise web.HTTPError(double.assign_status)
        if shape == "hm" and accelerator in HIGHMEM_ONLY:
            raise web.HTTPError(400, reason=f"{accelerator} has no high-memory shape")
        if accelerator in double.not_entitled:
            raise web.HTTPError(400)
        if accelerator in double.usage_limited:
            raise web.HTTPError(412)
        if accelerator in double.unavailable:
            raise web.HTTPError(503)
        if accelerator in double.no_quota:
            self.reply({"outcome": 2})
            return
        if double.outcome != 4:
            self.reply({"outcome": double.outcome})
            return
        runtime = double.add_runtime(accelerator, nbh=nbh, shape=shape)
        runtime.runtime_version = self.get_query_argument("runtime_version_label", "")
        self.reply(double.assignment_json(runtime))


class AssignmentsHandler(ColabHandler):
    """``/tun/m/assignments`` (CLI ``client.py``): each runtime with its first proxy token."""

    def get(self) -> None:
        items = []
        for runtime in self.double.runtimes.values():
            item = self.double.assignment_json(runtime)  # the token issued at assignment
            for key in ("fit", "sub", "subTier", "outcome"):
                item.pop(key)
            if not self.double.list_proxy_info:
                item.pop("runtimeProxyInfo")
            items.append(item)
        self.reply({"assignments": items})


class ProxyTokenHandler(ColabHandler):
    """``/tun/m/runtime-proxy-token`` (VSC ``refreshConnection``, 2025-09..2026-02 form)."""

    def get(self) -> None:
        if self.request.headers.get("X-Colab-Tunnel") != "Google":
            raise web.HTTPError(400, "X-Colab-Tunnel: Google missing")
        endpoint = self.get_query_argument("endpoint", "")
        if self.get_query_argument("port", "") != "8080" or endpoint not in self.double.runtimes:
            raise web.HTTPError(404)
        self.double.proxy_token_refreshes += 1
        self.reply(self.double.mint_proxy_token(endpoint))


class UnassignHandler(ColabHandler):
    def get(self, endpoint: str) -> None:
        if endpoint not in self.double.runtimes:
            raise web.HTTPError(404)
        self.reply({"token": self.issue_xsrf(f"unassign:{endpoint}")})

    def post(self, endpoint: str) -> None:
        self.take_xsrf(f"unassign:{endpoint}")
        if self.double.runtimes.pop(endpoint, None) is None:
            raise web.HTTPError(404)
        self.double.released.append(endpoint)
        self.reply({})


class KeepAliveHandler(ColabHandler):
    def initialize(self, double: ColabDouble) -> None:
        super().initialize(double)
        self.gone = asyncio.Event()

    def on_connection_close(self) -> None:
        self.gone.set()

    async def get(self, endpoint: str) -> None:
        if self.request.headers.get("X-Colab-Tunnel") != "Google":
            raise web.HTTPError(400, "X-Colab-Tunnel: Google missing")
        if endpoint not in self.double.runtimes:
            raise web.HTTPError(404)
        double = self.double
        double.keep_alives[endpoint] += 1  # recorded on arrival, as the front door does
        double.keep_alive_times.append(time.monotonic())
        every = double.keep_alive_answer_every
        if every <= 0 or double.keep_alives[endpoint] % every:
            # the runtime never answers: hold the request until the client gives up
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.gone.wait(), 120)
            return
        self.reply({})


class PropagationHandler(ColabHandler):
    def _args(self, endpoint: str) -> tuple[str, bool]:
        if endpoint not in self.double.runtimes:
            raise web.HTTPError(404)
        auth_type = self.get_query_argument("authtype", "")
        if self.get_query_argument("version", "") != "2":
            raise web.HTTPError(400, "version=2 expected")
        return auth_type, self.get_query_argument("dryrun", "") == "true"

    def get(self, endpoint: str) -> None:
        auth_type, _dryrun = self._args(endpoint)
        self.reply({"token": self.issue_xsrf(f"propagate:{endpoint}:{auth_type}")})

    def post(self, endpoint: str) -> None:
        auth_type, dryrun = self._args(endpoint)
        self.take_xsrf(f"propagate:{endpoint}:{auth_type}")
        double = self.double
        double.propagation_calls.append((auth_type, dryrun))
        if double.credentials_mode == "error":
            raise web.HTTPError(500)
        if double.credentials_mode == "needs_user" and (endpoint, auth_type) not in double.granted:
            self.reply(
                {
                    "success": False,
                    "unauthorized_redirect_uri": double.grant_url(endpoint, auth_type),
                }
            )
            return
        if not dryrun:
            double.propagated.append((endpoint, auth_type))
        self.reply({"success": True})


class ConsentHandler(web.RequestHandler):
    """Stands in for Google's consent page: opening the URL grants access."""

    def initialize(self, double: ColabDouble) -> None:
        self.double = double

    def get(self, endpoint: str, auth_type: str) -> None:
        self.double.granted.add((endpoint, auth_type))
        self.finish("access granted (test double)")


class OAuthConsentHandler(web.RequestHandler):
    """Stands in for Google's consent page: it consents at once and redirects to the loopback
    ``redirect_uri`` of the installed-app flow with an authorization code."""

    def initialize(self, double: ColabDouble) -> None:
        self.double = double

    def get(self) -> None:
        redirect_uri = self.get_query_argument("redirect_uri", "")
        scopes = self.get_query_argument("scope", "").split()
        if not redirect_uri.startswith(("http://localhost:", "http://127.0.0.1:")):
            raise web.HTTPError(400, "the redirect must go to loopback")
        if "https://www.googleapis.com/auth/colaboratory" not in scopes:
            raise web.HTTPError(400, "the colaboratory scope is missing")
        code = secrets.token_urlsafe(16)
        self.double.auth_codes.add(code)
        state = quote(self.get_query_argument("state", ""))
        self.redirect(f"{redirect_uri}?code={code}&state={state}&scope={quote(' '.join(scopes))}")


class OAuthTokenHandler(web.RequestHandler):
    """Stands in for Google's OAuth token endpoint: an authorization code (from the consent
    stand-in) or a known refresh token buys an access token the double's Colab accepts."""

    def initialize(self, double: ColabDouble) -> None:
        self.double = double

    def check_xsrf_cookie(self) -> None:
        return None

    def post(self) -> None:
        double = self.double
        grant = self.get_body_argument("grant_type", "")
        answer: dict[str, Any] = {"expires_in": 3600, "token_type": "Bearer"}
        if (
            grant == "authorization_code"
            and self.get_body_argument("code", "") in double.auth_codes
        ):
            double.auth_codes.discard(self.get_body_argument("code"))
            refresh = "1//" + secrets.token_urlsafe(24)
            double.refresh_tokens.add(refresh)
            answer["refresh_token"] = refresh
            # Google's long names for profile and email, as the real endpoint answers
            answer["scope"] = (
                "https://www.googleapis.com/auth/userinfo.profile"
                " https://www.googleapis.com/auth/userinfo.email"
                " https://www.googleapis.com/auth/colaboratory openid"
            )
        elif grant == "refresh_token" and (
            self.get_body_argument("refresh_token", "") in double.refresh_tokens
        ):
            double.token_refreshes += 1
        else:
            self.set_status(400)
            self.finish({"error": "invalid_grant"})
            return
        token = secrets.token_urlsafe(24)
        double.access_tokens.add(token)
        answer["access_token"] = token
        self.finish(answer)


# --- the runtime proxy -------------------------------------------------------------------------


class RuntimeHandlerMixin:
    double: ColabDouble
    request: Any

    def check_proxy_token(self, endpoint: str) -> ProxyToken:
        if not self.request.headers.get("X-Colab-Client-Agent"):
            raise web.HTTPError(400, "X-Colab-Client-Agent missing")
        record = self.double.valid_proxy_token(
            endpoint, self.request.headers.get("X-Colab-Runtime-Proxy-Token")
        )
        if record is None:
            self.double.refused_proxy_calls += 1
            raise web.HTTPError(self.double.expired_status)
        return record


class ResourcesHandler(RuntimeHandlerMixin, web.RequestHandler):
    def initialize(self, double: ColabDouble) -> None:
        self.double = double

    def get(self, endpoint: str) -> None:
        self.check_proxy_token(endpoint)
        data = {  # VSC's resources schema
            "memory": {"totalBytes": 12 * 2**30, "freeBytes": 9 * 2**30},
            "disks": [],
            "gpus": [
                {
                    "name": "Tesla T4",
                    "memoryUsedBytes": 2**30,
                    "memoryTotalBytes": 15 * 2**30,
                    "gpuUtilization": 0,
                    "memoryUtilization": 0,
                    "everUsed": True,
                }
            ],
        }
        self.finish(XSSI + json.dumps(data).encode())


class RestProxy(RuntimeHandlerMixin, web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "POST", "DELETE", "PATCH", "PUT")

    def initialize(self, double: ColabDouble) -> None:
        self.double = double

    def check_xsrf_cookie(self) -> None:
        return None

    async def _forward(self, endpoint: str, path: str) -> None:
        self.check_proxy_token(endpoint)
        method = self.request.method or "GET"
        query = "?" + self.request.query if self.request.query else ""
        request = httpclient.HTTPRequest(
            self.double.jupyter_url + path + query,
            method=method,
            headers={
                "Authorization": f"token {self.double.jupyter_token}",
                "Content-Type": "application/json",
            },
            body=self.request.body if method in ("POST", "PATCH", "PUT") else None,
            allow_nonstandard_methods=True,
            request_timeout=60,
        )
        client = httpclient.AsyncHTTPClient()
        response = await client.fetch(request, raise_error=False)
        self.set_status(response.code if response.code != 599 else 502)
        if response.body:
            self.set_header("Content-Type", response.headers.get("Content-Type", "text/plain"))
            self.finish(response.body)
        else:
            self.finish()

    async def get(self, endpoint: str, path: str) -> None:
        await self._forward(endpoint, path)

    async def post(self, endpoint: str, path: str) -> None:
        await self._forward(endpoint, path)

    async def delete(self, endpoint: str, path: str) -> None:
        await self._forward(endpoint, path)

    async def patch(self, endpoint: str, path: str) -> None:
        await self._forward(endpoint, path)

    async def put(self, endpoint: str, path: str) -> None:  # Contents API saves (VSC writeFile)
        await self._forward(endpoint, path)


class ChannelsProxy(RuntimeHandlerMixin, websocket.WebSocketHandler):
    """The kernel channels WebSocket, relayed frame by frame to the real jupyter-server."""

    def initialize(self, double: ColabDouble) -> None:
        self.double = double
        self.upstream: websocket.WebSocketClientConnection | None = None
        self.record: ProxyToken | None = None
        self.expiry_handle: object | None = None
        self.closing_reason: str | None = None
        self.pump: asyncio.Future[None] | None = None

    def prepare(self) -> None:
        endpoint = self.path_args[0] if self.path_args else ""
        self.record = self.check_proxy_token(endpoint)

    def check_origin(self, origin: str) -> bool:
        return True

    async def open(self, endpoint: str, kernel_id: str) -> None:  # type: ignore[override]
        double = self.double
        url = (
            "ws"
            + double.jupyter_url[4:]
            + f"api/kernels/{kernel_id}/channels?"
            + self.request.query
        )
        request = httpclient.HTTPRequest(
            url, headers={"Authorization": f"token {double.jupyter_token}"}
        )
        try:
            self.upstream = await websocket.websocket_connect(request, max_message_size=1 << 30)
        except Exception:
            self.close(1011, "upstream refused")
            return
        double.websockets_opened += 1
        if double.close_websockets_on_expiry and self.record is not None:
            delay = max(0.0, self.record.expires_at - time.monotonic())
            loop = IOLoop.current()
            self.expiry_handle = loop.call_later(delay, self._expired)
        self.pump = asyncio.ensure_future(self._pump())

    def _expired(self) -> None:
        """Cut the connection as a strict proxy would when the token that opened it expires.

        The upstream side closes first; what the server sent before it saw the close is still
        forwarded, then the client side closes. The server buffers what comes after (it has no
        client any more) and replays it to the next WebSocket with the same session_id.
        """
        self.double.websockets_closed_on_expiry += 1
        self.expiry_handle = None
        self.closing_reason = "runtime proxy token expired"
        if self.upstream is not None:
            self.upstream.close()
        else:
            self.close(1008, self.closing_reason)

    async def _pump(self) -> None:
        assert self.upstream is not None
        while True:
            message = await self.upstream.read_message()
            if message is None:
                self.close(1008 if self.closing_reason else 1000, self.closing_reason)
                return
            try:
                await self.write_message(message, binary=isinstance(message, bytes))
            except websocket.WebSocketClosedError:
                return

    async def on_message(self, message: str | bytes) -> None:
        if self.upstream is not None:
            await self.upstream.write_message(message, binary=isinstance(message, bytes))

    def on_close(self) -> None:
        if self.expiry_handle is not None:
            IOLoop.current().remove_timeout(self.expiry_handle)
        if self.upstream is not None:
            self.upstream.close()
