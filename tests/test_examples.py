"""Every notebook in ``examples/`` runs through the proxy and shows what it promises.

nbclient executes them with the test kernelspecs (``local`` backend, or ``jupyter`` backend
against the session's jupyter-server); papermill runs the parameterised one with new values.
Each example has a check below, and an example without one fails the suite.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import papermill
import pytest
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.timeout(300)


def cells_by_id(nb: nbformat.NotebookNode) -> dict[str, nbformat.NotebookNode]:
    return {cell.id: cell for cell in nb.cells}


def stdout_of(cell: nbformat.NotebookNode) -> str:
    return "".join(
        o["text"] for o in cell.outputs if o["output_type"] == "stream" and o["name"] == "stdout"
    )


def outputs_of(cell: nbformat.NotebookNode, kind: str) -> list[nbformat.NotebookNode]:
    return [o for o in cell.outputs if o["output_type"] == kind]


def widget_models(nb: nbformat.NotebookNode) -> dict[str, dict[str, Any]]:
    """model id -> model, from the widget state nbclient saves in the notebook's metadata."""
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    return dict(state)


def models_named(nb: nbformat.NotebookNode, model_name: str) -> list[dict[str, Any]]:
    return [m for m in widget_models(nb).values() if m["model_name"] == model_name]


def assert_views_have_state(nb: nbformat.NotebookNode) -> None:
    """Every widget view in an output refers to a model whose state came back."""
    models = widget_models(nb)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get("application/vnd.jupyter.widget-view+json")
            if view:
                assert view["model_id"] in models, (cell.id, view)


def check_quickstart(nb: nbformat.NotebookNode, proxy_pid: int | None) -> None:
    cells = cells_by_id(nb)
    hello = stdout_of(cells["cell-1"])
    assert hello.startswith("Hello from the remote kernel\n")
    match = re.search(r"remote kernel pid: (\d+)", hello)
    assert match
    assert proxy_pid is not None
    assert int(match.group(1)) != proxy_pid  # the proxy relayed; another process ran the cell
    (html,) = outputs_of(cells["cell-3"], "display_data")
    assert html["data"]["text/html"] == "<b>Rich output</b> travels through the proxy too."
    (result,) = outputs_of(cells["cell-3"], "execute_result")
    assert result["data"]["text/plain"] == "285"
    assert stdout_of(cells["cell-4"]) == "squares still here: [49, 64, 81]\n"


def expected_device() -> str:
    if importlib.util.find_spec("torch") is None:
        return "cpu"
    import torch  # the remote kernel runs in this same environment

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_gpu_check(nb: nbformat.NotebookNode, proxy_pid: int | None) -> None:
    cells = cells_by_id(nb)
    host = stdout_of(cells["host"])
    assert host.startswith("remote host: ")
    assert "\nnvidia-smi: " in host
    torch_report = stdout_of(cells["torch"])
    if importlib.util.find_spec("torch") is None:
        assert torch_report == (
            "torch is not installed on the remote kernel: skipping the CUDA checks\n"
        )
    else:
        assert torch_report.startswith("torch ")
    device = expected_device()
    assert re.fullmatch(
        rf"1024x1024 matmul on {device}: correct, [\d.]+ ms\n", stdout_of(cells["matmul"])
    )
    assert stdout_of(cells["summary"]) == f"GPU check done: device={device}\n"


def check_training_loop(nb: nbformat.NotebookNode, proxy_pid: int | None) -> None:
    cells = cells_by_id(nb)
    inside = re.fullmatch(r"400 points, (\d+) inside the circle\n", stdout_of(cells["data"]))
    assert inside
    assert 100 < int(inside.group(1)) < 200  # about pi/9 of them
    match = re.fullmatch(
        r"loss ([\d.]+) -> ([\d.]+), accuracy ([\d.]+)%\n", stdout_of(cells["train"])
    )
    assert match, stdout_of(cells["train"])
    first, last, accuracy = (float(group) for group in match.groups())
    assert last < first / 2
    assert accuracy >= 90
    # the tqdm progress bar is a widget: its final state crossed the proxy
    (bar,) = models_named(nb, "FloatProgressModel")
    assert bar["state"]["value"] == bar["state"]["max"] == 300
    assert bar["state"]["bar_style"] == "success"
    labels = [m["state"]["value"] for m in models_named(nb, "HTMLModel")]
    assert any("training" in label and "100%" in label for label in labels), labels
    assert_views_have_state(nb)
    # the plot is a PNG image
    (figure,) = outputs_of(cells["plot"], "display_data")
    png = base64.b64decode(figure["data"]["image/png"])
    assert png.startswith(PNG_SIGNATURE)
    assert len(png) > 10_000
    assert figure["data"]["text/plain"] == "<Figure size 1000x400 with 2 Axes>"


def check_widgets(nb: nbformat.NotebookNode, proxy_pid: int | None) -> None:
    cells = cells_by_id(nb)
    assert stdout_of(cells["version"]).startswith("ipywidgets 8.")
    (slider,) = models_named(nb, "IntSliderModel")
    assert slider["state"]["value"] == 7
    (label,) = models_named(nb, "LabelModel")
    assert label["state"]["value"] == "n squared = 49"  # the observer ran on the remote kernel
    # the image widget's bytes came back as a binary buffer, byte-identical
    (image,) = models_named(nb, "ImageModel")
    (buffer,) = image["buffers"]
    assert buffer["path"] == ["value"]
    data = base64.b64decode(buffer["data"])
    assert data.startswith(PNG_SIGNATURE)
    printed = re.fullmatch(r"PNG: (\d+) bytes, sha256 ([0-9a-f]{64})\n", stdout_of(cells["image"]))
    assert printed
    assert len(data) == int(printed.group(1))
    assert hashlib.sha256(data).hexdigest() == printed.group(2)
    # what the Output widget captured
    (log,) = models_named(nb, "OutputModel")
    assert log["state"]["outputs"] == [
        {"output_type": "stream", "name": "stdout", "text": "captured by an Output widget\n"}
    ]
    (button,) = models_named(nb, "ButtonModel")
    assert button["state"]["description"] == "Click me"
    assert_views_have_state(nb)


def expected_w(epochs: int, learning_rate: float) -> float:
    return 3 * (1 - (1 - 2 * learning_rate) ** epochs)


def check_parameters(
    nb: nbformat.NotebookNode, name: str, epochs: int, learning_rate: float
) -> None:
    cells = cells_by_id(nb)
    assert stdout_of(cells["greeting"]) == (
        f"hello {name}: {epochs} epochs at learning rate {learning_rate}\n"
    )
    match = re.fullmatch(rf"w after {epochs} epochs: ([\d.]+)\n", stdout_of(cells["descent"]))
    assert match
    assert float(match.group(1)) == pytest.approx(expected_w(epochs, learning_rate), abs=2e-6)
    (result,) = outputs_of(cells["result"], "execute_result")
    assert result["data"]["text/plain"].startswith(
        f"{{'name': '{name}', 'epochs': {epochs}, 'learning_rate': {learning_rate}, 'w': "
    )


def check_papermill_parameters(nb: nbformat.NotebookNode, proxy_pid: int | None) -> None:
    check_parameters(nb, "world", 10, 0.1)  # the defaults in the parameters cell


CHECKS: dict[str, Callable[[nbformat.NotebookNode, int | None], None]] = {
    "quickstart.ipynb": check_quickstart,
    "gpu_check.ipynb": check_gpu_check,
    "training_loop.ipynb": check_training_loop,
    "widgets.ipynb": check_widgets,
    "papermill_parameters.ipynb": check_papermill_parameters,
}

#: (example, backend of the kernelspec it runs with): both backends get exercised
RUNS = [
    ("quickstart.ipynb", "local"),
    ("gpu_check.ipynb", "local"),
    ("training_loop.ipynb", "local"),
    ("widgets.ipynb", "local"),
    ("widgets.ipynb", "jupyter"),
    ("papermill_parameters.ipynb", "jupyter"),
]


def test_every_example_is_checked() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.ipynb")) == sorted(CHECKS)
    assert {name for name, _ in RUNS} == set(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_example_is_clean(name: str) -> None:
    """Valid nbformat 4.5 with cell ids, asks for ``cgpu-local``, committed without outputs."""
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    nbformat.validate(nb)
    ids = [cell.get("id") for cell in nb.cells]
    assert all(ids), ids
    assert len(set(ids)) == len(ids), ids
    assert nb.metadata.kernelspec.name == "cgpu-local"
    assert nb.metadata.kernelspec.language == "python"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}:{cell.id} has stored outputs"
            assert cell.execution_count is None


def execute(path: Path, kernel_name: str, cwd: Path) -> tuple[nbformat.NotebookNode, int | None]:
    """Run the notebook through the proxy; it and the proxy kernel's process id."""
    nb = nbformat.read(path, as_version=4)
    proxy_pids: list[int | None] = []
    client = NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=120,
        startup_timeout=120,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.on_notebook_start = lambda **_: proxy_pids.append(
        getattr(getattr(client.km, "provisioner", None), "pid", None)
    )
    client.execute()
    errors = [
        f"{cell.id}: {o.get('ename')}: {o.get('evalue')}"
        for cell in nb.cells
        for o in cell.get("outputs", [])
        if o["output_type"] == "error"
    ]
    assert not errors, errors
    return nb, proxy_pids[0] if proxy_pids else None


@pytest.mark.parametrize(("name", "backend"), RUNS)
def test_example_runs_through_the_proxy(
    name: str, backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    kernel_name = request.getfixturevalue(f"{backend}_spec")
    nb, proxy_pid = execute(EXAMPLES / name, kernel_name, tmp_path)
    CHECKS[name](nb, proxy_pid)


def test_papermill_injects_parameters(local_spec: str, tmp_path: Path) -> None:
    output = tmp_path / "out.ipynb"
    parameters = {"name": "papermill", "epochs": 25, "learning_rate": 0.2}
    papermill.execute_notebook(
        str(EXAMPLES / "papermill_parameters.ipynb"),
        str(output),
        parameters=parameters,
        kernel_name=local_spec,
        cwd=str(tmp_path),
        progress_bar=False,
        start_timeout=120,
        execution_timeout=120,
    )
    nb = nbformat.read(output, as_version=4)
    tags = [cell.metadata.get("tags", []) for cell in nb.cells]
    injected = next(i for i, t in enumerate(tags) if "injected-parameters" in t)
    assert "parameters" in tags[injected - 1]  # papermill put its cell right after ours
    assert nb.metadata.papermill.parameters == parameters
    check_parameters(nb, "papermill", 25, 0.2)
