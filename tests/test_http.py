"""The backends' HTTP seam (``backends/http.py``), without a server.

Each test builds the exception tornado raises (``HTTPClientError`` with or without an
``HTTPResponse``, an ``OSError``) and checks the error the seam makes of it: its class, the HTTP
status it keeps, and a URL (and message) with no token in it.
"""

from __future__ import annotations

import asyncio
import io
import json
import ssl
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest, HTTPResponse
from tornado.httputil import HTTPHeaders
from tornado.simple_httpclient import HTTPTimeoutError

from cgpu_kernel import __version__
from cgpu_kernel.backends.colab.api import COLAB_SERVICE
from cgpu_kernel.backends.http import (
    USER_AGENT,
    Service,
    TLSOptions,
    build_request,
    error_for,
    fetch,
    safe_url,
)
from cgpu_kernel.backends.jupyter import JupyterServerClient
from cgpu_kernel.exceptions import (
    ColabAuthError,
    ColabHTTPError,
    RemoteAuthError,
    RemoteHTTPError,
    RemoteNoAnswerError,
    RemoteProtocolError,
    RemoteUnreachableError,
)

SECRET = "s3cr3t-token-value"
URL = f"https://me:{SECRET}@jupyter.example.org:8888/user/me/api/kernels?token={SECRET}#x"
SAFE = "https://jupyter.example.org:8888/user/me/api/kernels"
SERVICE = Service(
    name="the test server", no_answer_hint="Check it runs.", network_hint="Check the network."
)


def _failure(code: int, body: bytes = b"", *, with_response: bool = True) -> HTTPClientError:
    request = HTTPRequest(URL)
    response = (
        HTTPResponse(request, code, headers=HTTPHeaders(), buffer=io.BytesIO(body))
        if with_response
        else None
    )
    return HTTPClientError(code, response=response)


def _assert_no_secret(error: Exception) -> None:
    assert SECRET not in str(error)
    assert SECRET not in str(getattr(error, "url", ""))


def test_safe_url_drops_user_info_query_and_fragment() -> None:
    assert safe_url(URL) == SAFE


def test_no_response_is_unreachable() -> None:
    for failure in (_failure(599, with_response=False), _failure(599)):
        error = error_for(failure, "GET", URL, SERVICE)
        assert type(error) is RemoteUnreachableError
        assert error.url == SAFE
        assert "Could not reach the test server" in str(error) and "Check it runs." in str(error)
        _assert_no_secret(error)


def test_a_time_out_names_the_limit_it_hit_and_its_seconds() -> None:
    """tornado says only "Timeout during request" or "Timeout while connecting"."""
    service = Service("the test server", "Check it runs.", "Check the network.",
                      timeout_option="--request-timeout")  # fmt: skip
    silent = error_for(HTTPTimeoutError("Timeout during request"), "GET", URL, service,
                       connect_timeout=10.0, request_timeout=42.5)  # fmt: skip
    # connected, no answer: its own kind (Colab's keep-alive counts it as a ping sent)
    assert type(silent) is RemoteNoAnswerError and isinstance(silent, RemoteUnreachableError)
    assert str(silent) == (
        "Could not reach the test server: it accepted the connection but sent no answer within"
        " 42.5 s (the request timeout; raise it with --request-timeout). Check it runs."
    )
    connecting = error_for(HTTPTimeoutError("Timeout while connecting"), "GET", URL, SERVICE,
                           connect_timeout=10.0, request_timeout=42.5)  # fmt: skip
    assert type(connecting) is RemoteUnreachableError
    assert "no connection within 10 s (the connect timeout)" in str(connecting)
    _assert_no_secret(connecting)


@pytest.mark.parametrize(
    "failure", [ConnectionRefusedError(111, "Connection refused"), ssl.SSLError("bad handshake")]
)
def test_a_socket_or_tls_error_is_unreachable(failure: OSError) -> None:
    error = error_for(failure, "GET", URL, SERVICE)
    assert type(error) is RemoteUnreachableError
    assert error.url == SAFE and error.status is None
    assert "Check the network." in str(error)
    _assert_no_secret(error)


@pytest.mark.parametrize("code", [401, 403])
def test_refused_credentials_keep_their_status(code: int) -> None:
    error = error_for(_failure(code), "GET", URL, SERVICE)
    assert type(error) is RemoteAuthError
    assert error.status == code and error.url == SAFE
    _assert_no_secret(error)


@pytest.mark.parametrize("code", [404, 500, 502])
def test_other_statuses_keep_status_and_the_servers_reason(code: int) -> None:
    body = json.dumps({"message": f"reason {code}"}).encode()
    error = error_for(_failure(code, body), "DELETE", URL, SERVICE)
    assert isinstance(error, RemoteHTTPError) and isinstance(error, RemoteProtocolError)
    assert error.status == code and error.url == SAFE
    assert error.method == "DELETE" and error.reason == f"reason {code}"
    assert str(error) == f"DELETE {SAFE} failed with HTTP {code}: reason {code}"
    _assert_no_secret(error)


def test_a_body_that_is_not_json_gives_tornados_reason() -> None:
    error = error_for(_failure(500, b"<html>oops</html>"), "GET", URL, SERVICE)
    assert isinstance(error, RemoteHTTPError)
    assert error.reason == "Internal Server Error"


def test_a_redirect_is_an_http_error_unless_the_service_says_it_means_signed_out() -> None:
    assert isinstance(error_for(_failure(302), "GET", URL, SERVICE), RemoteHTTPError)
    error = error_for(_failure(302), "GET", URL, COLAB_SERVICE)
    assert type(error) is ColabAuthError and error.status == 302
    _assert_no_secret(error)


def test_colab_statuses_become_colab_errors() -> None:
    refused = error_for(_failure(401), "GET", URL, COLAB_SERVICE)
    assert type(refused) is ColabAuthError and isinstance(refused, RemoteAuthError)
    assert refused.status == 401 and "auth login" in str(refused)
    other = error_for(_failure(412), "POST", URL, COLAB_SERVICE)
    assert type(other) is ColabHTTPError and other.code == 412 and other.url == SAFE
    _assert_no_secret(other)


def test_the_request_builder_sets_user_agent_timeouts_and_tls() -> None:
    assert f"cgpu-kernel/{__version__}" == USER_AGENT
    request = build_request(
        "https://h/",
        method="POST",
        body=b"{}",
        tls=TLSOptions(validate_cert=False, ca_certs="/ca.pem"),
        connect_timeout=3.0,
        request_timeout=7.0,
        follow_redirects=False,
    )
    assert request.headers["User-Agent"] == USER_AGENT
    assert (request.validate_cert, request.ca_certs) == (False, "/ca.pem")
    assert (request.connect_timeout, request.request_timeout) == (3.0, 7.0)
    assert request.follow_redirects is False and request.method == "POST"
    named = build_request("https://h/", headers={"User-Agent": "other"})
    assert named.headers["User-Agent"] == "other"
    assert named.validate_cert is True and named.ca_certs is None


class _FailingClient:
    """Stands in for tornado's AsyncHTTPClient: every fetch raises ``failure``."""

    def __init__(self, failure: BaseException) -> None:
        self.failure = failure
        self.fetched: list[HTTPRequest] = []

    async def fetch(self, request: HTTPRequest) -> HTTPResponse:
        self.fetched.append(request)
        raise self.failure

    def close(self) -> None:
        pass


def test_fetch_raises_the_mapped_error_under_the_name_given() -> None:
    client: Any = _FailingClient(_failure(599, with_response=False))
    with pytest.raises(RemoteUnreachableError, match="Could not reach Colab \\(somewhere\\)"):
        asyncio.run(fetch(client, HTTPRequest(URL), SERVICE, name="Colab (somewhere)"))


@pytest.mark.parametrize(
    ("code", "error_class"),
    [(401, RemoteAuthError), (404, RemoteHTTPError), (503, RemoteHTTPError)],
)
def test_the_jupyter_client_keeps_the_status(code: int, error_class: type[Exception]) -> None:
    client = JupyterServerClient("https://jupyter.example.org:8888/user/me/", SECRET)
    fake = _FailingClient(_failure(code))
    client._http = fake  # type: ignore[assignment]
    with pytest.raises(error_class) as caught:
        asyncio.run(client.call("GET", "api/kernels/abc"))
    error = caught.value
    assert getattr(error, "status", None) == code
    assert getattr(error, "url", None) == "https://jupyter.example.org:8888/user/me/api/kernels/abc"
    _assert_no_secret(error)
    sent = fake.fetched[0]
    assert sent.headers["Authorization"] == f"token {SECRET}"  # the header, never the URL
    assert SECRET not in sent.url
    assert sent.headers["User-Agent"] == USER_AGENT
    if code == 401:
        assert "CGPU_TOKEN" in str(error)
