"""Whole notebooks through the proxy: nbclient, papermill, ``jupyter nbconvert --execute``."""

from __future__ import annotations

import base64
from pathlib import Path

import nbformat
import papermill
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

from .conftest import RemoteServer, nbconvert_execute

WIDGET_BYTES = bytes(range(256)) * 4


def make_notebook(with_error: bool = True) -> nbformat.NotebookNode:
    cells = [
        new_code_cell("n = 3", metadata={"tags": ["parameters"]}),
        new_code_cell("for i in range(n):\n    print('line', i)"),
        new_code_cell("from IPython.display import HTML, display\ndisplay(HTML('<i>rich</i>'))"),
        new_code_cell("1 / 0", metadata={"tags": ["raises-exception"]}),
        new_code_cell(
            "import ipywidgets\n"
            f"image = ipywidgets.Image(value={WIDGET_BYTES!r}, format='png')\n"
            "image"
        ),
        new_code_cell("print('done', n)"),
    ]
    for index, cell in enumerate(cells):
        cell["id"] = f"cell-{index}"
    if not with_error:  # papermill stops at any error output, expected or not
        del cells[3]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "cgpu-local", "display_name": "cgpu", "language": "python"}
    return nb


def stdout_text(cell: nbformat.NotebookNode) -> str:
    return "".join(
        o["text"] for o in cell["outputs"] if o["output_type"] == "stream" and o["name"] == "stdout"
    )


def check_executed(nb: nbformat.NotebookNode, n: int) -> None:
    cells = {cell.get("id"): cell for cell in nb.cells}
    assert stdout_text(cells["cell-1"]) == "".join(f"line {i}\n" for i in range(n))
    assert cells["cell-2"]["outputs"][0]["data"]["text/html"] == "<i>rich</i>"
    if "cell-3" in cells:
        assert cells["cell-3"]["outputs"][0]["ename"] == "ZeroDivisionError"
    assert stdout_text(cells["cell-5"]) == f"done {n}\n"
    # the widget's binary buffer crossed both hops byte-identical
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    images = [m for m in state.values() if m["model_name"] == "ImageModel"]
    assert len(images) == 1
    (buffer,) = images[0]["buffers"]
    assert base64.b64decode(buffer["data"]) == WIDGET_BYTES


def test_nbclient(any_remote: tuple[str, RemoteServer], tmp_path: Path) -> None:
    nb = make_notebook()
    NotebookClient(nb, kernel_name=any_remote[0], timeout=60, startup_timeout=60).execute()
    check_executed(nb, 3)


def test_papermill_parameters(jupyter_spec: str, tmp_path: Path) -> None:
    source, output = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(make_notebook(with_error=False), source)
    papermill.execute_notebook(
        str(source), str(output), parameters={"n": 5}, kernel_name=jupyter_spec, progress_bar=False
    )
    check_executed(nbformat.read(output, as_version=4), 5)


def test_nbconvert_execute(jupyter_spec: str, tmp_path: Path) -> None:
    source = tmp_path / "in.ipynb"
    nbformat.write(make_notebook(), source)
    nbconvert_execute(
        source, f"--ExecutePreprocessor.kernel_name={jupyter_spec}", "--output", "out.ipynb"
    )
    check_executed(nbformat.read(tmp_path / "out.ipynb", as_version=4), 3)
