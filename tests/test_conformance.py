"""jupyter_kernel_test's conformance suite against the proxy, with two different remotes.

Every message the proxy relays is validated against the Jupyter message spec schema by
``jupyter_kernel_test``. The remote is a real jupyter-server, then a real Kernel Gateway.
"""

from __future__ import annotations

import os
import unittest

import jupyter_kernel_test as jkt
import pytest

from .conftest import RemoteServer, run_cell, start_kernel, stdout_of


class _PythonSamples:
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]  # noqa: RUF012
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]  # noqa: RUF012
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]  # noqa: RUF012
    invalid_code_samples = ["import = 7q"]  # noqa: RUF012
    code_page_something = "zip?"
    code_generate_error = "raise ValueError('boom')"
    code_execute_result = [  # noqa: RUF012
        {"code": "1+2+3", "result": "6"},
        {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"},
    ]
    code_display_data = [  # noqa: RUF012
        {
            "code": "from IPython.display import HTML, display; display(HTML('<b>t</b>'))",
            "mime": "text/html",
        },
        {
            "code": "from IPython.display import Math, display; display(Math('\\\\frac{1}{2}'))",
            "mime": "text/latex",
        },
    ]
    code_history_pattern = "1?2*"
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"


@pytest.mark.usefixtures("jupyter_spec")
class TestProxyOnJupyterServer(_PythonSamples, jkt.KernelTests):
    kernel_name = "cgpu-test-jupyter"


@pytest.mark.usefixtures("gateway_spec")
class TestProxyOnKernelGateway(_PythonSamples, jkt.KernelTests):
    kernel_name = "cgpu-test-gateway"


assert issubclass(TestProxyOnJupyterServer, unittest.TestCase)


def test_remote_kernels_keep_their_history_out_of_the_users_profile(
    any_remote: tuple[str, RemoteServer],
) -> None:
    """The suite above searches the kernel's IPython history. In the user's ``~/.ipython``
    that history held every cell of earlier runs (1 GB, the 100 MB code strings of the memory
    tests among them), and the search outlasted jupyter_kernel_test's 15 s timeout in CI.
    Every remote's kernels, the gateway's too (it passes its kernels a few variables only),
    must use the session's IPYTHONDIR."""
    spec, _ = any_remote
    km, kc = start_kernel(spec)
    try:
        reply, outputs = run_cell(kc, "print(get_ipython().profile_dir.location)")
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert reply["content"]["status"] == "ok", reply["content"]
    location = stdout_of(outputs).strip()
    assert location.startswith(os.environ["IPYTHONDIR"] + os.sep), location
