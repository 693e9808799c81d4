"""The proxy kernel process: ``python -m cgpu_kernel -f {connection_file}``.

``cli`` calls :func:`launch_kernel` with the kernelspec's argv. :class:`ProxyKernelApp` reads
the connection file, the config file and the options (``options.ProxyKernel``), picks the
backend, and runs one ``kernel.ProxyKernelRun``. A command line, config file or option that
cannot be used does not stop the kernel: it comes up with an ``UnavailableBackend`` that says
what is wrong in the cell, since a kernel that exits at once only makes the frontend restart it
in a loop, the reason buried in a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import sys
from pathlib import Path

from jupyter_core.paths import jupyter_config_path
from traitlets import Bool, TraitError, Unicode
from traitlets.config import Application

from cgpu_kernel import __version__, kernelspec
from cgpu_kernel.backends.base import Backend
from cgpu_kernel.backends.unavailable import UnavailableBackend
from cgpu_kernel.core.kernel_options import KernelOptions, split_argv
from cgpu_kernel.exceptions import CgpuError, ConfigurationError
from cgpu_kernel.fast_exit import exit_now
from cgpu_kernel.proxy.kernel import ProxyKernelRun
from cgpu_kernel.proxy.options import ProxyKernel

log = logging.getLogger("cgpu_kernel")
REMOTE_DIED_EXIT = 3  # the exit status when the remote kernel died (on_remote_death = exit)


class ProxyKernelApp(Application):
    """``python -m cgpu_kernel -f CONNECTION_FILE``: the kernel process frontends launch."""

    name = "cgpu-kernel"
    version = __version__
    description = "A Jupyter kernel that runs cells on a remote kernel (Colab, Jupyter server)."
    classes = [ProxyKernel]  # noqa: RUF012 - traitlets reads this class attribute
    connection_file = Unicode("", config=True, help="Connection file written by the frontend.")
    # -f, --log-level, and every ProxyKernel option as --kebab-case-name
    aliases = {  # noqa: RUF012 - traitlets reads this class attribute
        "f": "ProxyKernelApp.connection_file",
        "log-level": "Application.log_level",
        **{
            name.replace("_", "-"): f"ProxyKernel.{name}"
            for name in ProxyKernel.class_trait_names(config=True)
        },
    }

    # A config file that does not run is an error shown in the cell, not a log line skipped past.
    raise_config_file_errors = Bool(True)
    #: set when the command line itself could not be used: the kernel still comes up and says so
    launch_error: ConfigurationError | None = None
    #: what the command line held for the kernel, not the proxy (``launch_kernel`` sets it)
    kernel_options: KernelOptions = KernelOptions()

    def start(self) -> None:
        if not self.connection_file:
            raise ConfigurationError("Give the connection file with -f CONNECTION_FILE.")
        config_error = self.launch_error
        try:
            self.load_config_file("cgpu_kernel_config", path=jupyter_config_path())
        except Exception as exc:  # a config file is Python: it can fail in any way
            config_error = config_error or ConfigurationError(
                f"The config file cgpu_kernel_config.py could not be loaded ({exc}). Fix it"
                " (`jupyter --paths` lists where it is looked for), then restart the kernel."
            )
        logging.basicConfig(
            level=int(self.log_level),  # type: ignore[call-overload]
            format="[cgpu-kernel %(levelname)s %(asctime)s %(name)s] %(message)s",
            stream=sys.stderr,
        )
        try:
            connection_info = json.loads(Path(self.connection_file).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"Cannot read the connection file {self.connection_file}: {exc}. Frontends write"
                " it before starting the kernel; check the kernelspec's argv."
            ) from None
        try:
            options = ProxyKernel(parent=self)
        except TraitError as exc:
            options = ProxyKernel()
            config_error = config_error or ConfigurationError(
                f"A kernel option has a value cgpu-kernel cannot use: {exc} Fix it in the"
                " kernelspec (reinstall with `cgpu-kernel install ... --option NAME=VALUE`) or in"
                " cgpu_kernel_config.py, then restart the kernel."
            )
        try:
            if config_error is not None:
                raise config_error
            options.check_environment()
            backend: Backend = options.make_backend()
        except CgpuError as exc:
            # Stay up and show the error in the cell: a kernel that exits at once only makes
            # the frontend restart it in a loop, with the reason buried in a log.
            log.error("%s", exc)
            backend = UnavailableBackend(exc)
        if sys.platform == "win32":
            asyncio.set_event_loop_policy(asyncio.WindowsSelectorEventLoopPolicy())  # type: ignore[attr-defined]
        run = ProxyKernelRun(options, connection_info, backend, self.kernel_options)
        asyncio.run(run.run())
        if run.died is not None:  # the remote kernel died: so does this one (on_remote_death)
            raise SystemExit(REMOTE_DIED_EXIT)


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


#: command-line names traitlets itself takes (besides the app's aliases and flags)
BUILTIN_OPTIONS = frozenset({"h", "help", "help-all", "version"})
#: the classes whose ``--Class.trait=value`` options are the proxy's own
OUR_CLASSES = frozenset({"ProxyKernel", "ProxyKernelApp", "Application"})


def split_kernel_argv(argv: list[str]) -> tuple[list[str], KernelOptions]:
    """The proxy's own arguments, and the options a frontend meant for the kernel (nbclient's
    ``--HistoryManager.hist_file=:memory:``, ``--profile-dir DIR``): those are applied to the
    remote kernel where they can be, never a reason for the proxy to be unusable."""
    ours = {*ProxyKernelApp.aliases, *ProxyKernelApp.flags, *BUILTIN_OPTIONS}
    return split_argv(argv, ours, OUR_CLASSES)


def launch_kernel(argv: list[str]) -> None:
    argv, kernel_options = split_kernel_argv(argv)
    app = ProxyKernelApp()
    app.kernel_options = kernel_options
    recorder = _Recorder()
    app.log.addHandler(recorder)  # traitlets reports a bad value here, then exits
    captured = io.StringIO()  # argparse writes an unknown option's error to stderr, then exits
    try:
        try:
            with contextlib.redirect_stderr(captured):
                app.initialize(argv)
        except SystemExit as exc:
            sys.stderr.write(captured.getvalue())
            connection_file = kernelspec.argv_option(argv, *kernelspec.CONNECTION_FILE_OPTIONS)
            if exc.code in (0, None) or connection_file is None:
                raise
            # Come up anyway and say what is wrong in the cell: a kernel that exits at once
            # only makes the frontend restart it in a loop, the reason buried in a log.
            said = [line for line in captured.getvalue().splitlines() if "error:" in line]
            reason = "; ".join(recorder.lines + said) or "see the kernel's log"
            app = ProxyKernelApp(connection_file=connection_file)
            app.kernel_options = kernel_options
            app.launch_error = ConfigurationError(
                f"The kernel's command line could not be used ({reason}). Reinstall the"
                " kernelspec with `cgpu-kernel install` (options as --option NAME=VALUE), then"
                " restart the kernel."
            )
        else:
            sys.stderr.write(captured.getvalue())
        app.log.removeHandler(recorder)
        app.start()
    except CgpuError as exc:
        print(f"cgpu-kernel: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    exit_now(0)  # a clean end: everything is closed and sent (see fast_exit)
