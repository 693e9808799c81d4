"""Command-line options a frontend means for the kernel (``core.kernel_options``).

nbclient adds ``--HistoryManager.hist_file=:memory:`` to a python kernel's command, ipykernel's
tests ``--profile-dir DIR``: the proxy applies the ``--Class.trait=value`` ones to the remote
kernel and names the rest once, in the first cell's output; it stays usable either way.
"""

from __future__ import annotations

from pathlib import Path

from cgpu_kernel.core.kernel_options import KernelOptions, not_applied, split_argv
from cgpu_kernel.proxy.app import split_kernel_argv

from .conftest import run_cell, start_kernel, stdout_of


def test_the_proxy_keeps_its_own_options_and_sets_the_kernels_aside() -> None:
    argv = [
        "-f", "/tmp/k.json", "--backend=jupyter", "--url", "http://h/", "--log-level=DEBUG",
        "--ProxyKernel.max_queue=5", "--max_queue=6", "--debug",
        "--HistoryManager.hist_file=:memory:", "--profile-dir", "/tmp/p", "--IPKernelApp.x", "1",
        "--matplotlib", "--quiet",
    ]  # fmt: skip
    ours, theirs = split_kernel_argv(argv)
    assert ours == argv[:9]
    assert theirs.settings == [
        ("--HistoryManager.hist_file=:memory:", "HistoryManager", "hist_file", ":memory:"),
        ("--IPKernelApp.x 1", "IPKernelApp", "x", "1"),
    ]
    assert theirs.unusable == ["--profile-dir /tmp/p", "--matplotlib", "--quiet"]
    assert split_argv(["-f", "x"], {"f"}, set()) == (["-f", "x"], KernelOptions())


def test_a_misspelt_proxy_option_is_named_with_the_one_meant() -> None:
    """An option the proxy does not take is the kernel's; when it is close to one of the
    proxy's (a typo in a kernelspec's argv), the notice says which was probably meant."""
    _, theirs = split_kernel_argv(["-f", "k.json", "--ping-intervl=1", "--profile-dir", "p"])
    assert theirs.suggestions == {"--ping-intervl=1": "--ping-interval"}
    reasons = dict(not_applied(theirs, None))
    assert reasons["--ping-intervl=1"] == "not the proxy's either: did you mean --ping-interval?"
    assert reasons["--profile-dir p"] == "only --Class.trait=value options can be passed on"


def cell_notices(outputs: list[dict]) -> str:
    return "".join(
        m["content"]["text"]
        for m in outputs
        if m["msg_type"] == "stream" and "cgpu-kernel:" in m["content"]["text"]
    )


def test_kernel_options_are_applied_remotely_or_named_once(
    jupyter_spec: str, tmp_path: Path
) -> None:
    km, kc = start_kernel(
        jupyter_spec,
        extra_arguments=[
            "--HistoryManager.hist_file=:memory:",
            "--IPCompleter.greedy=True",
            "--NoSuchClass.thing=1",
            "--profile-dir",
            str(tmp_path),
        ],
    )
    try:
        code = (
            "ip = get_ipython()\nprint(ip.history_manager.hist_file, ip.Completer.greedy, sep=',')"
        )
        reply, outputs = run_cell(kc, code)
        assert reply["content"]["status"] == "ok"  # usable, not "misconfigured"
        assert stdout_of(outputs) == ":memory:,True\n"
        told = cell_notices(outputs)
        assert "--profile-dir" in told and str(tmp_path) in told
        assert "--NoSuchClass.thing=1" in told
        assert "hist_file" not in told and "greedy" not in told
        _, outputs = run_cell(kc, "print('again')")
        assert stdout_of(outputs) == "again\n" and cell_notices(outputs) == ""  # said once
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def test_no_notice_when_every_option_applied(jupyter_spec: str) -> None:
    km, kc = start_kernel(jupyter_spec, extra_arguments=["--HistoryManager.hist_file=:memory:"])
    try:
        _, outputs = run_cell(kc, "print(get_ipython().history_manager.hist_file)")
        assert stdout_of(outputs) == ":memory:\n"
        assert cell_notices(outputs) == ""
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
