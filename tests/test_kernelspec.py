"""Kernelspec builders, and install / list / remove through the CLI."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cgpu_kernel import kernelspec
from cgpu_kernel.exceptions import ConfigurationError


def cli(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cgpu_kernel", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        input=stdin,
        env=dict(os.environ, **(env or {})),
    )


def test_make_argv_local() -> None:
    argv = kernelspec.make_argv("local", python="/py")
    assert argv == ["/py", "-m", "cgpu_kernel", "-f", "{connection_file}", "--backend", "local"]


def test_make_argv_jupyter_normalizes_url_and_keeps_token_out() -> None:
    argv = kernelspec.make_argv(
        "jupyter", url="https://hub.example.org/user/me", remote_kernel="ir", token_file="~/t"
    )
    assert argv[argv.index("--url") + 1] == "https://hub.example.org/user/me/"
    assert argv[argv.index("--remote-kernel") + 1] == "ir"
    assert argv[argv.index("--token-file") + 1] == str(Path("~/t").expanduser().resolve())


@pytest.mark.parametrize(
    ("backend", "url", "message"),
    [
        ("jupyter", None, "needs --url"),
        ("jupyter", "https://h/?token=abc", "carries a credential"),
        ("jupyter", "https://user:pw@h/", "carries a credential"),
        ("jupyter", "ftp://h/", "not an http(s) URL"),
        ("local", "http://h/", "--url is for the jupyter backend"),
        ("nope", None, "Unknown backend"),
    ],
)
def test_make_argv_refuses(backend: str, url: str | None, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        kernelspec.make_argv(backend, url=url)


def test_kernel_dict() -> None:
    spec = kernelspec.make_kernel_dict(["x"], "Shown", backend="jupyter", interrupt_mode="signal")
    assert spec["argv"] == ["x"]
    assert spec["display_name"] == "Shown"
    assert spec["language"] == "python"
    assert spec["interrupt_mode"] == "signal"
    assert spec["metadata"]["cgpu_kernel"] == {"backend": "jupyter"}
    with pytest.raises(ConfigurationError, match="Refusing to write CGPU_TOKEN"):
        kernelspec.make_kernel_dict(["x"], "s", backend="jupyter", env={"CGPU_TOKEN": "t"})


def test_write_kernel_spec_has_logos(tmp_path: Path) -> None:
    spec = kernelspec.make_kernel_dict(["x"], "s", backend="local")
    folder = kernelspec.write_kernel_spec(spec, tmp_path / "k")
    assert json.loads((folder / "kernel.json").read_text()) == spec
    assert (folder / "logo-32x32.png").read_bytes().startswith(b"\x89PNG")
    assert (folder / "logo-64x64.png").exists()


def test_install_list_remove_cli(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    env = {"JUPYTER_PATH": str(prefix / "share" / "jupyter")}
    done = cli(
        "install", "--prefix", str(prefix), "--backend", "jupyter", "--url", "http://127.0.0.1:9/",
        "--name", "my-remote", "--display-name", "My Remote", "--token-stdin",
        env=env, stdin="s3cret-token\n",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    spec_file = prefix / "share" / "jupyter" / "kernels" / "my-remote" / "kernel.json"
    spec = json.loads(spec_file.read_text())
    assert spec["display_name"] == "My Remote"
    assert "s3cret-token" not in spec_file.read_text()
    token_path = Path(spec["argv"][spec["argv"].index("--token-file") + 1])
    assert token_path.read_text().strip() == "s3cret-token"
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    token_path.unlink()

    listed = cli("list", "--json", env=env)
    names = {s["name"]: s for s in json.loads(listed.stdout)}
    assert names["my-remote"]["backend"] == "jupyter"

    assert cli("remove", "python3", env=env).returncode == 2  # not ours: refused
    removed = cli("remove", "my-remote", env=env)
    assert removed.returncode == 0, removed.stderr
    assert not spec_file.exists()
    missing = cli("remove", "my-remote", env=env)
    assert missing.returncode == 2
    assert "cgpu-kernel list" in missing.stderr


def test_install_errors_are_one_clear_line(tmp_path: Path) -> None:
    done = cli("install", "--prefix", str(tmp_path), "--backend", "jupyter")
    assert done.returncode == 2
    assert done.stderr.startswith("cgpu-kernel: The jupyter backend needs --url")
    assert "Traceback" not in done.stderr


def test_config_reference_lists_every_option() -> None:
    done = cli("config-reference")
    assert done.returncode == 0
    for variable in ("CGPU_BACKEND", "CGPU_URL", "CGPU_STARTUP_TIMEOUT", "CGPU_RECONNECT_BUDGET"):
        assert variable in done.stdout


def test_env_fallback_and_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    from traitlets.config import Config

    from cgpu_kernel.proxy.options import ProxyKernel

    monkeypatch.setenv("CGPU_STARTUP_TIMEOUT", "7.5")
    monkeypatch.setenv("CGPU_REMOTE_KERNEL", "from-env")
    assert ProxyKernel().startup_timeout == 7.5
    config = Config({"ProxyKernel": {"remote_kernel": "from-config"}})
    options = ProxyKernel(config=config)
    assert options.remote_kernel == "from-config"  # command line / config beats env
    assert options.startup_timeout == 7.5
    monkeypatch.setenv("CGPU_MAX_QUEUE", "lots")
    options = ProxyKernel()
    assert options.startup_timeout == 7.5  # the good values still apply
    assert options.max_queue == 1000  # the bad one is ignored...
    with pytest.raises(ConfigurationError, match="CGPU_MAX_QUEUE"):
        options.check_environment()  # ...and reported


def test_install_option_is_validated(tmp_path: Path) -> None:
    bad_name = cli("install", "--prefix", str(tmp_path), "--option", "no-such-option=1")
    assert bad_name.returncode == 2 and "config-reference" in bad_name.stderr
    bad_value = cli("install", "--prefix", str(tmp_path), "--option", "max-queue=lots")
    assert bad_value.returncode == 2 and "max-queue=lots" in bad_value.stderr


def test_install_bakes_options_into_argv(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    done = cli(
        "install", "--prefix", str(prefix), "--name", "opts",
        "--option", "max-output-bytes=5000", "--option", "ping-interval=3",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    argv = json.loads((prefix / "share/jupyter/kernels/opts/kernel.json").read_text())["argv"]
    assert "--max-output-bytes=5000" in argv and "--ping-interval=3" in argv
    colab = cli(
        "install", "--prefix", str(prefix), "--backend", "colab", "--gpu", "L4", "--high-memory"
    )
    assert colab.returncode == 0, colab.stderr
    argv = json.loads((prefix / "share/jupyter/kernels/colab-gpu/kernel.json").read_text())["argv"]
    assert {"--gpu=L4", "--high-memory=True", "--startup-timeout=300"} <= set(argv)
    wrong = cli("install", "--prefix", str(prefix), "--gpu", "T4")
    assert wrong.returncode == 2 and "for the colab backend" in wrong.stderr


def test_install_bakes_kernel_variables_and_refuses_credentials(tmp_path: Path) -> None:
    """``--option KERNEL_IMAGE=...`` (a variable for the gateway's start request) becomes the
    kernel's ``--kernel-env``; a credential-like or malformed name installs nothing."""
    prefix = tmp_path / "prefix"
    done = cli(
        "install", "--prefix", str(prefix), "--name", "eg", "--backend", "jupyter",
        "--url", "http://127.0.0.1:1/", "--option", "KERNEL_IMAGE=registry/py:3.11",
        "--option", "KERNEL_NAMESPACE=team-a",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    argv = json.loads((prefix / "share/jupyter/kernels/eg/kernel.json").read_text())["argv"]
    assert {
        "--kernel-env=KERNEL_IMAGE=registry/py:3.11",
        "--kernel-env=KERNEL_NAMESPACE=team-a",
    } <= set(argv)
    for bad in ("KERNEL_AUTH_TOKEN=x", "KERNEL_DB_PASSWORD=x", "KERNEL_IMAGE", "KERNEL_-=1"):
        refused = cli("install", "--prefix", str(prefix), "--name", "bad", "--option", bad)
        assert refused.returncode == 2 and "--option" in refused.stderr, bad
    assert not (prefix / "share/jupyter/kernels/bad").exists()


def test_remote_kernel_env_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernelspec's variables win over the frontend's allow-listed ones; nothing off the
    list, and never the token, is sent; KERNEL_USERNAME defaults to the local user."""
    import getpass

    from traitlets import TraitError

    from cgpu_kernel.proxy.options import ProxyKernel

    monkeypatch.setenv("CGPU_TOKEN", "secret-token")
    monkeypatch.setenv("KERNEL_NAMESPACE", "from-frontend")
    monkeypatch.setenv("KERNEL_IMAGE", "frontend/image")
    monkeypatch.setenv("KERNEL_UNLISTED", "x")
    monkeypatch.delenv("KERNEL_USERNAME", raising=False)
    options = ProxyKernel(kernel_env={"KERNEL_NAMESPACE": "from-spec"})
    assert options.remote_kernel_env() == {
        "KERNEL_NAMESPACE": "from-spec",
        "KERNEL_IMAGE": "frontend/image",
        "KERNEL_USERNAME": getpass.getuser(),
    }
    monkeypatch.setenv("KERNEL_USERNAME", "alice")
    assert ProxyKernel().remote_kernel_env()["KERNEL_USERNAME"] == "alice"
    with pytest.raises(TraitError, match="credential"):
        ProxyKernel(kernel_env_from_frontend=["KERNEL_GATEWAY_TOKEN"])
    with pytest.raises(TraitError, match="KERNEL_"):
        ProxyKernel(kernel_env={"CGPU_TOKEN": "x"})


def test_run_waits_as_long_as_the_gateway_may_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cgpu-kernel run`` gives a new kernel as long as the proxy itself waits: the kernelspec's
    KERNEL_LAUNCH_TIMEOUT (else the environment's) plus the channels' slack, when longer."""
    from cgpu_kernel.run.runner import first_start_timeout

    monkeypatch.delenv("KERNEL_LAUNCH_TIMEOUT", raising=False)
    argv = kernelspec.make_argv(
        "jupyter",
        url="http://127.0.0.1:1/",
        extra=["--kernel-env=KERNEL_IMAGE=x", "--kernel-env", "KERNEL_LAUNCH_TIMEOUT=300"],
    )
    assert kernelspec.argv_kernel_env(argv) == {
        "KERNEL_IMAGE": "x",
        "KERNEL_LAUNCH_TIMEOUT": "300",
    }
    assert first_start_timeout({"argv": argv}, None) == (330.0, [])
    assert first_start_timeout({"argv": argv}, 500) == (500, ["--startup-timeout=500"])
    plain = kernelspec.make_argv("jupyter", url="http://127.0.0.1:1/")
    assert first_start_timeout({"argv": plain}, None)[0] == 60
    monkeypatch.setenv("KERNEL_LAUNCH_TIMEOUT", "100")
    assert first_start_timeout({"argv": plain}, None)[0] == 130
