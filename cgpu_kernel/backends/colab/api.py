"""Colab's own API (``tun/m/...``): assignment, proxy tokens, keep-alive, credentials.

:class:`ColabAPI` sends each call through the backends' HTTP seam
(:mod:`cgpu_kernel.backends.http`) with Colab's headers (the Google access token in
``Authorization``, ``X-Colab-Client-Agent``), strips the XSSI prefix, does Colab's XSRF
two-step for writes, and retries once with a refreshed access token after a 401. What the
answers mean is parsed in :mod:`.models`; :mod:`.backend` decides what to do with them, and
``cgpu-kernel status`` (:mod:`cgpu_kernel.cli.status`) and ``release``
(:mod:`cgpu_kernel.cli.colab`) call it directly.

Each call follows one of Google's own clients (named at the call): colab-vscode
(``src/colab/client/v1/index.ts``, ``src/colab/headers.ts``) and google-colab-cli
(``client.py``, ``commands/session.py``, its ``AGENTS.md`` for what was verified live).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from tornado.httpclient import AsyncHTTPClient

from cgpu_kernel.backends.colab.models import (
    DEFAULT_COLAB_URL,
    DEFAULT_GAPI_URL,
    OUTCOME_DENIED,
    OUTCOMES_NO_QUOTA,
    AccessTokens,
    Assignment,
    RuntimeProxy,
    UserInfo,
    assignment_query,
    check_name,
    check_service_url,
    label,
    parse_json,
)
from cgpu_kernel.backends.http import Service, TLSOptions, build_request, fetch
from cgpu_kernel.exceptions import (
    ColabAPIChangedError,
    ColabAuthError,
    ColabDeniedError,
    ColabError,
    ColabHTTPError,
    ColabNotEntitledError,
    ColabQuotaError,
    ColabTooManyRuntimesError,
    ColabUnavailableError,
    RemoteNoAnswerError,
)

#: What ``X-Colab-Client-Agent`` says by default (the ``colab_client_agent`` setting changes it).
#: Google's clients send fixed values the server maps: colab-vscode ``src/colab/headers.ts``
#: ``vscode``, google-colab-cli ``client.py`` ``colab-cli``; what it does with ours is unknown.
CLIENT_AGENT = "cgpu-kernel"
CLIENT_AGENT_ENV = "CGPU_COLAB_CLIENT_AGENT"
PROXY_TOKEN_HEADER = "X-Colab-Runtime-Proxy-Token"  # noqa: S105 - a header name
CLIENT_AGENT_HEADER = "X-Colab-Client-Agent"
XSRF_HEADER = "X-Goog-Colab-Token"
TUNNEL_HEADER = "X-Colab-Tunnel"
#: Seconds a keep-alive waits for an answer: google-colab-cli ``KEEP_ALIVE_TIMEOUT`` (its
#: AGENTS.md, verified live: the runtime often never answers; a read time-out is a ping sent).
KEEP_ALIVE_TIMEOUT = 10.0
#: How to allow a fallback, in every refusal that a fallback would have avoided.
FALLBACK_HINT = (
    "allow fallbacks with `--option gpu-fallback=T4` on `cgpu-kernel install` (the"
    " gpu_fallback setting, or CGPU_GPU_FALLBACK; `none` falls back to a CPU runtime)"
)


def _google_refused(status: int, url: str) -> ColabAuthError:
    return ColabAuthError(
        f"Google refused our credentials for Colab (HTTP {status}). Sign in again with"
        " `cgpu-kernel auth login` (or renew CGPU_GOOGLE_ACCESS_TOKEN), then run the cell again.",
        status=status,
        url=url,
    )


def _colab_http_error(method: str, url: str, status: int, reason: str) -> ColabHTTPError:
    return ColabHTTPError(
        f"{method} Colab ({url}) failed with HTTP {status} ({reason}).",
        status,
        url=url,
        reason=reason,
    )


def agent_hint(agent: str) -> str:
    """What to try when Colab may be refusing our ``X-Colab-Client-Agent``."""
    return (
        f" If Colab refuses the client agent {agent!r}, set another with"
        " `--option colab-client-agent=colab-cli` (the colab_client_agent setting, or"
        f" {CLIENT_AGENT_ENV})."
    )


def looks_like_agent_refusal(exc: ColabHTTPError) -> bool:
    """A 400 or 403 whose reason names the client or its agent. No Google client documents how
    the service words a refused agent, so this is a guess kept narrow."""
    reason = exc.reason.lower()
    return exc.code in (400, 403) and ("agent" in reason or "client" in reason)


#: Colab as the HTTP seam names it in errors (each call names its path, see ``ColabAPI.call``).
COLAB_SERVICE = Service(
    name="Colab",
    no_answer_hint="Check the network (and --colab-url if you changed it).",
    network_hint="Check the network and the system's TLS certificates.",
    auth_error=_google_refused,
    http_error=_colab_http_error,
    redirect_is_refusal=True,  # signed out: Colab redirects to a sign-in page
)


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
        keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT,
        gapi_url: str | None = None,
    ) -> None:
        self.tokens = tokens
        self.base_url = check_service_url(base_url, "Colab")
        #: Where ``v1/user-info`` is asked: Google's API host for the real Colab, the same
        #: server as ``base_url`` for any other (a test double serves both).
        self.gapi_url = check_service_url(
            gapi_url or (DEFAULT_GAPI_URL if self.base_url == DEFAULT_COLAB_URL else base_url),
            "Colab API",
        )
        self.client_agent = client_agent or CLIENT_AGENT
        self.tls = TLSOptions(validate_cert, ca_certs)
        self.request_timeout = request_timeout
        self.keep_alive_timeout = keep_alive_timeout
        self._http = AsyncHTTPClient(force_instance=True)

    async def call(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        *,
        timeout: float | None = None,
        base: str | None = None,
        authuser: bool = True,
    ) -> Any:
        """One call; decoded JSON. A refused access token is refreshed and retried once.

        ``timeout`` (seconds) overrides ``request_timeout`` for this call; ``base`` the
        service's base URL (``gapi_url`` for user-info); ``authuser=0`` goes on Colab's own
        host's calls only (colab-vscode ``issueRequest``). A 403, or a 400 whose reason names the
        client, also says which setting changes the client agent.
        """
        base = base or self.base_url
        own = {"authuser": "0"} if authuser else {}
        url = base + path + "?" + urlencode({**own, **(query or {})})
        where = f"Colab ({base}{path})"
        request_timeout = self.request_timeout if timeout is None else timeout
        for attempt in range(2):
            token = await self.tokens.access_token(refresh=attempt > 0)
            request = build_request(
                url,
                method=method,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Accept": "application/json",
                    CLIENT_AGENT_HEADER: self.client_agent,
                    **(headers or {}),
                },
                body=b"" if method == "POST" else None,
                tls=self.tls,
                follow_redirects=False,
                connect_timeout=min(20.0, request_timeout),
                request_timeout=request_timeout,
            )
            try:
                response = await fetch(self._http, request, COLAB_SERVICE, name=where)
            except ColabAuthError as exc:
                if exc.status == 401 and attempt == 0:
                    continue  # an expired access token: refresh it and try once more
                if exc.status == 403:
                    raise ColabAuthError(
                        str(exc) + agent_hint(self.client_agent), status=403, url=exc.url
                    ) from None
                raise
            except ColabHTTPError as exc:
                if looks_like_agent_refusal(exc):
                    raise ColabHTTPError(
                        str(exc) + agent_hint(self.client_agent),
                        exc.code,
                        url=exc.url,
                        reason=exc.reason,
                    ) from None
                raise
            return parse_json(response.body or b"", where)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _xsrf_post(self, path: str, query: dict[str, str] | None = None) -> Any:
        """Colab's two-step write: ``GET`` gives an XSRF token, ``POST`` it back."""
        first = await self.call("GET", path, query)
        xsrf = first.get("token") if isinstance(first, dict) else None
        if not isinstance(xsrf, str) or not xsrf:
            raise ColabAPIChangedError(
                f"Colab's {path} gave no XSRF token", url=self.base_url + path
            )
        return await self.call("POST", path, query, {XSRF_HEADER: xsrf})

    async def assign(
        self, nbh: str, accelerator: str, high_memory: bool, runtime_version: str = ""
    ) -> Assignment:
        """The runtime for ``nbh``: the one already assigned, else a new one.

        colab-vscode ``client/v1/index.ts`` ``assign``: a GET answer with an XSRF ``token`` means
        "not yet", any other is the existing assignment; the POST's ``outcome`` per ``api.ts``.
        """
        query = assignment_query(nbh, accelerator, high_memory, runtime_version)
        try:
            got = await self.call("GET", "tun/m/assign", query)
            if isinstance(got, dict) and "endpoint" in got:
                return Assignment.parse(got, self.base_url, reused=True)
            xsrf = got.get("token") if isinstance(got, dict) else None
            if not isinstance(xsrf, str) or not xsrf:
                raise ColabAPIChangedError(
                    "Colab's assign answer has neither a runtime nor an XSRF token",
                    url=self.base_url + "tun/m/assign",
                )
            posted = await self.call("POST", "tun/m/assign", query, {XSRF_HEADER: xsrf})
        except ColabHTTPError as exc:
            raise _assign_http_error(exc, accelerator, self.client_agent) from None
        if not isinstance(posted, dict):
            raise ColabAPIChangedError(
                "Colab's assignment answer is not an object", url=self.base_url + "tun/m/assign"
            )
        outcome = posted.get("outcome")
        if outcome in OUTCOMES_NO_QUOTA:
            raise ColabQuotaError(
                f"Colab has no quota for a {label(accelerator)} runtime for this account right"
                f" now (outcome {outcome}): the free usage limit or the compute units are used"
                " up. Wait and try again later, choose another accelerator (--gpu, or --gpu none"
                f" for a CPU runtime), {FALLBACK_HINT}, or add compute units at"
                " https://colab.research.google.com/signup."
            )
        if outcome == OUTCOME_DENIED:
            raise ColabDeniedError(
                f"Colab denied a {label(accelerator)} runtime to this account (outcome 5). Open"
                " https://colab.research.google.com in a browser, signed in as the same account,"
                " to see why; cgpu-kernel cannot lift this."
            )
        if "endpoint" not in posted:
            raise ColabAPIChangedError(
                f"Colab gave no runtime (outcome {outcome!r})", url=self.base_url + "tun/m/assign"
            )
        return Assignment.parse(posted, self.base_url, reused=False)

    async def assignments(self) -> list[dict[str, Any]]:
        """``GET tun/m/assignments`` (google-colab-cli ``client.py``): this account's runtimes."""
        data = await self.call("GET", "tun/m/assignments")
        items = data.get("assignments", []) if isinstance(data, dict) else data
        return [item for item in items or [] if isinstance(item, dict)]

    async def listed(self, endpoint: str) -> bool:
        """Whether the assignments listing still names ``endpoint``. Its tokens are not used:
        no Google client refreshes from the listing, which may carry the first, old token."""
        return any(item.get("endpoint") == endpoint for item in await self.assignments())

    async def proxy_token(self, endpoint: str) -> RuntimeProxy | None:
        """A fresh runtime proxy token from the dedicated endpoint; None on 404 (gone).

        ``GET tun/m/runtime-proxy-token?endpoint=<ep>&port=8080`` with ``X-Colab-Tunnel:
        Google`` (colab-vscode ``client/v1/index.ts`` ``refreshConnection`` before it moved to
        colab.pa.googleapis.com, which refuses ordinary user tokens per google-colab-cli
        AGENTS.md). Accepts ``tokenExpiresInSeconds`` (a number) and ``tokenTtl`` (``"3600s"``).
        """
        path = "tun/m/runtime-proxy-token"
        try:
            data = await self.call(
                "GET", path, {"endpoint": endpoint, "port": "8080"}, {TUNNEL_HEADER: "Google"}
            )
        except ColabHTTPError as exc:
            if exc.code == 404:
                return None
            raise
        proxy = RuntimeProxy.parse(data, self.base_url)
        if proxy is None:
            raise ColabAPIChangedError(
                "Colab gave no runtime proxy token", url=self.base_url + path
            )
        return proxy

    async def runtime_proxy(self, endpoint: str) -> RuntimeProxy | None:
        """A fresh proxy token for ``endpoint``; None when Colab no longer lists it.

        The listing first (colab-vscode re-lists before each refresh:
        ``AssignmentManager.refreshConnection``), then :meth:`proxy_token`.
        """
        if not await self.listed(endpoint):
            return None
        return await self.proxy_token(endpoint)

    async def unassign(self, endpoint: str) -> None:
        """``GET`` then XSRF ``POST`` of ``tun/m/unassign/<endpoint>`` (both Google clients)."""
        await self._xsrf_post(f"tun/m/unassign/{quote(check_name(endpoint, 'endpoint'))}")

    async def user_info(self, *, timeout: float = 10.0) -> UserInfo:
        """The account's tier and the accelerators it may ask for.

        ``GET v1/user-info`` on Google's API host (colab-vscode ``client/v1/index.ts``
        ``getUserInfo``, schema in ``api.ts``). google-colab-cli found that host refusing
        ordinary user tokens (AGENTS.md, ``USER_PROJECT_DENIED``): callers treat any error as
        "not known" and say so, never as a failure of what they were doing.
        """
        return UserInfo.parse(
            await self.call(
                "GET", "v1/user-info", timeout=timeout, base=self.gapi_url, authuser=False
            )
        )

    async def keep_alive(self, endpoint: str) -> bool:
        """One keep-alive ping; True when answered, False when the answer did not come.

        ``GET tun/m/<endpoint>/keep-alive/`` with ``X-Colab-Tunnel: Google`` (colab-vscode
        ``sendKeepAlive``, google-colab-cli ``keep_alive_assignment``). The front door records
        the activity before forwarding and the runtime often never answers (google-colab-cli
        AGENTS.md, verified live): a read time-out after ``keep_alive_timeout`` seconds is a
        ping sent. Refused connections, DNS and TLS errors, and HTTP errors still raise.
        """
        try:
            await self.call(
                "GET",
                f"tun/m/{quote(check_name(endpoint, 'endpoint'))}/keep-alive/",
                headers={TUNNEL_HEADER: "Google"},
                timeout=self.keep_alive_timeout,
            )
        except RemoteNoAnswerError:  # connected and sent, no answer in time: a ping sent
            return False
        return True

    async def propagate_credentials(
        self, endpoint: str, auth_type: str, *, dryrun: bool
    ) -> dict[str, Any]:
        """``{success, unauthorized_redirect_uri?}`` from Colab's credentials propagation
        (colab-vscode ``propagateCredentials``: GET for a token, POST it back)."""
        result = await self._xsrf_post(
            f"tun/m/credentials-propagation/{quote(check_name(endpoint, 'endpoint'))}",
            {
                "authtype": auth_type,
                "version": "2",
                "dryrun": "true" if dryrun else "false",
                "propagate": "true",
                "record": "false",
            },
        )
        if not isinstance(result, dict):
            raise ColabAPIChangedError("Colab's credentials propagation answer is not an object")
        return result

    def close(self) -> None:
        self._http.close()


def _assign_http_error(exc: ColabHTTPError, accelerator: str, agent: str) -> ColabError:
    """What an HTTP status from ``tun/m/assign`` means, per Google's clients."""
    code, what = exc.code, label(accelerator)
    if code == 412:
        # colab-vscode assignments.ts / google-colab-cli client.py: TooManyAssignmentsError;
        # for free accounts also reported as the GPU usage-limit refusal (CPU still works).
        return ColabTooManyRuntimesError(
            f"Colab refused a {what} runtime (HTTP 412): this account has as many runtimes"
            " assigned as Colab allows, or (free accounts) its GPU usage limit is reached while"
            " CPU runtimes still work. Release a runtime with `cgpu-kernel release ENDPOINT`"
            " (`cgpu-kernel status` lists them) or in Colab's Runtime > Manage sessions, wait,"
            f" or {FALLBACK_HINT}; then run the cell again."
        )
    if code == 400 and accelerator != "none" and not looks_like_agent_refusal(exc):
        # google-colab-cli commands/session.py: a 400 with an accelerator = not entitled
        return ColabNotEntitledError(
            f"Colab rejected the accelerator {what} (HTTP 400): this account may not have quota"
            " or entitlement for it (some need Colab Pro). Choose another with --gpu (e.g. T4),"
            f" --gpu none for a CPU runtime, or {FALLBACK_HINT}."
        )
    if code == 503:
        # colab-vscode: AcceleratorUnavailableError, the one status its own fallback follows
        return ColabUnavailableError(
            f"Colab has no {what} available right now (HTTP 503). Try again in a few minutes,"
            f" choose another accelerator with --gpu, or {FALLBACK_HINT}."
        )
    hint = "" if looks_like_agent_refusal(exc) else agent_hint(agent)
    return ColabError(
        f"Colab refused to assign a {what} runtime: {exc} Check `cgpu-kernel auth status`,"
        " try again later, or check for a newer cgpu-kernel." + hint
    )
