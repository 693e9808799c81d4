"""File transfer benchmark: ``%cgpu upload``/``download`` against a direct Contents API client.

    python -m benchmarks.files [--megabytes 100] [--json PATH]

A real jupyter-server on loopback and the proxy kernel (``jupyter`` backend) in front of it.
The direct client is the plainest one could write with the standard library: the same chunked
``PUT /api/contents`` (8 MiB chunks, base64) and a streamed ``GET /files``, no temporary name,
no verification. The proxy's numbers are whole cells (a ``%cgpu`` line from ``execute`` to
``execute_reply``): temporary name, SHA-256 on both sides, rename. Printed: MB/s each way and
the ratio proxy/direct (the goal is at least 0.9). No thresholds: the machine is shared.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import (
    RemoteServer,
    install_remote_spec,
    run_cell,
    start_jupyter_server,
    start_kernel,
)

CHUNK = 8 << 20


def direct_upload(server: RemoteServer, source: Path, name: str) -> None:
    def put(body: bytes) -> None:
        request = urllib.request.Request(
            server.url + "api/contents/" + name,
            data=body,
            method="PUT",
            headers={"Authorization": f"token {server.token}"},
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()

    with source.open("rb") as file:
        number = 1
        data = file.read(CHUNK)
        while True:
            following = file.read(CHUNK)
            tag = number if following else -1
            put(
                json.dumps(
                    {
                        "type": "file",
                        "format": "base64",
                        "chunk": tag,
                        "content": base64.b64encode(data).decode(),
                    }
                ).encode()
            )
            if not following:
                return
            data, number = following, number + 1


def direct_download(server: RemoteServer, name: str, target: Path) -> None:
    request = urllib.request.Request(
        server.url + "files/" + name, headers={"Authorization": f"token {server.token}"}
    )
    with urllib.request.urlopen(request, timeout=300) as response, target.open("wb") as out:
        while block := response.read(1 << 20):
            out.write(block)


def timed(function: Any, *args: Any) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    size = args.megabytes * 1_000_000
    results: dict[str, Any] = {"megabytes": args.megabytes}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        os.environ["JUPYTER_PATH"] = str(root / "jupyter")
        os.environ["CGPU_STATE_DIR"] = str(root / "state")
        server = start_jupyter_server(root / "remote")
        here = root / "here"
        here.mkdir()
        source = here / "payload.bin"
        source.write_bytes(os.urandom(size))
        try:
            results["direct_upload_s"] = timed(direct_upload, server, source, "direct.bin")
            results["direct_download_s"] = timed(
                direct_download, server, "direct.bin", here / "direct-back.bin"
            )
            spec = install_remote_spec(root / "jupyter", "bench-files", server)
            km, kc = start_kernel(spec, cwd=str(here))
            try:
                run_cell(kc, "1")

                def cell(code: str) -> None:
                    reply, _ = run_cell(kc, code, timeout=600)
                    assert reply["content"]["status"] == "ok", reply["content"]

                results["proxy_upload_s"] = timed(cell, "%cgpu upload payload.bin")
                results["proxy_download_s"] = timed(cell, "%cgpu download payload.bin back.bin")
            finally:
                kc.stop_channels()
                km.shutdown_kernel()
            assert (here / "back.bin").read_bytes() == source.read_bytes()
        finally:
            server.stop()
    for way in ("upload", "download"):
        direct = size / 1e6 / results[f"direct_{way}_s"]
        proxy = size / 1e6 / results[f"proxy_{way}_s"]
        results[f"direct_{way}_mb_s"] = round(direct, 1)
        results[f"proxy_{way}_mb_s"] = round(proxy, 1)
        results[f"{way}_ratio"] = round(proxy / direct, 2)
        print(
            f"{way:>8}: proxy {proxy:7.1f} MB/s  direct {direct:7.1f} MB/s"
            f"  ratio {proxy / direct:.2f}x (goal >= 0.9x; the proxy also verifies SHA-256)"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
