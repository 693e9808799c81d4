"""The records of started remote kernels (``backends.registry``), with a fake REST client.

No Jupyter server: ``reclaim_orphans`` only needs an object with ``base_url`` and an async
``call``; the fake records what it was asked and fails the way the real client does.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from cgpu_kernel.backends import registry
from cgpu_kernel.exceptions import RemoteError, RemoteHTTPError, RemoteUnreachableError
from cgpu_kernel.paths import registry_dir

URL = "http://server.example:8888/"
OTHER_URL = "http://elsewhere.example:8888/"


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CGPU_STATE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


class FakeClient:
    """Stands in for ``JupyterServerClient``: ``failures`` maps a kernel id to what to raise."""

    def __init__(self, base_url: str, failures: dict[str, RemoteError] | None = None) -> None:
        self.base_url = base_url
        self.failures = failures or {}
        self.calls: list[tuple[str, str]] = []

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        self.calls.append((method, path))
        kernel_id = path.rsplit("/", 1)[-1]
        if kernel_id in self.failures:
            raise self.failures[kernel_id]
        return None


def write_record(kernel_id: str, pid: int, url: str = URL, create_time: float = 0.0) -> None:
    path = registry_dir() / f"remote-kernel-{kernel_id}.json"
    data = {"pid": pid, "create_time": create_time, "url": url, "kernel_id": kernel_id}
    path.write_text(json.dumps(data))


def reclaim(client: FakeClient) -> list[str]:
    return asyncio.run(registry.reclaim_orphans(client))  # type: ignore[arg-type]


def test_a_record_is_private_and_names_its_owner(state_dir: Path) -> None:
    old = os.umask(0)  # the most permissive umask: the modes must not follow it
    try:
        registry.record(URL, "k1")
    finally:
        os.umask(old)
    (path,) = registry_dir().glob("remote-kernel-*.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(registry_dir().stat().st_mode) == 0o700
    data = json.loads(path.read_text())
    me = psutil.Process()
    assert data == {"pid": me.pid, "create_time": me.create_time(), "url": URL, "kernel_id": "k1"}
    assert "token" not in path.read_text()
    assert registry.records() == [data]
    assert registry.owner_alive(data)
    registry.forget(URL, "k1")
    assert registry.records() == []
    registry.forget(URL, "k1")  # forgetting twice is no error


def test_unreadable_and_incomplete_records_are_skipped() -> None:
    folder = registry_dir()
    (folder / "remote-kernel-bad.json").write_text("{not json")
    (folder / "remote-kernel-list.json").write_text("[1, 2]")
    (folder / "remote-kernel-half.json").write_text(json.dumps({"pid": 1, "url": URL}))
    (folder / "unrelated.json").write_text(json.dumps({"pid": 1, "url": URL, "kernel_id": "x"}))
    write_record("good", 1)
    assert [r["kernel_id"] for r in registry.records()] == ["good"]


def test_owner_alive(dead_pid: int) -> None:
    me = psutil.Process()
    assert registry.owner_alive({"pid": me.pid, "create_time": me.create_time()})
    # The same pid, started at another time: the pid was reused, the owner is gone.
    assert not registry.owner_alive({"pid": me.pid, "create_time": me.create_time() - 3600})
    assert not registry.owner_alive({"pid": dead_pid, "create_time": 0})
    assert not registry.owner_alive({"pid": "not a pid"})
    assert not registry.owner_alive({"pid": me.pid, "create_time": "yesterday"})


def test_reclaim_deletes_only_orphans_on_this_server(dead_pid: int) -> None:
    me = psutil.Process()
    write_record("orphan", dead_pid)
    write_record("orphan-elsewhere", dead_pid, url=OTHER_URL)
    write_record("alive", me.pid, create_time=me.create_time())
    client = FakeClient(URL)
    assert reclaim(client) == ["orphan"]
    assert client.calls == [("DELETE", "api/kernels/orphan")]
    left = sorted(r["kernel_id"] for r in registry.records())
    assert left == ["alive", "orphan-elsewhere"]


def test_reclaim_quotes_the_kernel_id(dead_pid: int) -> None:
    write_record("a b", dead_pid)
    client = FakeClient(URL)
    assert reclaim(client) == ["a b"]
    assert client.calls == [("DELETE", "api/kernels/a%20b")]


def test_a_kernel_already_gone_is_forgotten(dead_pid: int) -> None:
    write_record("gone", dead_pid)
    client = FakeClient(URL, {"gone": RemoteHTTPError("DELETE", URL, 404, "Not Found")})
    assert reclaim(client) == ["gone"]
    assert registry.records() == []


def test_an_unreachable_server_keeps_the_record_for_next_time(
    dead_pid: int, caplog: pytest.LogCaptureFixture
) -> None:
    write_record("later", dead_pid)
    write_record("now", dead_pid)
    client = FakeClient(URL, {"later": RemoteUnreachableError("no route to server.example")})
    assert reclaim(client) == ["now"]
    assert [r["kernel_id"] for r in registry.records()] == ["later"]
    assert "could not reclaim orphaned remote kernel later" in caplog.text
