"""Colab's own API (``tun/m/...``): assignment, proxy tokens, keep-alive, credentials.

:class:`ColabAPI` sends each call through the backends' HTTP seam
(:mod:`cgpu_kernel.backends.http`) with Colab's headers (the Google access token in
``Authorization``, ``X-Colab-Client-Agent``), strips the XSSI prefix, does Colab's XSRF
two-step for writes, and retries once with a refreshed access token after a 401. What the
answers mean is parsed in :mod:`.models`; :mod:`.backend` decides what to do with them, and
``cgpu-kernel status``/``release`` (:mod:`cgpu_kernel.cli.colab`) call it directly.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from tornado.httpclient import AsyncHTTPClient

from cgpu_kernel.backends.colab.models import (
    DEFAULT_COLAB_URL,
    OUTCOME_DENIED,
    OUTCOMES_NO_QUOTA,
    AccessTokens,
    Assignment,
    RuntimeProxy,
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
    ColabQuotaError,
    ColabTooManyRuntimesError,
    ColabUnavailableError,
)

#: What ``X-Colab-Client-Agent`` says.
CLIENT_AGENT = "cgpu-kernel"
PROXY_TOKEN_HEADER = "X-Colab-Runtime-Proxy-Token"  # noqa: S105 - a header name
CLIENT_AGENT_HEADER = "X-Colab-Client-Agent"
XSRF_HEADER = "X-Goog-Colab-Token"
TUNNEL_HEADER = "X-Colab-Tunnel"


def _google_refused(status: int, url: str) -> ColabAuthError:
    return ColabAuthError(
        f"Google refused our credentials for Colab (HTTP {status}). Sign in again with"
        " `cgpu-kernel auth login` (or renew CGPU_GOOGLE_ACCESS_TOKEN), then run the cell again.",
        status=status,
        url=url,
    )


def _colab_http_error(method: str, url: str, status: int, reason: str) -> ColabHTTPError:
    return ColabHTTPError(f"{method} Colab ({url}) failed with HTTP {status}.", status, url=url)


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
    ) -> None:
        self.tokens = tokens
        self.base_url = check_service_url(base_url, "Colab")
        self.client_agent = client_agent
        self.tls = TLSOptions(validate_cert, ca_certs)
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
                connect_timeout=min(20.0, self.request_timeout),
                request_timeout=self.request_timeout,
            )
            try:
                response = await fetch(self._http, request, COLAB_SERVICE, name=where)
            except ColabAuthError as exc:
                if exc.status == 401 and attempt == 0:
                    continue  # an expired access token: refresh it and try once more
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

    async def assign(self, nbh: str, accelerator: str, high_memory: bool) -> Assignment:
        """The runtime for ``nbh``: the one already assigned, else a new one."""
        query = assignment_query(nbh, accelerator, high_memory)
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
            raise _assign_http_error(exc.code, accelerator) from None
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
                " for a CPU runtime), allow fallbacks with --gpu-fallback, or add compute units"
                " at https://colab.research.google.com/signup."
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
                raise ColabAPIChangedError(
                    "Colab gave no runtime proxy token",
                    url=self.base_url + "tun/m/runtime-proxy-token",
                )
            return proxy
        return None

    async def unassign(self, endpoint: str) -> None:
        await self._xsrf_post(f"tun/m/unassign/{quote(check_name(endpoint, 'endpoint'))}")

    async def keep_alive(self, endpoint: str) -> None:
        await self.call(
            "GET",
            f"tun/m/{quote(check_name(endpoint, 'endpoint'))}/keep-alive/",
            headers={TUNNEL_HEADER: "Google"},
        )

    async def propagate_credentials(
        self, endpoint: str, auth_type: str, *, dryrun: bool
    ) -> dict[str, Any]:
        """``{success, unauthorized_redirect_uri?}`` from Colab's credentials propagation."""
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


def _assign_http_error(code: int, accelerator: str) -> ColabError:
    if code == 412:
        return ColabTooManyRuntimesError(
            "This account already has as many Colab runtimes as Colab allows (HTTP 412). Release"
            " one with `cgpu-kernel release ENDPOINT` (`cgpu-kernel status` lists them) or in"
            " Colab's Runtime > Manage sessions, then run the cell again."
        )
    if code == 503:
        return ColabUnavailableError(
            f"Colab has no {label(accelerator)} available right now (HTTP 503). Try again in a"
            " few minutes, choose another accelerator with --gpu, or allow fallbacks with"
            " --gpu-fallback."
        )
    return ColabError(
        f"Colab refused to assign a {label(accelerator)} runtime (HTTP {code}). Check"
        " `cgpu-kernel auth status`, try again later, or check for a newer cgpu-kernel."
    )
