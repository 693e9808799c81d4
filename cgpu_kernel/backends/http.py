"""The one HTTP seam of the backends: how a request is built and what a failure means.

Both REST clients -- the Jupyter server's (:mod:`cgpu_kernel.backends.jupyter`) and Colab's
(:mod:`cgpu_kernel.backends.colab.api`) -- build their requests with :func:`build_request` (one
User-Agent, timeouts, TLS options) and send them with :func:`fetch`, which turns tornado's
failures into the error tree (:mod:`cgpu_kernel.exceptions`) with the HTTP status and the URL
(credentials removed) on the error:

* no response (HTTP 599: refused, DNS, TLS, timeout) or an ``OSError`` ->
  :exc:`~cgpu_kernel.exceptions.RemoteUnreachableError`; a time-out names the limit it hit
  (the connect or the request timeout, with its seconds and the service's option for it);
* 401/403 -> the service's :exc:`~cgpu_kernel.exceptions.RemoteAuthError` (``status`` set);
* any other status -> the service's :exc:`~cgpu_kernel.exceptions.RemoteHTTPError` (``status``
  and the server's reason).

Only a 404 means the thing asked about is gone (:func:`means_gone`); a 5xx -- a 502 or 503 from
a reverse proxy in front of the server, common and Colab's front door among them -- or a
time-out says nothing about it and is retried (:func:`is_transient`).

The words differ per service (what it is called, what to check), so each client describes its
service once in a :class:`Service`; :func:`error_for` is pure, and the unit tests feed it the
exceptions tornado raises.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from urllib.parse import urlsplit, urlunsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.simple_httpclient import HTTPTimeoutError

from cgpu_kernel import __version__
from cgpu_kernel.exceptions import (
    CgpuError,
    RemoteAuthError,
    RemoteHTTPError,
    RemoteNoAnswerError,
    RemoteUnreachableError,
)

#: Sent with every request cgpu-kernel makes (REST calls and the WebSocket handshake).
USER_AGENT = f"cgpu-kernel/{__version__}"


def safe_url(url: str) -> str:
    """``url`` without user info, query or fragment: fit for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass(frozen=True)
class TLSOptions:
    """How the remote's certificate is checked: a private CA bundle, or (tests) not at all."""

    validate_cert: bool = True
    ca_certs: str | None = None


def build_request(
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: str | bytes | None = None,
    tls: TLSOptions = TLSOptions(),
    connect_timeout: float = 10.0,
    request_timeout: float = 30.0,
    follow_redirects: bool = True,
) -> HTTPRequest:
    """The request every backend sends: our User-Agent unless ``headers`` names another."""
    return HTTPRequest(
        url,
        method=method,
        headers={"User-Agent": USER_AGENT, **(headers or {})},
        body=body,
        validate_cert=tls.validate_cert,
        ca_certs=tls.ca_certs,
        allow_nonstandard_methods=True,
        follow_redirects=follow_redirects,
        connect_timeout=connect_timeout,
        request_timeout=request_timeout,
    )


def means_gone(exc: CgpuError) -> bool:
    """Whether ``exc`` says the resource asked about does not exist: a 404, nothing else. The
    health check, ``start_kernel``, the shutdown and ``reclaim`` forget a kernel only then."""
    return exc.status == 404


def is_transient(exc: CgpuError) -> bool:
    """Whether ``exc`` may well pass by itself: no answer at all, a time-out (408), too many
    requests (429), or any 5xx (the server, or a proxy in front of it, failing for now)."""
    if isinstance(exc, RemoteUnreachableError):
        return True
    return exc.status is not None and (exc.status in (408, 429) or 500 <= exc.status < 600)


def _reject_auth(status: int, url: str) -> CgpuError:
    return RemoteAuthError(
        f"{url} refused our credentials (HTTP {status}).", status=status, url=url
    )


@dataclass(frozen=True)
class Service:
    """How one remote service is named in errors and what the user should check.

    ``name`` is the subject of "Could not reach ..."; ``no_answer_hint`` follows a request that
    got no response, ``network_hint`` a socket or TLS error; ``auth_error(status, url)`` builds
    the error for refused credentials, ``http_error(method, url, status, reason)`` the one for
    any other status. ``redirect_is_refusal``: a 3xx (redirects not followed) means signed out.
    ``timeout_option``: how to raise this service's request timeout (empty: it has no option).
    """

    name: str
    no_answer_hint: str
    network_hint: str
    auth_error: Callable[[int, str], CgpuError] = _reject_auth
    http_error: Callable[[str, str, int, str], CgpuError] = RemoteHTTPError
    redirect_is_refusal: bool = False
    timeout_option: str = ""


def server_reason(exc: HTTPClientError) -> str:
    """The ``message`` of a Jupyter-style JSON error body, else tornado's reason phrase."""
    body = exc.response.body if exc.response is not None else b""
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or exc.message)


def timeout_reason(
    exc: HTTPTimeoutError, service: Service, connect_timeout: float, request_timeout: float
) -> str:
    """Which limit a time-out hit, with its seconds: tornado says only "Timeout while
    connecting" or "Timeout during request"."""
    if "connecting" in exc.message:
        return f"no connection within {connect_timeout:g} s (the connect timeout)"
    raise_it = f"; raise it with {service.timeout_option}" if service.timeout_option else ""
    return (
        f"it accepted the connection but sent no answer within {request_timeout:g} s (the"
        f" request timeout{raise_it})"
    )


def error_for(
    exc: BaseException,
    method: str,
    url: str,
    service: Service,
    *,
    connect_timeout: float | None = None,
    request_timeout: float | None = None,
) -> CgpuError:
    """The error-tree error for a failed request (``url`` may carry a query: it is dropped);
    ``connect_timeout``/``request_timeout``: the request's limits, named when one is hit."""
    where = safe_url(url)
    if isinstance(exc, HTTPTimeoutError) and request_timeout is not None:
        reason = timeout_reason(exc, service, connect_timeout or request_timeout, request_timeout)
        kind = RemoteUnreachableError if "connecting" in exc.message else RemoteNoAnswerError
        return kind(
            f"Could not reach {service.name}: {reason}. {service.no_answer_hint}", url=where
        )
    if isinstance(exc, HTTPClientError):
        if exc.code == 599 or exc.response is None:
            return RemoteUnreachableError(
                f"Could not reach {service.name}: {exc.message}. {service.no_answer_hint}",
                url=where,
            )
        if exc.code in (401, 403) or (service.redirect_is_refusal and 300 <= exc.code < 400):
            return service.auth_error(exc.code, where)
        return service.http_error(method, where, exc.code, server_reason(exc))
    return RemoteUnreachableError(
        f"Could not reach {service.name}: {exc}. {service.network_hint}", url=where
    )


async def fetch(
    client: AsyncHTTPClient, request: HTTPRequest, service: Service, *, name: str | None = None
) -> HTTPResponse:
    """Send ``request``; a failure raises :func:`error_for`'s error (``name`` overrides the
    service's name for this request, e.g. to say which path)."""
    try:
        return await client.fetch(request)
    except (HTTPClientError, OSError, ssl.SSLError) as exc:
        if name is not None:
            service = replace(service, name=name)
        raise error_for(
            exc,
            request.method,
            request.url,
            service,
            connect_timeout=request.connect_timeout,
            request_timeout=request.request_timeout,
        ) from None
