"""What the relay asks its shell to do: one frozen dataclass per kind of action.

:class:`~cgpu_kernel.core.relay.Relay` returns lists of these from every event method;
``proxy.kernel.ProxyKernelRun.perform`` carries them out with a ``match`` over :data:`Action`
that mypy checks is exhaustive, so a new action type here fails type checking until the shell
performs it. Kept apart from the relay so a reader of the shell sees the whole vocabulary in one
place, and so the tests build expected actions without importing the state machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from cgpu_kernel.core.files import FileCommand
from cgpu_kernel.core.limits import SpoolData
from cgpu_kernel.core.wire import Message
from cgpu_kernel.exceptions import CgpuError


@dataclass(frozen=True)
class Request:
    """A message from one frontend, remembered until its reply is routed back."""

    channel: str
    identities: tuple[bytes, ...]
    msg: Message


@dataclass(frozen=True)
class SendToRemote:
    request: Request

    @property
    def msg(self) -> Message:
        return self.request.msg


@dataclass(frozen=True)
class SendToFrontend:
    channel: str
    identities: tuple[bytes, ...]
    msg: Message


@dataclass(frozen=True)
class Publish:
    msg: Message


@dataclass(frozen=True)
class InterruptRemote:
    request: Request | None  # None for a SIGINT, which expects no reply


@dataclass(frozen=True)
class CancelFiles:
    """Stop the ``%cgpu`` transfer under way (an interrupt while one runs); it cleans up and
    ends with ``Relay.files_finished``. No remote interrupt goes with it unless a remote cell
    runs too: one that arrived late would stop the user's next cell instead."""


@dataclass(frozen=True)
class ShutdownRemote:
    request: Request
    restart: bool


@dataclass(frozen=True)
class AnswerRemoteRequest:
    """The remote kernel asked the *client* for something only the backend can give (Colab's
    ``colab_request`` for Drive or user credentials). ``request`` is the frontend request the
    cell belongs to, for notices in its output; None when the relay cannot tell."""

    msg: Message
    request: Request | None


@dataclass(frozen=True)
class SpoolOutput:
    """Append held-back output to the spool file ``name`` (see ``limits``): bytes, or pieces
    produced while they are written (``limits.SpoolData``)."""

    name: str
    data: SpoolData


@dataclass(frozen=True)
class CloseRemote:
    """The remote kernel is gone: close the socket to it (the next request starts anew)."""


@dataclass(frozen=True)
class ConnectRemote:
    """Ask the remote shell for a (new) connection attempt."""


@dataclass(frozen=True)
class AwaitRestartedKernel:
    """The server restarted a crashed kernel: prepare the new process (its journal), then call
    :meth:`Relay.remote_connected` to send the requests held meanwhile."""


@dataclass(frozen=True)
class RunFiles:
    """A ``%cgpu`` cell: run ``command`` (a transfer, a listing, the help) in the proxy, then
    call :meth:`Relay.files_finished` (``proxy.files`` does the I/O)."""

    request: Request
    command: FileCommand


@dataclass(frozen=True)
class EndRun:
    """The remote kernel died (``on_remote_death = exit``): the proxy process ends, deleting
    what is left of the remote kernel, so the frontend sees a dead kernel, as it would a
    local one, and its own restart policy applies. ``error`` is what the log says."""

    error: CgpuError


Action = (
    SendToRemote
    | SendToFrontend
    | Publish
    | InterruptRemote
    | CancelFiles
    | ShutdownRemote
    | ConnectRemote
    | AnswerRemoteRequest
    | CloseRemote
    | SpoolOutput
    | AwaitRestartedKernel
    | RunFiles
    | EndRun
)
