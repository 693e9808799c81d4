"""``cgpu-kernel demo``: the main job on the embedded default, with nothing to configure.

Installs a local-backend kernelspec into a temporary Jupyter path, executes the quickstart
notebook through the proxy kernel with nbclient (exactly as papermill or ``nbconvert
--execute`` would), and prints each cell's outputs and which process produced them.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from cgpu_kernel import kernelspec
from cgpu_kernel.exceptions import ConfigurationError

DEMO_KERNEL = "cgpu-demo"


def install_demo_kernelspec(folder: str) -> None:
    """A local-backend kernelspec under ``folder/kernels`` (put ``folder`` on JUPYTER_PATH)."""
    spec = kernelspec.make_kernel_dict(
        kernelspec.make_argv("local"), "cgpu demo (local backend)", backend="local"
    )
    kernelspec.write_kernel_spec(spec, Path(folder) / "kernels" / DEMO_KERNEL)


def _describe_output(output: nbformat.NotebookNode) -> str:
    kind = output.get("output_type")
    if kind == "stream":
        return str(output.get("text", ""))
    if kind == "error":
        return f"{output.get('ename')}: {output.get('evalue')}\n"
    data = output.get("data", {})
    mimes = ", ".join(sorted(data))
    text = data.get("text/plain", "")
    return f"{text}   [{mimes}]\n" if text else f"[{mimes}]\n"


def run_demo(notebook: str | None = None, *, timeout: float = 120.0) -> int:
    path = Path(notebook) if notebook else kernelspec.resource_dir("examples") / "quickstart.ipynb"
    try:
        nb = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
    except OSError as exc:
        raise ConfigurationError(
            f"Cannot read the notebook {str(path)!r}: {exc.strerror}."
        ) from None
    except Exception as exc:  # nbformat raises JSON, validation and version errors alike
        raise ConfigurationError(
            f"{str(path)!r} is not a Jupyter notebook (.ipynb JSON): {exc}"
        ) from None
    with tempfile.TemporaryDirectory(prefix="cgpu-demo-") as scratch:
        install_demo_kernelspec(scratch)
        previous = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [scratch, previous]))
        try:
            client = NotebookClient(
                nb,
                kernel_name=DEMO_KERNEL,
                timeout=int(timeout),
                startup_timeout=120,
                resources={"metadata": {"path": str(path.parent)}},
            )
            print(f"Executing {path.name} through the cgpu proxy kernel (backend: local, a")
            print("private Jupyter server on 127.0.0.1 standing in for a remote GPU runtime).\n")
            with client.setup_kernel():
                assert client.km is not None
                proxy_pid = getattr(client.km.provisioner, "pid", None)
                print(f"proxy kernel process: pid {proxy_pid} (python -m cgpu_kernel)\n")
                for index, cell in enumerate(nb.cells):
                    if cell.cell_type != "code":
                        continue
                    print(f"--- cell {index}: {cell.source.splitlines()[0] if cell.source else ''}")
                    try:
                        client.execute_cell(cell, index)
                    finally:
                        for output in cell.get("outputs", []):
                            sys.stdout.write(_describe_output(output))
        except CellExecutionError as exc:
            print(f"\nA cell failed: {exc}", file=sys.stderr)
            return 1
        finally:
            if previous is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = previous
    print("\nEvery output above came from the remote kernel (its pid is printed by the first")
    print("cell), relayed through the proxy process. Done.")
    print("\nNext: `cgpu-kernel install` (a kernelspec for Jupyter, VS Code, papermill), then")
    print("`cgpu-kernel run 'print(1)'` from the shell; docs/getting-started.md has the rest.")
    return 0
