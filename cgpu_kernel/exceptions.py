"""Every error cgpu-kernel raises on purpose, in one tree.

Each error carries its context as attributes (the HTTP status, the URL with its credentials
removed, the kernel) and builds its message from it, so that code deciding what an error means
reads the attributes, never the text. Each message says what failed and what to do about it;
none contains a token or a URL with credentials, so any of them may be logged or shown in a
notebook cell. Each class names the ``ename`` a notebook cell shows and the ``category`` that
``cgpu-kernel run`` reports (``cgpu_kernel.run.outcomes`` reads it from the class).

* :exc:`CgpuError` (root)

  * :exc:`MalformedMessageError` -- bytes that are not a Jupyter message (dropped and logged).
  * :exc:`ConfigurationError` -- an option, kernelspec or token that cannot work as given.
  * :exc:`ChannelsClosedError` -- a send on a channels WebSocket that has closed (not sent).
  * :exc:`RemoteError` -- the remote Jupyter server or its kernel failed us.

    * :exc:`RemoteUnreachableError` -- no answer at the URL (refused, DNS, TLS, timeout).
    * :exc:`RemoteAuthError` -- the server refused our credentials (401/403).

      * :exc:`ColabAuthError` -- Google refused our credentials for Colab (or there are none).

    * :exc:`RemoteProtocolError` -- the server answered something that is not Jupyter.

      * :exc:`RemoteHTTPError` -- an HTTP status with no more specific meaning (``status``).
      * :exc:`ColabHTTPError` -- the same, from Colab's own API (``code`` is ``status``).
      * :exc:`ColabAPIChangedError` -- Colab answered in a shape we do not know.

    * :exc:`RemoteKernelSpecError` -- the remote has no kernelspec by the requested name.
    * :exc:`RemoteKernelGoneError` -- the remote kernel died, was deleted or restarted.

      * :exc:`ColabRuntimeGoneError` -- Colab reclaimed or released the runtime.

    * :exc:`StartupTimeoutError` -- the remote kernel was not ready within the deadline.
    * :exc:`ReconnectBudgetError` -- the connection did not come back within the budget.
    * :exc:`ReplyLostError` -- a cell's result was lost in an outage (the kernel is fine).
    * :exc:`RemoteMessageTooBigError` -- the server refused a message over its size limit.
    * :exc:`ColabError` -- Colab refused or failed an assignment step.

      * :exc:`ColabQuotaError`, :exc:`ColabDeniedError`, :exc:`ColabTooManyRuntimesError`,
        :exc:`ColabUnavailableError`.

  * :exc:`FileTransferError` -- a ``%cgpu`` / ``cgpu-kernel files`` transfer failed (nothing was
    left under the final name).

    * :exc:`FileMagicError` -- a ``%cgpu`` line that cannot be read (the usage is in the text).
    * :exc:`LocalPathError` -- a local file missing, or a download leaving the working folder.
    * :exc:`RemotePathError` -- a remote path refused: ``..`` out of the root, missing, refused
      by the server.
    * :exc:`DiskFullError` -- no space left, on this machine or the remote (``where`` says).
    * :exc:`TransferVerifyError` -- the copy's size or SHA-256 differs from the original's.
    * :exc:`ContentsUnsupportedError` -- the remote has no Contents API (a Kernel Gateway).
"""

from __future__ import annotations

#: Said wherever Colab answers in a shape this version does not know.
NEWER_VERSION_HINT = "Colab's API may have changed. Check for a newer cgpu-kernel."


class CgpuError(Exception):
    """Root of every error cgpu-kernel raises on purpose."""

    #: Short name shown as ``ename`` in a notebook cell.
    ename = "CgpuKernelError"
    #: What ``cgpu-kernel run`` calls this outcome (``errorCode`` and exit status follow from it).
    category = "remote_start"

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        kernel: str | None = None,
    ) -> None:
        super().__init__(message)
        #: Where it happened, with any credentials already removed (``safe_url``), if known.
        self.url = url
        #: The HTTP status that caused it, if one did.
        self.status = status
        #: The remote kernel it concerns, if one.
        self.kernel = kernel

    @property
    def message(self) -> str:
        return str(self)


class MalformedMessageError(CgpuError):
    """Bytes that do not form a Jupyter message; the message is dropped and logged."""

    ename = "MalformedMessage"
    category = "unknown"


class ConfigurationError(CgpuError):
    """An option, kernelspec or credential that cannot work as given."""

    ename = "CgpuConfigurationError"
    category = "configuration"


class ChannelsClosedError(CgpuError):
    """Sending on a channels WebSocket that has closed (the message was not sent)."""

    ename = "RemoteConnectionLost"
    category = "connection"

    def __init__(self, message: str = "the channels WebSocket is closed") -> None:
        super().__init__(message)


class RemoteError(CgpuError):
    """The remote Jupyter server or its kernel failed."""

    ename = "RemoteKernelError"


class RemoteUnreachableError(RemoteError):
    ename = "RemoteUnreachable"
    category = "connection"


class RemoteNoAnswerError(RemoteUnreachableError):
    """The server accepted the connection and the request, then sent no answer within the
    request timeout. Colab's keep-alive reads this as a ping sent (the runtime often never
    answers it); everything else treats it as unreachable."""


class RemoteAuthError(RemoteError):
    ename = "RemoteAuthenticationFailed"
    category = "auth"


class RemoteProtocolError(RemoteError):
    ename = "RemoteProtocolError"


class RemoteHTTPError(RemoteProtocolError):
    """An HTTP status this code has no more specific meaning for; ``status`` says which."""

    def __init__(self, method: str, url: str, status: int, reason: str) -> None:
        super().__init__(
            f"{method} {url} failed with HTTP {status}: {reason}", url=url, status=status
        )
        self.method = method
        self.reason = reason


class RemoteKernelSpecError(RemoteError):
    ename = "RemoteKernelSpecNotFound"


class RemoteKernelGoneError(RemoteError):
    ename = "RemoteKernelLost"
    category = "kernel_lost"


class StartupTimeoutError(RemoteError):
    ename = "RemoteStartupTimeout"
    category = "kernel_timeout"


class ReconnectBudgetError(RemoteError):
    ename = "RemoteConnectionLost"
    category = "connection"


class RemoteMessageTooBigError(RemoteError):
    """The server refused a message of ours as over its WebSocket size limit (close code 1009,
    or the connection dropped each time it was sent); it was not delivered and is not re-sent."""

    ename = "RemoteMessageTooBig"
    category = "connection"


class ReplyLostError(RemoteError):
    ename = "RemoteReplyLost"


# --- Colab ------------------------------------------------------------------------------------


class ColabError(RemoteError):
    """Colab refused or failed an assignment step."""

    ename = "ColabError"


class ColabAuthError(RemoteAuthError):
    """Google refused our credentials for Colab (or there are none)."""

    ename = "ColabAuthenticationFailed"


class ColabQuotaError(ColabError):
    ename = "ColabQuotaExceeded"


class ColabNotEntitledError(ColabQuotaError):
    """HTTP 400 to an assignment with an accelerator: the account may not have it (tier or
    quota; google-colab-cli ``session.py``). A kind of quota refusal, so fallbacks apply."""

    ename = "ColabAcceleratorNotEntitled"


class ColabDeniedError(ColabError):
    ename = "ColabAssignmentDenied"


class ColabTooManyRuntimesError(ColabError):
    ename = "ColabTooManyRuntimes"


class ColabUnavailableError(ColabError):
    ename = "ColabAcceleratorUnavailable"


class ColabRuntimeGoneError(RemoteKernelGoneError):
    """The assigned runtime is no longer listed: Colab reclaimed or released it."""

    ename = "ColabRuntimeGone"


class ColabHTTPError(RemoteProtocolError):
    """Colab answered with an HTTP status this code has no specific meaning for."""

    def __init__(
        self, message: str, code: int, *, url: str | None = None, reason: str = ""
    ) -> None:
        super().__init__(message, url=url, status=code)
        #: What the server said (a JSON ``message``, else the reason phrase).
        self.reason = reason

    @property
    def code(self) -> int:
        """The HTTP status (``status``), under the name tornado uses."""
        assert self.status is not None
        return self.status


class ColabAPIChangedError(RemoteProtocolError):
    """Colab answered in a shape this version does not know: what is missing, and where."""

    def __init__(self, what: str, *, url: str | None = None) -> None:
        super().__init__(f"{what}: {NEWER_VERSION_HINT}", url=url)
        self.what = what


class FileTransferError(CgpuError):
    """A file transfer (``%cgpu upload``/``download``/``ls``, ``cgpu-kernel files``) failed.

    Raised by ``backends.contents`` and ``proxy.files``; the transfer removed what it had
    written, so nothing is left under the final name. ``run`` reports it as ``io``."""

    ename = "CgpuFileTransferError"
    category = "io"


class FileMagicError(FileTransferError):
    """A ``%cgpu`` line that cannot be read; the message carries the usage."""

    ename = "CgpuMagicUsageError"


class LocalPathError(FileTransferError):
    """A local path that is missing, or that a download may not write (outside the folder)."""

    ename = "CgpuLocalPathError"


class RemotePathError(FileTransferError):
    """A remote path refused: ``..`` out of the server's root, missing, or refused by it."""

    ename = "CgpuRemotePathError"


class DiskFullError(FileTransferError):
    """No space left: ``where`` is ``"local"`` (this machine) or ``"remote"`` (the server)."""

    ename = "CgpuDiskFullError"

    def __init__(self, message: str, *, where: str, url: str | None = None) -> None:
        super().__init__(message, url=url)
        self.where = where


class TransferVerifyError(FileTransferError):
    """The copy's size or SHA-256 differs from the original's (it was removed)."""

    ename = "CgpuTransferVerifyError"


class ContentsUnsupportedError(FileTransferError):
    """The remote server has no Contents API (a Kernel Gateway), or this backend offers none."""

    ename = "CgpuFilesUnsupported"


def categories() -> dict[str, str]:
    """``ename`` -> ``category`` for every error in the tree (what ``run`` reads off a cell).

    Where two classes share an ``ename`` the more general one wins, so a subclass that only adds
    context never changes how ``run`` reports it.
    """
    found: dict[str, str] = {}
    pending: list[type[CgpuError]] = [CgpuError]
    while pending:
        cls = pending.pop(0)
        found.setdefault(cls.ename, cls.category)
        pending.extend(cls.__subclasses__())
    return found
