"""The ``%cgpu`` magic's I/O: what a command means on disk and on the remote, then the copies.

``proxy.kernel`` runs :meth:`FileMagic.run` for each ``RunFiles`` action (a ``%cgpu`` cell, or
the ``upload_on_start`` option) and ``cli.files`` for ``cgpu-kernel files``. The decisions that
need no I/O are ``core.files``' (parsing, remote paths, the progress line); the HTTP is
``backends.contents``'. This module expands globs and folders, picks each file's destination,
keeps downloads inside the local working folder, and reports progress through ``emit``.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass

from cgpu_kernel.backends.base import ContentsTarget
from cgpu_kernel.backends.contents import ContentsClient
from cgpu_kernel.core.files import HELP, FileCommand, Progress, human_bytes, remote_path
from cgpu_kernel.exceptions import LocalPathError, RemotePathError

#: Shows text in the cell (stdout, no newline added).
Emit = Callable[[str], None]


@dataclass(frozen=True)
class Copy:
    """One file to copy: ``source`` to ``target`` (local paths and Contents paths)."""

    source: str
    target: str
    size: int


class FileMagic:
    """Runs ``%cgpu`` commands for one proxy (or one ``cgpu-kernel files`` call)."""

    def __init__(
        self,
        target: Callable[[], ContentsTarget],
        emit: Emit,
        *,
        local_cwd: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._target = target
        self.emit = emit
        self.local_cwd = os.path.abspath(local_cwd or os.getcwd())
        self.clock = clock

    async def run(self, command: FileCommand) -> None:
        """Carry out ``command``; raises a :exc:`~cgpu_kernel.exceptions.FileTransferError`
        (or another ``CgpuError``) that says what failed, having left nothing behind."""
        if command.verb == "help":
            self.emit(HELP)
            return
        target = self._target()
        client = ContentsClient(target)
        try:
            await client.check_available()
            if command.verb == "ls":
                await self._ls(client, target, command.args[0] if command.args else "")
            elif command.verb == "upload":
                await self._copy(
                    client, "Uploaded", await self._plan_upload(client, target, command.args)
                )
            else:
                await self._copy(
                    client, "Downloaded", await self._plan_download(client, target, command.args)
                )
        finally:
            client.close()

    # --- ls ---------------------------------------------------------------------------------

    async def _ls(self, client: ContentsClient, target: ContentsTarget, path: str) -> None:
        where = remote_path(target.cwd, path)
        model = await client.stat(where)
        if model is None:
            raise RemotePathError(f"{path or '.'} does not exist on {target.name}.")
        if model.get("type") != "directory":
            self.emit(f"{human_bytes(model.get('size') or 0):>10}  {model.get('name')}\n")
            return
        entries = sorted(await client.listdir(where), key=lambda e: (e.type != "directory", e.name))
        lines = [
            f"{'folder' if e.type == 'directory' else human_bytes(e.size or 0):>10}  {e.name}"
            + ("/" if e.type == "directory" else "")
            for e in entries
        ]
        self.emit("\n".join(lines) + ("\n" if lines else f"({path or '.'} is empty)\n"))

    # --- planning ---------------------------------------------------------------------------

    def _local_sources(self, pattern: str) -> list[str]:
        full = os.path.join(self.local_cwd, os.path.expanduser(pattern))
        if glob.has_magic(pattern):
            found = sorted(glob.glob(full, recursive=True))
            if not found:
                raise LocalPathError(
                    f"No local file matches {pattern!r} (in {self.local_cwd}). Check the pattern."
                )
            return found
        if not os.path.exists(full):
            raise LocalPathError(
                f"{pattern} does not exist here ({self.local_cwd}). Give a path relative to the"
                " notebook's folder, or an absolute one."
            )
        return [full]

    def _default_name(self, local: str, given: str) -> str:
        """Where ``local`` goes when no destination was given: the same relative path when it
        is inside the working folder and was given relative, else its name."""
        relative = os.path.relpath(local, self.local_cwd)
        if os.path.isabs(os.path.expanduser(given)) or relative.startswith(os.pardir):
            return os.path.basename(os.path.normpath(local))
        return relative.replace(os.sep, "/")

    async def _plan_upload(
        self, client: ContentsClient, target: ContentsTarget, args: tuple[str, ...]
    ) -> list[Copy]:
        pattern = args[0]
        sources = self._local_sources(pattern)
        dest = args[1] if len(args) > 1 else None
        if dest is not None:
            base = remote_path(target.cwd, dest)
            existing = await client.stat(base)
            into = (
                dest.endswith("/")
                or len(sources) > 1
                or glob.has_magic(pattern)
                or (existing is not None and existing.get("type") == "directory")
            )
        copies: list[Copy] = []
        for source in sources:
            if dest is None:
                root = remote_path(target.cwd, self._default_name(source, pattern))
            elif into:
                root = posixpath.join(base, os.path.basename(os.path.normpath(source)))
            else:
                root = base
            for local, relative in _local_files(source):
                remote = posixpath.join(root, relative) if relative else root
                copies.append(Copy(local, remote, os.path.getsize(local)))
        return copies

    async def _plan_download(
        self, client: ContentsClient, target: ContentsTarget, args: tuple[str, ...]
    ) -> list[Copy]:
        given = args[0]
        folder, last = posixpath.split(given)
        if glob.has_magic(last):
            parent = remote_path(target.cwd, folder)
            sources = [
                e.path
                for e in sorted(await client.listdir(parent), key=lambda e: e.name)
                if fnmatch.fnmatchcase(e.name, last)
            ]
            if not sources:
                raise RemotePathError(f"Nothing on {target.name} matches {given!r}.")
        else:
            sources = [remote_path(target.cwd, given)]
        dest = args[1] if len(args) > 1 else None
        into = dest is not None and (
            dest.endswith(("/", os.sep))
            or len(sources) > 1
            or os.path.isdir(os.path.join(self.local_cwd, dest))
        )
        copies: list[Copy] = []
        for source in sources:
            model = await client.stat(source)
            if model is None:
                raise RemotePathError(f"{given} does not exist on {target.name}.")
            name = posixpath.basename(source)
            if dest is None:
                local_root = self._remote_default_name(source, target.cwd, given)
            elif into:
                local_root = os.path.join(dest, name)
            else:
                local_root = dest
            if model.get("type") == "directory":
                async for entry in client.walk(source):
                    relative = posixpath.relpath(entry.path, source)
                    copies.append(
                        Copy(
                            entry.path,
                            self._local_target(local_root, relative, dest),
                            entry.size or 0,
                        )
                    )
            else:
                copies.append(
                    Copy(source, self._local_target(local_root, "", dest), model.get("size") or 0)
                )
        return copies

    @staticmethod
    def _remote_default_name(source: str, cwd: str, given: str) -> str:
        inside = cwd.strip("/")
        if not given.startswith("/") and (not inside or source.startswith(inside + "/")):
            return source[len(inside) + 1 :] if inside else source
        return posixpath.basename(source)

    def _local_target(self, root: str, relative: str, given: str | None) -> str:
        """The local path of a downloaded file; refuses one outside the working folder unless
        the user gave an absolute destination."""
        path = os.path.join(root, *relative.split("/")) if relative else root
        full = os.path.normpath(os.path.join(self.local_cwd, os.path.expanduser(path)))
        if given is not None and os.path.isabs(os.path.expanduser(given)):
            return full
        cwd = os.path.realpath(self.local_cwd)
        real = os.path.realpath(full)
        if os.path.commonpath([cwd, real]) != cwd:
            raise LocalPathError(
                f"{path} is outside this folder ({self.local_cwd}); a download writes outside it"
                " only to an absolute path you give."
            )
        return full

    # --- copying ----------------------------------------------------------------------------

    async def _copy(self, client: ContentsClient, verb: str, copies: list[Copy]) -> None:
        if not copies:
            self.emit(f"{verb} nothing: the folder is empty.\n")
            return
        progress = Progress(sum(c.size for c in copies), self.clock())

        def moved(count: int) -> None:
            line = progress.advance(count, self.clock())
            if line is not None:
                self.emit(line)

        for copy in copies:
            if verb == "Uploaded":
                await client.upload(copy.source, copy.target, moved)
            else:
                await client.download(copy.source, copy.target, moved)
        self.emit(progress.summary(verb, len(copies), self.clock()))


def _local_files(source: str) -> list[tuple[str, str]]:
    """``source`` itself (a file: relative path ""), or every file under it (a folder)."""
    if not os.path.isdir(source):
        return [(source, "")]
    found: list[tuple[str, str]] = []
    for folder, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            found.append((path, os.path.relpath(path, source).replace(os.sep, "/")))
    return found
