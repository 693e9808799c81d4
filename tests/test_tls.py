"""TLS to the remote: a real jupyter-server serving https with a certificate from a test CA.

The proxy verifies certificates: with the server's CA given (``--ca-certs``) cells run over
``https``/``wss``; without it, the connection is refused with an error that says why.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cgpu_kernel.backends.base import WebSocketTarget
from cgpu_kernel.exceptions import RemoteUnreachableError
from cgpu_kernel.proxy.connection import RemoteChannels

from .conftest import (
    RemoteServer,
    install_spec,
    run_cell,
    start_jupyter_server,
    start_kernel,
    stdout_of,
)


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
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    folder = tmp_path_factory.mktemp("tls")
    server = start_jupyter_server(folder / "server", tls=make_certificates(folder))
    yield server
    server.stop()


def test_cells_run_over_tls_with_the_servers_ca(kernel_dir: Path, tls_server: RemoteServer) -> None:
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
    kernel_dir: Path, tls_server: RemoteServer
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


def test_the_websocket_verifies_the_certificate(tls_server: RemoteServer) -> None:
    """The channels socket on its own: refused without the CA, open with it."""
    ws_url = "wss" + tls_server.url[len("https") :] + "api/kernels/none/channels"
    headers = {"Authorization": f"token {tls_server.token}"}

    async def attempt(ca_certs: str | None) -> None:
        target = WebSocketTarget(ws_url, headers, ca_certs=ca_certs)
        await RemoteChannels.open(target, "the test kernel", max_message_size=1 << 20)

    with pytest.raises(RemoteUnreachableError, match="certificate is not trusted"):
        asyncio.run(attempt(None))
    # With the CA the TLS handshake passes and the server answers the upgrade itself (404: no
    # such kernel), which only a verified connection can hear.
    with pytest.raises(Exception, match="no longer knows"):
        asyncio.run(attempt(str(tls_server.ca_file)))
