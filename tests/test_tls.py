"""TLS to the remote: a real jupyter-server serving https with a certificate from a test CA.

The proxy verifies certificates: with the server's CA given (``--ca-certs``) cells run over
``https``/``wss``; without it, the connection is refused with an error that says why.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import secrets
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tornado.httpclient import HTTPRequest

from cgpu_kernel.connection import RemoteChannels
from cgpu_kernel.exceptions import RemoteUnreachableError

from .conftest import free_port, install_spec, run_cell, start_kernel, stdout_of


@dataclass
class TlsServer:
    url: str
    token: str
    token_file: Path
    ca_file: Path
    process: subprocess.Popen[bytes]


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A test CA, and a certificate for 127.0.0.1 that it signed: (ca, cert, key) files."""
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = {"not_valid_before": now - datetime.timedelta(days=1)}
    valid["not_valid_after"] = now + datetime.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder(**valid)
        .subject_name(_name("cgpu-kernel test CA"))
        .issuer_name(_name("cgpu-kernel test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder(**valid)
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    folder = tmp_path_factory.mktemp("tls")
    ca_file, cert_file, key_file = make_certificates(folder)
    token, port = secrets.token_hex(16), free_port()
    token_file = folder / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_server",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.open_browser=False",
            f"--ServerApp.root_dir={folder}",
            "--ServerApp.allow_root=True",
            f"--ServerApp.certfile={cert_file}",
            f"--ServerApp.keyfile={key_file}",
        ],
        env=dict(os.environ, JUPYTER_TOKEN=token, JUPYTER_RUNTIME_DIR=str(folder / "rt")),
        stdout=subprocess.DEVNULL,
        stderr=(folder / "server.log").open("wb"),
    )
    url = f"https://127.0.0.1:{port}/"
    context = ssl.create_default_context(cafile=str(ca_file))
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "api/status", context=context, timeout=5):
                break
        except urllib.error.HTTPError:
            break  # it answers (403 without a token): it is up, and its certificate verified
        except OSError:
            assert process.poll() is None, (folder / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the TLS server did not come up"
            time.sleep(0.2)
    yield TlsServer(url, token, token_file, ca_file, process)
    process.terminate()
    process.wait(timeout=30)


def test_cells_run_over_tls_with_the_servers_ca(kernel_dir: Path, tls_server: TlsServer) -> None:
    name = install_spec(
        kernel_dir,
        "cgpu-test-tls",
        "jupyter",
        url=tls_server.url,
        token_file=tls_server.token_file,
        extra=[f"--ca-certs={tls_server.ca_file}"],
    )
    km, kc = start_kernel(name)
    try:
        reply, outputs = run_cell(kc, "print('over tls')")
        assert reply["content"]["status"] == "ok"
        assert stdout_of(outputs) == "over tls\n"
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def test_an_untrusted_certificate_is_refused_with_a_clear_error(
    kernel_dir: Path, tls_server: TlsServer
) -> None:
    name = install_spec(
        kernel_dir,
        "cgpu-test-tls-untrusted",
        "jupyter",
        url=tls_server.url,
        token_file=tls_server.token_file,
    )
    km, kc = start_kernel(name)
    try:
        reply, _ = run_cell(kc, "1")
        assert reply["content"]["status"] == "error"
        assert "certificate" in reply["content"]["evalue"].lower()
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def test_the_websocket_verifies_the_certificate(tls_server: TlsServer) -> None:
    """The channels socket on its own: refused without the CA, open with it."""
    ws_url = "wss" + tls_server.url[len("https") :] + "api/kernels/none/channels"
    headers = {"Authorization": f"token {tls_server.token}"}

    async def attempt(ca_certs: str | None) -> None:
        request = HTTPRequest(ws_url, headers=headers, ca_certs=ca_certs)
        await RemoteChannels.open(request, "the test kernel", max_message_size=1 << 20)

    with pytest.raises(RemoteUnreachableError, match="certificate is not trusted"):
        asyncio.run(attempt(None))
    # With the CA the TLS handshake passes and the server answers the upgrade itself (404: no
    # such kernel), which only a verified connection can hear.
    with pytest.raises(Exception, match="no longer knows"):
        asyncio.run(attempt(str(tls_server.ca_file)))
