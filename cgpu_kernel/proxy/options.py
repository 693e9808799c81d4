"""The proxy kernel's options, and the backend they choose.

Every option is a trait of :class:`ProxyKernel` (help text, config file, ``--kebab-case`` flag
on the kernel's command line, and a ``CGPU_*`` environment variable as fallback); the docs'
option table is generated from them. The remote server's token is not an option: it comes from
``CGPU_TOKEN`` or a token file, never argv or kernel.json.
"""

from __future__ import annotations

import contextlib
import getpass
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from traitlets import Bool, Dict, Enum, Float, Int, List, TraitError, Unicode, validate

from cgpu_kernel.backends.base import Backend
from cgpu_kernel.backends.colab.backend import ColabBackend
from cgpu_kernel.backends.jupyter import JupyterBackend
from cgpu_kernel.backends.local import LocalBackend
from cgpu_kernel.config import EnvConfigurable
from cgpu_kernel.exceptions import ConfigurationError

TOKEN_ENV = "CGPU_TOKEN"  # noqa: S105 - the variable's name, not a secret

#: The ``KERNEL_*`` variables passed on from the frontend's environment by default: the ones
#: Enterprise Gateway's process proxies read (who, where, which image, how long to wait).
KERNEL_ENV_FROM_FRONTEND = (
    "KERNEL_USERNAME",
    "KERNEL_NAMESPACE",
    "KERNEL_IMAGE",
    "KERNEL_EXECUTOR_IMAGE",
    "KERNEL_LAUNCH_TIMEOUT",
    "KERNEL_WORKING_DIR",
    "KERNEL_SERVICE_ACCOUNT_NAME",
    "KERNEL_UID",
    "KERNEL_GID",
    "KERNEL_CPUS",
    "KERNEL_MEMORY",
    "KERNEL_GPUS",
    "KERNEL_CPUS_LIMIT",
    "KERNEL_MEMORY_LIMIT",
    "KERNEL_GPUS_LIMIT",
)
#: Words that mark a variable as a credential: such a name is never sent as a kernel variable.
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")


def check_kernel_variable(name: str) -> str:
    """``name`` if it may be sent in the start request's ``env``, else a ``ValueError`` saying
    why: only ``KERNEL_*`` names (what gateways pass on to the kernel), never one that names a
    credential (it would land in kernel.json and the remote kernel's environment)."""
    if not name.startswith("KERNEL_") or not name[len("KERNEL_") :].replace("_", "").isalnum():
        raise ValueError(
            f"{name!r} is not a KERNEL_* variable name (KERNEL_ then letters, digits and"
            " underscores): only those are sent to the gateway in the kernel's start request."
        )
    if any(word in name.upper() for word in SECRET_WORDS):
        raise ValueError(
            f"{name!r} looks like a credential: it would be written into the kernelspec and the"
            " remote kernel's environment, so it is refused. Give the server's token in"
            f" {TOKEN_ENV} or a token file."
        )
    return name


def read_token(token_file: str) -> str | None:
    """The remote server's token: the token file when one is given, else ``CGPU_TOKEN``.

    Called before each request, so a renewed token file takes effect without a restart.
    """
    if token_file:
        path = Path(token_file).expanduser()
        try:
            return path.read_text().strip() or None
        except OSError as exc:
            raise ConfigurationError(
                f"Cannot read the token file {path}: {exc.strerror}. Fix the path (reinstall"
                f" with --token-file), or set {TOKEN_ENV} and install without a token file."
            ) from None
    token = os.environ.get(TOKEN_ENV)
    return token.strip() if token else None


class ProxyKernel(EnvConfigurable):
    """Options of the proxy kernel process (kernelspec argv, config file, or CGPU_* env)."""

    backend = Enum(
        ["local", "jupyter", "colab"],
        "local",
        config=True,
        help="""Where the remote kernel runs: 'local' starts a private jupyter-server on
        loopback (no account needed), 'jupyter' uses the server at --url, 'colab' a Google
        Colab runtime (sign in first with `cgpu-kernel auth login`).""",
    ).tag(env="CGPU_BACKEND")
    url = Unicode(
        "",
        config=True,
        help="""Base URL of the remote Jupyter server (jupyter backend). Give the token in
        CGPU_TOKEN or --token-file, never in the URL.""",
    ).tag(env="CGPU_URL")
    remote_kernel = Unicode(
        "python3", config=True, help="Name of the kernelspec to start on the remote server."
    ).tag(env="CGPU_REMOTE_KERNEL")
    local_server = Enum(
        ["private", "warm"],
        "private",
        config=True,
        help="""Which server the local backend's kernel runs on: 'private', a jupyter-server
        started for this kernel and stopped with it; 'warm', the one `cgpu-kernel run` keeps
        between runs (each kernel still its own, deleted at shutdown), which stops after
        local_server_idle_timeout without a kernel. `cgpu-kernel run` asks for 'warm' unless
        CGPU_LOCAL_SERVER says otherwise; `cgpu-kernel server stop` stops it.""",
    ).tag(env="CGPU_LOCAL_SERVER")
    local_server_idle_timeout = Float(
        300.0,
        config=True,
        help="""Seconds a warm local server stays up without a kernel (read when it starts;
        a claimed kernel nothing is connected to for that long is deleted too). 0: no warm
        server, every kernel gets a private one.""",
    ).tag(env="CGPU_LOCAL_SERVER_IDLE_TIMEOUT")
    token_file = Unicode(
        "",
        config=True,
        help="""File holding the remote server's token, read again before each request (a
        renewed token takes effect at once). When set it wins over CGPU_TOKEN. Keep it private
        (mode 0600).""",
    ).tag(env="CGPU_TOKEN_FILE")
    startup_timeout = Float(
        60.0,
        config=True,
        help="""Seconds to wait for the remote kernel to be ready before queued requests fail
        with a clear error. The kernel stays up and the next cell tries again.""",
    ).tag(env="CGPU_STARTUP_TIMEOUT")
    request_timeout = Float(
        30.0,
        config=True,
        help="""Seconds one REST request to the remote server (list kernelspecs, start,
        interrupt, delete a kernel) may take before it fails with an error naming this limit.
        Connecting takes at most 10 s of it. The startup deadline (--startup-timeout) bounds
        the whole start.""",
    ).tag(env="CGPU_REQUEST_TIMEOUT")
    reconnect_budget = Float(
        900.0,
        config=True,
        help="""Seconds to keep trying to reconnect after the connection drops (long enough for
        a laptop lid). After that, waiting requests fail; the next cell tries again.""",
    ).tag(env="CGPU_RECONNECT_BUDGET")
    ping_interval = Float(
        10.0,
        config=True,
        help="""Seconds between WebSocket pings; a connection whose pong does not come back
        within one more interval is treated as lost. 0 disables pings.""",
    ).tag(env="CGPU_PING_INTERVAL")
    on_remote_death = Enum(
        ["exit", "continue"],
        "exit",
        config=True,
        help="""What happens when the remote kernel dies (it crashes or runs out of memory and
        the server restarts it, it is deleted, or a reconnection finds it gone). 'exit': this
        kernel dies too, as a local kernel would: the running cell shows the error, nbclient
        and papermill stop with DeadKernelError, and JupyterLab or VS Code restart the kernel
        as they restart any dead kernel (a fresh remote kernel). 'continue': the waiting cells
        fail with RemoteKernelLost and this kernel stays up; the next cell runs on a fresh
        remote kernel.""",
    ).tag(env="CGPU_ON_REMOTE_DEATH")
    max_queue = Int(
        1000,
        config=True,
        help="Messages held while the remote is not connected; beyond that, requests fail.",
    ).tag(env="CGPU_MAX_QUEUE")
    max_message_size = Int(
        1 << 30,
        config=True,
        help="""Largest single message accepted from the remote, in bytes (tornado's default is
        10 MiB, which silently loses big outputs and buffers).""",
    ).tag(env="CGPU_MAX_MESSAGE_SIZE")
    validate_cert = Bool(
        True,
        config=True,
        help="Verify the remote server's TLS certificate. Leave on outside of tests.",
    ).tag(env="CGPU_VALIDATE_CERT")
    outage_notice_after = Float(
        5.0,
        config=True,
        help="""Seconds a connection outage must last before the cells waiting on it say so
        (and say again when it is over). 0 turns the notices off.""",
    ).tag(env="CGPU_OUTAGE_NOTICE_AFTER")
    output_journal = Bool(
        True,
        config=True,
        help="""Keep a record of recent output inside the remote kernel (IPython kernels only),
        so that after a dropped connection the proxy fetches exactly what the cut lost: every
        line arrives once, in order. Off: only what the server replays.""",
    ).tag(env="CGPU_OUTPUT_JOURNAL")
    upload_on_start = Unicode(
        "",
        config=True,
        help=f"""Local paths (files, folders, globs; relative to the kernel's folder) to upload
        to the remote kernel's folder when the kernel starts, separated by {os.pathsep!r}:
        inputs for papermill and CI runs. Cells wait until they are there; a failed upload
        fails the first cell, saying why (see Files in the docs).""",
    ).tag(env="CGPU_UPLOAD_ON_START")
    journal_max_bytes = Int(
        64 << 20,
        config=True,
        help="""Most bytes of recent output the remote kernel's journal keeps (its memory cost;
        messages larger than a quarter of this are not kept).""",
    ).tag(env="CGPU_JOURNAL_MAX_BYTES")
    journal_max_messages = Int(
        20000,
        config=True,
        help="Most messages the remote kernel's journal keeps.",
    ).tag(env="CGPU_JOURNAL_MAX_MESSAGES")
    max_output_bytes = Int(
        2 * 1024 * 1024,
        config=True,
        help="""Stream output (stdout/stderr) one cell may send to the frontend, in characters
        on finished lines; progress-bar redraws with carriage returns do not count. Past it the
        frontend keeps the head, gets a notice and the last lines; the rest is spooled.""",
    ).tag(env="CGPU_MAX_OUTPUT_BYTES")
    max_rich_output_bytes = Int(
        20 * 1024 * 1024,
        config=True,
        help="""Rich output (images, HTML, ...) one cell may send to the frontend; clear_output
        starts the count again. Outputs past it are spooled and shown as placeholders.""",
    ).tag(env="CGPU_MAX_RICH_OUTPUT_BYTES")
    max_rich_item_bytes = Int(
        10 * 1024 * 1024,
        config=True,
        help="One rich output bigger than this is spooled and shown as a placeholder.",
    ).tag(env="CGPU_MAX_RICH_ITEM_BYTES")
    output_tail_lines = Int(
        20,
        config=True,
        help="Lines of held-back output shown at the end of a cell that passed its limit.",
    ).tag(env="CGPU_OUTPUT_TAIL_LINES")
    spool_dir = Unicode(
        "",
        config=True,
        help="""Where held-back output is saved (default: the Jupyter data dir's
        cgpu-kernel/outputs). `cgpu-kernel outputs` lists it.""",
    ).tag(env="CGPU_SPOOL_DIR")
    spool_max_age_days = Float(
        7.0, config=True, help="Saved outputs older than this are deleted when a kernel starts."
    ).tag(env="CGPU_SPOOL_MAX_AGE_DAYS")
    spool_max_total_bytes = Int(
        5 << 30,
        config=True,
        help="Past this total, the oldest saved outputs are deleted when a kernel starts.",
    ).tag(env="CGPU_SPOOL_MAX_TOTAL_BYTES")
    coalesce_window = Float(
        0.025,
        config=True,
        help="""Seconds during which consecutive stream messages of a cell are merged
        (byte-exact) into one, bounding the frontend's message rate in a burst. 0 turns it
        off.""",
    ).tag(env="CGPU_COALESCE_WINDOW")
    ca_certs = Unicode(
        "", config=True, help="CA bundle for a remote server with a private certificate."
    ).tag(env="CGPU_CA_CERTS")
    kernel_env = Dict(
        value_trait=Unicode(),
        default_value={},
        config=True,
        help="""KERNEL_* variables sent with the remote kernel's start request (jupyter
        backend), which Enterprise Gateway's process proxies read, e.g. KERNEL_IMAGE or
        KERNEL_NAMESPACE: `cgpu-kernel install --option KERNEL_IMAGE=...` bakes one in. They
        win over the same names in the frontend's environment; names that look like
        credentials are refused.""",
    )
    kernel_env_from_frontend = List(
        Unicode(),
        default_value=list(KERNEL_ENV_FROM_FRONTEND),
        config=True,
        help="""KERNEL_* variables passed on from the frontend's environment when set there
        (jupyter backend). KERNEL_USERNAME defaults to the local user when set nowhere.""",
    )
    startup_progress_interval = Float(
        15.0,
        config=True,
        help="""Seconds between the notices in a waiting cell while the remote kernel is still
        starting (a cluster may take minutes to schedule a pod). 0 turns them off.""",
    ).tag(env="CGPU_STARTUP_PROGRESS_INTERVAL")

    colab_url = Unicode(
        "https://colab.research.google.com/",
        config=True,
        help="""Colab's base URL (colab backend). https only, except on loopback (test
        doubles).""",
    ).tag(env="CGPU_COLAB_URL")
    gpu = Unicode(
        "T4",
        config=True,
        help="""Accelerator of the Colab runtime: T4, L4, G4, A100, H100, a TPU (V5E1, V6E1),
        or none for a CPU runtime.""",
    ).tag(env="CGPU_GPU")
    high_memory = Bool(
        False,
        config=True,
        help="""Ask Colab for a high-memory machine (shape=hm). L4 and TPUs come on one machine
        only and ignore it.""",
    ).tag(env="CGPU_HIGH_MEMORY")
    gpu_fallback = Unicode(
        "",
        config=True,
        help="""Comma-separated accelerators to try, in order, when the chosen one is refused
        (no quota, not entitled, usage limit or too many runtimes, unavailable); `none` is a
        CPU runtime. Empty: no fallback.""",
    ).tag(env="CGPU_GPU_FALLBACK")
    keep_runtime = Bool(
        False,
        config=True,
        help="""Do not release the Colab runtime when the kernel shuts down (it stays until
        Colab reclaims it when idle, or `cgpu-kernel release`).""",
    ).tag(env="CGPU_KEEP_RUNTIME")
    keep_alive_interval = Float(
        60.0, config=True, help="Seconds between keep-alive calls to Colab while in use."
    ).tag(env="CGPU_KEEP_ALIVE_INTERVAL")
    idle_timeout = Float(
        3600.0,
        config=True,
        help="""Seconds without a running cell after which keep-alive stops, so an abandoned
        notebook stops using compute units; the next cell resumes it.""",
    ).tag(env="CGPU_IDLE_TIMEOUT")
    colab_auth_wait = Float(
        100.0,
        config=True,
        help="""Seconds drive.mount() and auth.authenticate_user() wait for you to allow access
        at the authorization URL. For Drive at most 100 s: drive.mount() itself gives up at
        120 s.""",
    ).tag(env="CGPU_COLAB_AUTH_WAIT")
    colab_notebook_key = Unicode(
        "",
        config=True,
        help="""Which Colab runtime is this notebook's: kernels with the same key share one.
        Default: the connection file, so a restarted kernel finds its runtime again.""",
    ).tag(env="CGPU_COLAB_NOTEBOOK_KEY")
    colab_client_agent = Unicode(
        "cgpu-kernel",
        config=True,
        help="""What the X-Colab-Client-Agent header says to Colab. Google's own clients send
        fixed values (vscode, colab-cli); try one if Colab refuses ours.""",
    ).tag(env="CGPU_COLAB_CLIENT_AGENT")
    colab_runtime_version = Unicode(
        "",
        config=True,
        help="""Pin the Colab runtime version (runtime_version_label, e.g. a label Colab
        offers). Empty: the latest.""",
    ).tag(env="CGPU_COLAB_RUNTIME_VERSION")
    colab_endpoint = Unicode(
        "",
        config=True,
        help="""Attach to this existing Colab runtime (an endpoint `cgpu-kernel status --colab`
        lists, e.g. one started in a browser) instead of assigning one; it is never released
        at shutdown.""",
    ).tag(env="CGPU_COLAB_ENDPOINT")

    @validate("kernel_env")
    def _valid_kernel_env(self, proposal: dict[str, Any]) -> dict[str, str]:
        value = {str(k): str(v) for k, v in proposal["value"].items()}
        for name in value:
            try:
                check_kernel_variable(name)
            except ValueError as exc:
                raise TraitError(f"kernel_env: {exc}") from None
        return value

    @validate("kernel_env_from_frontend")
    def _valid_kernel_env_from_frontend(self, proposal: dict[str, Any]) -> list[str]:
        names = [str(name) for name in proposal["value"]]
        for name in names:
            try:
                check_kernel_variable(name)
            except ValueError as exc:
                raise TraitError(f"kernel_env_from_frontend: {exc}") from None
        return names

    def remote_kernel_env(self) -> dict[str, str]:
        """The ``env`` of the remote kernel's start request: the allow-listed ``KERNEL_*``
        variables of the frontend's environment, then ``kernel_env`` (the kernelspec's) over
        them, and ``KERNEL_USERNAME`` the local user when neither says. Nothing else of the
        environment, so never the token."""
        env = {
            name: os.environ[name] for name in self.kernel_env_from_frontend if os.environ.get(name)
        }
        env.update(self.kernel_env)
        if not env.get("KERNEL_USERNAME"):
            with contextlib.suppress(KeyError, OSError):  # no name for this uid (a container)
                env["KERNEL_USERNAME"] = getpass.getuser()
        return env

    def token_provider(self) -> Callable[[], str | None]:
        """Reads the remote server's token anew on each call (see :func:`read_token`)."""
        token_file = self.token_file
        return lambda: read_token(token_file)

    def notebook_key(self) -> str | None:
        """Which Colab runtime is this notebook's: the option, else the connection file."""
        if self.colab_notebook_key:
            return str(self.colab_notebook_key)
        connection_file = str(getattr(self.parent, "connection_file", "") or "")
        return os.path.realpath(connection_file) if connection_file else None

    def make_backend(self) -> Backend:
        """The backend ``--backend`` names, built from these options by its ``from_options``."""
        return BACKENDS[self.backend].from_options(self)


#: ``--backend`` -> the backend class (each reads its own options in ``from_options``).
BACKENDS: dict[str, type[Backend]] = {
    "local": LocalBackend,
    "jupyter": JupyterBackend,
    "colab": ColabBackend,
}
