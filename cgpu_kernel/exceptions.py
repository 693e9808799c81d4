"""Every error cgpu-kernel raises on purpose, in one tree.

Each message says what failed and what to do about it; none contains a token or a URL with
credentials, so any of them may be logged or shown in a notebook cell.

* :exc:`CgpuError` (root)

  * :exc:`MalformedMessageError` -- bytes that are not a Jupyter message (dropped and logged).
  * :exc:`ConfigurationError` -- an option, kernelspec or token that cannot work as given.
  * :exc:`RemoteError` -- the remote Jupyter server or its kernel failed us.

    * :exc:`RemoteUnreachableError` -- no answer at the URL (refused, DNS, TLS, timeout).
    * :exc:`RemoteAuthError` -- the server refused our credentials (401/403).
    * :exc:`RemoteProtocolError` -- the server answered something that is not Jupyter.
    * :exc:`RemoteKernelSpecError` -- the remote has no kernelspec by the requested name.
    * :exc:`RemoteKernelGoneError` -- the remote kernel died, was deleted or restarted.
    * :exc:`StartupTimeoutError` -- the remote kernel was not ready within the deadline.
    * :exc:`ReconnectBudgetError` -- the connection did not come back within the budget.
    * :exc:`ReplyLostError` -- a cell's result was lost in an outage (the kernel is fine).
"""

from __future__ import annotations


class CgpuError(Exception):
    """Root of every error cgpu-kernel raises on purpose."""

    #: Short name shown as ``ename`` in a notebook cell.
    ename = "CgpuKernelError"


class MalformedMessageError(CgpuError):
    """Bytes that do not form a Jupyter message; the message is dropped and logged."""

    ename = "MalformedMessage"


class ConfigurationError(CgpuError):
    """An option, kernelspec or credential that cannot work as given."""

    ename = "CgpuConfigurationError"


class RemoteError(CgpuError):
    """The remote Jupyter server or its kernel failed."""

    ename = "RemoteKernelError"


class RemoteUnreachableError(RemoteError):
    ename = "RemoteUnreachable"


class RemoteAuthError(RemoteError):
    ename = "RemoteAuthenticationFailed"


class RemoteProtocolError(RemoteError):
    ename = "RemoteProtocolError"


class RemoteKernelSpecError(RemoteError):
    ename = "RemoteKernelSpecNotFound"


class RemoteKernelGoneError(RemoteError):
    ename = "RemoteKernelLost"


class StartupTimeoutError(RemoteError):
    ename = "RemoteStartupTimeout"


class ReconnectBudgetError(RemoteError):
    ename = "RemoteConnectionLost"


class ReplyLostError(RemoteError):
    ename = "RemoteReplyLost"
