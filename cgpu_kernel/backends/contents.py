"""Files to and from the remote server through its Contents API, streamed and verified.

Used by ``proxy.files`` (the ``%cgpu`` magic and ``upload_on_start``) and ``cgpu-kernel
files``. One :class:`ContentsClient` per :class:`~cgpu_kernel.backends.base.ContentsTarget`;
every request is built by ``backends.http`` (User-Agent, token in a header, TLS options).

* **Upload**: jupyter-server's chunked save (``PUT /api/contents/PATH`` with ``chunk`` 1, 2,
  ..., -1 and base64 content; chunk 1 creates or truncates (sent empty), the others append),
  read from disk
  :data:`CHUNK` bytes at a time, so memory stays bounded whatever the size. The chunks go to a
  temporary name beside the target (``NAME.cgpu-partial-XXXX``, not hidden: the server refuses
  hidden names), then the server's SHA-256 and size (``GET ?content=0&hash=1``, jupyter-server
  2.11+) are compared with ours, and only then is the file renamed (``PATCH``) to its name
  (the server renames over nothing, so an older file there is deleted first). A failure
  deletes the temporary file: nothing is left under the final name.
* **Download**: ``GET /files/PATH`` (the server streams it from disk) written as it arrives to
  a temporary file beside the target, hashed on the way, compared with the server's size and
  SHA-256, then renamed with ``os.replace``. A failure removes the temporary file.

A server without the ``hash`` field (older than 2.11, or another Contents manager) is checked
by size and by reading the copy back (upload) through ``/files``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import json
import os
import posixpath
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from cgpu_kernel.backends.base import ContentsTarget
from cgpu_kernel.backends.http import Service, TLSOptions, build_request, fetch, safe_url
from cgpu_kernel.exceptions import (
    CgpuError,
    ContentsUnsupportedError,
    DiskFullError,
    FileTransferError,
    LocalPathError,
    RemotePathError,
    TransferVerifyError,
)

#: Bytes sent per chunk, one request each (jupyter-server takes a body up to its
#: ``max_body_size``, 512 MiB by default, and decodes it whole; JupyterLab sends 1 MiB).
CHUNK = 8 << 20
#: Bytes read, hashed and encoded at once while a chunk is sent (a multiple of 3, so the
#: pieces' base64 joins into the chunk's): what an upload holds in memory.
PIECE = 3 << 18
#: A whole download is one response: seconds it may take in all.
DOWNLOAD_TIMEOUT = 24 * 3600.0
#: Seconds one chunk (or one small call) may take.
CALL_TIMEOUT = 300.0
PARTIAL = ".cgpu-partial-"
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation

#: Called with the count of bytes just moved (for the progress line).
OnBytes = Callable[[int], None]


@dataclass(frozen=True)
class RemoteEntry:
    """One entry of a remote listing: its Contents path, type, size (files) and name."""

    path: str
    type: str
    size: int | None
    name: str


def _disk_full(text: str) -> bool:
    return "No space left" in text or "Errno 28" in text or "ENOSPC" in text


class ContentsClient:
    """The Contents API of one server; paths here are Contents paths (from the server's root)."""

    def __init__(self, target: ContentsTarget, *, chunk: int = CHUNK) -> None:
        self.target = target
        self.chunk = chunk
        self.base_url = target.base_url if target.base_url.endswith("/") else target.base_url + "/"
        # downloads stream, so the client's body limit never holds a file in memory
        self._http = AsyncHTTPClient(force_instance=True, max_body_size=1 << 62)
        self._tls = TLSOptions(target.validate_cert, target.ca_certs)

    def close(self) -> None:
        self._http.close()

    # --- requests ---------------------------------------------------------------------------

    def _service(self, path: str) -> Service:
        return Service(
            name=target_name(self.target, path),
            no_answer_hint="Check that the server is running and reachable.",
            network_hint="Check that the server is running and reachable.",
            http_error=self._http_error,
        )

    def _http_error(self, method: str, url: str, status: int, reason: str) -> CgpuError:
        where = self.target.name
        if _disk_full(reason):
            return DiskFullError(
                f"The remote disk is full: {where} could not write ({reason}). Free space on"
                " the remote (delete files there), then run the transfer again.",
                where="remote",
                url=url,
            )
        if status == 404:
            return RemotePathError(f"Not found on {where}: {reason}", url=url, status=status)
        if status in (400, 403, 409):
            return RemotePathError(
                f"{where} refused {method} ({status}): {reason}", url=url, status=status
            )
        return FileTransferError(
            f"{where} failed {method} (HTTP {status}): {reason}", url=url, status=status
        )

    def _request(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        *,
        timeout: float = CALL_TIMEOUT,
        **kwargs: Any,
    ) -> HTTPRequest:
        request = build_request(
            url,
            method=method,
            headers=dict(self.target.headers()),
            body=body,
            tls=self._tls,
            request_timeout=timeout,
        )
        for key, value in kwargs.items():
            setattr(request, key, value)
        return request

    def _api(self, path: str, query: str = "") -> str:
        return self.base_url + "api/contents/" + quote(path) + (f"?{query}" if query else "")

    async def _call(self, method: str, path: str, body: Any = None, query: str = "") -> Any:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body))
        request = self._request(
            method, self._api(path, query), None if data is None else _as_bytes(data)
        )
        response = await fetch(self._http, request, self._service(path))
        return json.loads(response.body) if response.body else None

    # --- queries ----------------------------------------------------------------------------

    async def stat(self, path: str, *, with_hash: bool = False) -> dict[str, Any] | None:
        """The model of ``path`` without its content (None when it does not exist)."""
        query = "content=0" + ("&hash=1" if with_hash else "")
        try:
            model = await self._call("GET", path, query=query)
        except RemotePathError as exc:
            if exc.status == 404:
                return None
            raise
        except FileTransferError as exc:
            if exc.status != 500:
                raise
            # jupyter-server answers 500 for a path through a file ("afile/x")
            raise RemotePathError(
                f"{self.target.name} could not look up {path} ({exc}). Check that each folder"
                " on the way is a folder, not a file.",
                url=exc.url,
                status=exc.status,
            ) from None
        return model if isinstance(model, dict) else None

    async def check_available(self) -> None:
        """Raise :exc:`ContentsUnsupportedError` when the server has no Contents API at all
        (a Kernel Gateway answers 404 for its root)."""
        try:
            await self._call("GET", "", query="content=0")
        except RemotePathError as exc:
            if exc.status == 404:
                raise ContentsUnsupportedError(
                    f"{self.target.name} has no Contents API (a Jupyter Kernel Gateway has"
                    " none), so files cannot be moved through it. Copy them another way, or"
                    " use a Jupyter server."
                ) from None
            raise

    async def listdir(self, path: str) -> list[RemoteEntry]:
        """The entries of the remote folder ``path`` (raises :exc:`RemotePathError` for a
        file or a missing folder)."""
        model = await self._call("GET", path, query="type=directory&content=1")
        content = model.get("content") if isinstance(model, dict) else None
        if not isinstance(content, list):
            raise RemotePathError(f"{path or '/'} on {self.target.name} is not a folder.")
        return [
            RemoteEntry(e["path"], e["type"], e.get("size"), e["name"])
            for e in content
            if isinstance(e, dict)
        ]

    async def walk(self, path: str) -> AsyncIterator[RemoteEntry]:
        """Every file under the remote folder ``path``, depth first."""
        for entry in sorted(await self.listdir(path), key=lambda e: e.name):
            if entry.type == "directory":
                async for inner in self.walk(entry.path):
                    yield inner
            else:
                yield entry

    async def mkdir(self, path: str) -> None:
        """Create the remote folder ``path`` and its parents (existing ones are kept)."""
        parts = [p for p in path.split("/") if p]
        for depth in range(1, len(parts) + 1):
            sub = "/".join(parts[:depth])
            model = await self.stat(sub)
            if model is None:
                await self._call("PUT", sub, {"type": "directory"})
            elif model.get("type") != "directory":
                raise RemotePathError(f"{sub} on {self.target.name} is a file, not a folder.")

    async def delete(self, path: str) -> None:
        try:
            await self._call("DELETE", path)
        except RemotePathError as exc:
            if exc.status != 404:
                raise

    # --- upload -----------------------------------------------------------------------------

    async def upload(self, local: str, remote: str, on_bytes: OnBytes) -> int:
        """Copy the local file ``local`` to the Contents path ``remote``; returns its size."""
        folder, name = posixpath.split(remote)
        if not name:
            raise RemotePathError(f"The remote path {remote!r} names no file.")
        if folder:
            await self.mkdir(folder)
        existing = await self.stat(remote)
        if existing is not None and existing.get("type") == "directory":
            raise RemotePathError(
                f"{remote} on {self.target.name} is a folder: give a file name, or upload into"
                " it with a trailing '/'."
            )
        partial = posixpath.join(folder, f"{name}{PARTIAL}{secrets.token_hex(4)}")
        digest = hashlib.sha256()
        size = 0
        try:
            with open(local, "rb") as source:
                # chunk 1 (written through the server's atomic writer, which hides the reason
                # of a failure) only creates the file; the data goes in appended chunks, whose
                # failure says why (a full disk: "[Errno 28] No space left on device")
                await self._put_chunk(partial, 1, None, 0, digest, on_bytes)
                total = os.fstat(source.fileno()).st_size
                number = 2
                while True:
                    count = min(self.chunk, total - size)
                    last = size + count >= total
                    await self._put_chunk(
                        partial, -1 if last else number, source, count, digest, on_bytes
                    )
                    size += count
                    if last:
                        break
                    number += 1
            await self._verify_remote(partial, size, digest.hexdigest())
            if existing is not None:
                await self.delete(remote)
            await self._call("PATCH", partial, {"path": remote})
        except BaseException as exc:
            removed = await self._discard(partial)
            if not removed and isinstance(exc, CgpuError):
                exc.args = (
                    f"{exc} The incomplete copy {partial} could not be removed (a server that"
                    " deletes to its trash needs free space for that too): delete it from a"
                    f" cell with `import os; os.remove({posixpath.basename(partial)!r})` once"
                    " there is room.",
                )
            raise
        return size

    async def _discard(self, partial: str) -> bool:
        """Remove a failed upload's temporary file; False when the server would not (on a
        full disk, jupyter-server's delete-to-trash fails: the trash needs space too)."""
        try:
            await self.delete(partial)
        except CgpuError:
            return False
        return True

    async def _put_chunk(
        self,
        path: str,
        number: int,
        source: BinaryIO | None,
        count: int,
        digest: Any,
        on_bytes: OnBytes,
    ) -> None:
        """PUT chunk ``number``: the next ``count`` bytes of ``source``, read, hashed and
        base64-encoded :data:`PIECE` bytes at a time while the body is being sent, so memory
        holds one piece, never the chunk."""
        head = b'{"type":"file","format":"base64","chunk":%d,"content":"' % number
        tail = b'"}'
        length = len(head) + 4 * -(-count // 3) + len(tail)

        async def produce(write: Callable[[bytes], Any]) -> None:
            await write(head)
            left = count
            while left:
                piece = source.read(min(PIECE, left)) if source is not None else b""
                if not piece:
                    raise LocalPathError(
                        f"{getattr(source, 'name', 'The file')} got shorter while it was being"
                        " uploaded. Upload it again once nothing writes to it."
                    )
                left -= len(piece)
                digest.update(piece)
                await write(base64.b64encode(piece))
                on_bytes(len(piece))
            await write(tail)

        request = self._request("PUT", self._api(path), body_producer=produce)
        request.headers["Content-Length"] = str(length)
        request.headers["Content-Type"] = "application/json"
        await fetch(self._http, request, self._service(path))

    async def _verify_remote(self, path: str, size: int, sha256: str) -> None:
        model = await self.stat(path, with_hash=True)
        if model is None:
            raise TransferVerifyError(f"{path} vanished from {self.target.name} during upload.")
        remote_size = model.get("size")
        remote_hash = model.get("hash") if model.get("hash_algorithm") == "sha256" else None
        if remote_hash is None:
            remote_hash = await self._read_back_hash(path)
        if remote_size not in (None, size) or remote_hash != sha256:
            raise TransferVerifyError(
                f"The upload to {self.target.name} arrived damaged (size {remote_size} against"
                f" {size}, or its SHA-256 differs); it was removed. Run the transfer again."
            )

    async def _read_back_hash(self, path: str) -> str:
        digest = hashlib.sha256()
        await self._stream(path, digest.update)
        return digest.hexdigest()

    # --- download ---------------------------------------------------------------------------

    async def _stream(self, path: str, sink: Callable[[bytes], None]) -> None:
        url = self.base_url + "files/" + quote(path)
        request = self._request("GET", url, timeout=DOWNLOAD_TIMEOUT, streaming_callback=sink)
        await fetch(self._http, request, self._service(path))

    async def download(self, remote: str, local: str, on_bytes: OnBytes) -> int:
        """Copy the remote file ``remote`` to the local path ``local``; returns its size."""
        found = await self.stat(remote)
        if found is None:
            raise RemotePathError(f"{remote} does not exist on {self.target.name}.")
        if found.get("type") == "directory":
            raise RemotePathError(f"{remote} on {self.target.name} is a folder.")
        folder = os.path.dirname(os.path.abspath(local))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise _local_error(exc, local) from None
        partial = os.path.join(folder, f".{os.path.basename(local)}{PARTIAL}{secrets.token_hex(4)}")
        try:
            sink = _DiskSink(partial, on_bytes)
        except OSError as exc:
            raise _local_error(exc, local) from None
        try:
            try:
                # the server's SHA-256 is asked for alongside, so that it is worked out while the
                # bytes arrive: on loopback it takes about as long as the transfer (the server
                # reads the file again and hashes it on its event loop; docs/files.md)
                checked = asyncio.ensure_future(self.stat(remote, with_hash=True))
                try:
                    await self._stream(remote, sink.feed)
                    sink.finish()
                except BaseException:
                    checked.cancel()
                    raise
                model = await checked
            except OSError as exc:
                raise _local_error(exc, local) from None
            finally:
                sink.close()
            if model is None:
                raise RemotePathError(f"{remote} vanished from {self.target.name}.")
            size = model.get("size")
            expected_hash = model.get("hash") if model.get("hash_algorithm") == "sha256" else None
            if (size is not None and size != sink.written) or (
                expected_hash is not None and expected_hash != sink.hexdigest()
            ):
                raise TransferVerifyError(
                    f"The download of {remote} arrived damaged ({sink.written} bytes against"
                    f" {size}, or its SHA-256 differs); nothing was written to {local}. Run"
                    " the transfer again."
                )
            os.replace(partial, local)
        except BaseException:
            _unlink(partial)
            raise
        return sink.written


class _DiskSink:
    """A download's bytes on their way into its temporary file and its SHA-256.

    :meth:`ContentsClient.download` gives :meth:`feed` to tornado as the streaming callback:
    each piece (tornado's, 64 KiB) is written and hashed at once, on the event loop, which
    reads the next piece only then, so the socket is read as fast as the disk and the hash
    take the bytes (TCP slows the server down when they fall behind) and memory holds one
    piece. Measured on the shared two-core machine (docs/files.md, "Throughput"), this uses
    the least CPU, which is what a busy machine has least of: a writing thread fed each piece
    through a blocking ``queue.Queue`` (before) cost two GIL hand-offs and a thread wake-up per
    piece, blocked the loop whenever the queue was full (29% of its py-spy samples) and used
    0.20-0.22 s of CPU per 100 MB against 0.17-0.20 s now; a thread fed 4 MiB buffers was no
    faster than it. A write that fails (a full disk) is kept and raised by :meth:`finish`; the
    rest of the response is read and dropped.
    """

    def __init__(self, path: str, on_bytes: OnBytes) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o666)
        self._on_bytes = on_bytes
        self._digest = hashlib.sha256()
        self._failure: OSError | None = None
        #: Bytes received (all of them, written or not).
        self.written = 0

    def feed(self, piece: bytes) -> None:
        """Tornado's streaming callback: one piece of the body, in order."""
        self.written += len(piece)
        self._on_bytes(len(piece))
        if self._failure is not None:
            return
        try:
            view = memoryview(piece)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:  # a full disk: told after the response ends
            self._failure = exc
            return
        self._digest.update(piece)

    def finish(self) -> None:
        """After the whole body: raise a write's failure, else make the file durable before
        its rename (a crash must never leave a short file under the final name)."""
        if self._failure is not None:
            raise self._failure
        os.fsync(self._fd)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def close(self) -> None:
        os.close(self._fd)


def target_name(target: ContentsTarget, path: str) -> str:
    return f"{target.name} ({safe_url(target.base_url)}, {path or '/'})"


def _as_bytes(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data


def _local_error(exc: OSError, local: str) -> FileTransferError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(
            f"This machine's disk is full: {local} could not be written ({exc.strerror})."
            " Free space here, then run the transfer again; nothing was left behind.",
            where="local",
        )
    return FileTransferError(f"Could not write {local}: {exc.strerror or exc}.")


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _quietly(coroutine: Any) -> None:
    """Clean-up after a failure: its own failure must not hide the first one."""
    with contextlib.suppress(CgpuError):
        await coroutine
