"""Kernelspecs for the proxy kernel: pure builders, then the write.

Like ipykernel's ``kernelspec.py``: :func:`make_argv` -> :func:`make_kernel_dict` ->
:func:`write_kernel_spec` -> :func:`install`, each tested on its own. The template and logos live
in the repository's ``kernelspec/`` folder (shipped in the wheel as ``_kernelspec``).

No token ever goes into argv or kernel.json: the kernel reads ``CGPU_TOKEN`` from the
environment it inherits, or the token file whose *path* is baked in.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from cgpu_kernel import paths
from cgpu_kernel.backends.jupyter import normalize_base_url
from cgpu_kernel.exceptions import ConfigurationError

BACKENDS = ("local", "jupyter", "colab")
DEFAULT_DISPLAY_NAMES = {
    "local": "cgpu (local Jupyter server)",
    "jupyter": "cgpu (remote Jupyter server)",
    "colab": "Colab GPU",
}


def resource_dir(name: str) -> Path:
    """A data folder shipped with the package, or found beside it in a source checkout."""
    packaged = Path(__file__).parent / f"_{name}"
    if packaged.is_dir():
        return packaged
    source = Path(__file__).parent.parent / name
    if source.is_dir():
        return source
    raise ConfigurationError(f"cgpu-kernel's {name} files are missing: reinstall the package.")


def default_name(backend: str) -> str:
    return "colab-gpu" if backend == "colab" else f"cgpu-{backend}"


def argv_option(argv: list[str], *names: str) -> str | None:
    """The value ``names`` give in a kernel argv (``NAME VALUE`` or ``NAME=VALUE``; the last wins,
    as on any traitlets command line).

    The one reader of kernel command lines: the provisioner (which backend), the CLI (is this a
    kernel launch), the proxy (its connection file) and ``run`` (the remote kernel, the startup
    deadline) all ask here, so they agree on both spellings.
    """
    found = None
    for index, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if arg in names and index + 1 < len(argv):
            found = argv[index + 1]
        elif equals and name in names:
            found = value
    return found


#: How a kernel argv names a variable for the remote kernel's start request.
KERNEL_ENV_OPTIONS = ("--kernel-env", "--ProxyKernel.kernel_env")


def argv_kernel_env(argv: list[str]) -> dict[str, str]:
    """The ``KERNEL_*`` variables a kernel argv bakes in (every ``--kernel-env NAME=VALUE``,
    which, unlike other options, repeat): ``run`` reads ``KERNEL_LAUNCH_TIMEOUT`` here."""
    found: dict[str, str] = {}
    for index, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if arg in KERNEL_ENV_OPTIONS and index + 1 < len(argv):
            value = argv[index + 1]
        elif not (equals and name in KERNEL_ENV_OPTIONS):
            continue
        key, sep, setting = value.partition("=")
        if sep:
            found[key] = setting
    return found


def without_option(argv: list[str], *names: str) -> list[str]:
    """``argv`` minus every ``NAME VALUE`` / ``NAME=VALUE`` for ``names`` (read as above)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif arg.partition("=")[0] not in names or "=" not in arg:
            kept.append(arg)
    return kept


#: How a kernel argv names its connection file (jupyter_client writes ``-f {connection_file}``).
CONNECTION_FILE_OPTIONS = ("-f", "--f")
#: How a kernel argv names the backend (the alias and the trait's full name).
BACKEND_OPTIONS = ("--backend", "--ProxyKernel.backend")


def make_argv(
    backend: str = "local",
    *,
    url: str | None = None,
    remote_kernel: str | None = None,
    token_file: str | None = None,
    extra: list[str] | None = None,
    python: str | None = None,
) -> list[str]:
    """The command a frontend runs to start the proxy kernel."""
    if backend not in BACKENDS:
        raise ConfigurationError(f"Unknown backend {backend!r}: choose one of {BACKENDS}.")

    argv = [python or sys.executable, "-m", "cgpu_kernel", "-f", "{connection_file}"]
    argv += ["--backend", backend]
    if backend == "jupyter":
        if not url:
            raise ConfigurationError(
                "The jupyter backend needs --url, the remote Jupyter server's base URL."
            )
        argv += ["--url", normalize_base_url(url)]
    elif url:
        raise ConfigurationError(f"--url is for the jupyter backend, not {backend!r}.")
    if remote_kernel:
        argv += ["--remote-kernel", remote_kernel]
    if token_file:
        argv += ["--token-file", str(Path(token_file).expanduser().resolve())]
    return argv + list(extra or [])


def make_kernel_dict(
    argv: list[str],
    display_name: str,
    *,
    backend: str,
    interrupt_mode: str = "message",
    env: dict[str, str] | None = None,
    provisioner: str | None = None,
) -> dict[str, Any]:
    """kernel.json's content, from the template in ``kernelspec/``.

    ``provisioner`` names a ``jupyter_client`` kernel provisioner (``cgpu-provisioner``, see
    ``cgpu_kernel.provisioner``); frontends that launch argv directly ignore it.
    """
    if interrupt_mode not in ("message", "signal"):
        raise ConfigurationError("--interrupt-mode is 'message' or 'signal'.")
    for key in env or {}:
        if "TOKEN" in key.upper() or "SECRET" in key.upper():
            raise ConfigurationError(
                f"Refusing to write {key} into kernel.json: give secrets through the environment"
                " the frontend runs in, or a token file."
            )
    template = json.loads((resource_dir("kernelspec") / "kernel.json").read_text())
    spec: dict[str, Any] = dict(template, argv=argv, display_name=display_name)
    spec["interrupt_mode"] = interrupt_mode
    spec["metadata"] = dict(template["metadata"], cgpu_kernel={"backend": backend})
    if env:
        spec["env"] = dict(env)
    if provisioner:
        spec["metadata"]["kernel_provisioner"] = {"provisioner_name": provisioner, "config": {}}
    return spec


def write_kernel_spec(spec: dict[str, Any], path: Path) -> Path:
    """Write kernel.json and the logos into ``path`` (created)."""
    path.mkdir(parents=True, exist_ok=True)
    for logo in resource_dir("kernelspec").glob("logo-*.png"):
        shutil.copy(logo, path / logo.name)
    (path / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
    return path


def install(
    spec: dict[str, Any],
    name: str,
    *,
    user: bool = False,
    prefix: str | None = None,
) -> str:
    """Install ``spec`` as kernelspec ``name``; returns the installed folder."""
    with tempfile.TemporaryDirectory() as scratch:
        source = write_kernel_spec(spec, Path(scratch) / name)
        return str(
            KernelSpecManager().install_kernel_spec(
                str(source), kernel_name=name, user=user, prefix=prefix
            )
        )


def is_cgpu_spec(spec: dict[str, Any]) -> bool:
    return "cgpu_kernel" in spec.get("metadata", {}) or "cgpu_kernel" in spec.get("argv", [])


def list_specs() -> list[dict[str, Any]]:
    """The installed cgpu kernelspecs: name, display name, backend, folder."""
    found = []
    for name, info in sorted(KernelSpecManager().get_all_specs().items()):
        spec = info.get("spec", {})
        if is_cgpu_spec(spec):
            backend = spec.get("metadata", {}).get("cgpu_kernel", {}).get("backend", "?")
            found.append(
                {
                    "name": name,
                    "display_name": spec.get("display_name", name),
                    "backend": backend,
                    "resource_dir": info.get("resource_dir", ""),
                }
            )
    return found


def token_file_for_url(url: str) -> str | None:
    """The token file of an installed cgpu kernelspec whose server is ``url`` (the first, by
    name), or None. ``cgpu-kernel reclaim`` calls it: it knows a dead kernel's server URL, and the
    kernelspec that started that kernel knows the credentials."""
    try:
        wanted = normalize_base_url(url)
    except ConfigurationError:
        return None
    for _name, info in sorted(KernelSpecManager().get_all_specs().items()):
        spec = info.get("spec", {})
        if not is_cgpu_spec(spec):
            continue
        argv = [str(a) for a in spec.get("argv", [])]
        spec_url = argv_option(argv, "--url", "--ProxyKernel.url")
        token_file = argv_option(argv, "--token-file", "--ProxyKernel.token_file")
        if not spec_url or not token_file:
            continue
        try:
            if normalize_base_url(spec_url) == wanted:
                return token_file
        except ConfigurationError:
            continue
    return None


def remove(name: str) -> str:
    """Remove the cgpu kernelspec ``name``; refuses to touch other kernels."""
    manager = KernelSpecManager()
    try:
        spec = manager.get_kernel_spec(name)
    except NoSuchKernel:
        raise ConfigurationError(
            f"No kernelspec named {name!r}. `cgpu-kernel list` shows the installed ones."
        ) from None
    if not is_cgpu_spec(spec.to_dict()):
        raise ConfigurationError(f"{name!r} is not a cgpu kernelspec; not removing it.")
    token_file = saved_token_file(spec.argv)
    removed = str(manager.remove_kernel_spec(name))
    if token_file is not None:
        token_file.unlink(missing_ok=True)
    return removed


def saved_token_file(argv: list[str]) -> Path | None:
    """The token file ``install --token-stdin`` saved for a kernelspec (``save_token``), or
    None when its argv names none, or one the user keeps elsewhere (never deleted)."""
    value = argv_option(argv, "--token-file", "--ProxyKernel.token_file")
    if not value:
        return None
    path = Path(value)
    try:
        inside = path.resolve().parent == paths.tokens_dir().resolve()
    except OSError:
        return None
    return path if inside else None


def save_token(name: str, token: str) -> Path:
    """Store a remote server's token in a 0600 file for kernelspec ``name``; its path."""
    folder = paths.tokens_dir()
    path = folder / name
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(token.strip() + "\n")
    path.chmod(0o600)
    return path
