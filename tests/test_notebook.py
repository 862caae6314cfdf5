"""The notebook: its Markdown and .ipynb copies agree, and it runs."""

from pathlib import Path

import jupytext
import nbclient
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
MARKDOWN = NOTEBOOKS / "lstm_shakespeare.md"
IPYNB = NOTEBOOKS / "lstm_shakespeare.ipynb"
MAX_CELL_LINES = 16


@pytest.fixture(scope="module")
def pair():
    return jupytext.read(MARKDOWN), nbformat.read(IPYNB, as_version=4)


def test_pair_has_same_cells(pair):
    markdown, ipynb = pair
    assert len(markdown.cells) == len(ipynb.cells)
    for i, (a, b) in enumerate(zip(markdown.cells, ipynb.cells, strict=True)):
        assert a.cell_type == b.cell_type, f"cell {i}"
        assert a.source == b.source, f"cell {i} differs; run jupytext --sync"


def test_ipynb_outputs_stripped(pair):
    _, ipynb = pair
    for i, cell in enumerate(ipynb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs"
            assert cell.execution_count is None, f"cell {i} has a count"


def test_ipynb_is_valid_nbformat(pair):
    _, ipynb = pair
    nbformat.validate(ipynb)
    assert ipynb.nbformat == 4
    assert ipynb.metadata.kernelspec.name == "python3"


def test_code_cells_stay_short(pair):
    markdown, _ = pair
    for i, cell in enumerate(markdown.cells):
        if cell.cell_type == "code":
            lines = len(cell.source.splitlines())
            assert lines <= MAX_CELL_LINES, f"cell {i} has {lines} lines"


def test_notebook_runs_quick(data_dir, tmp_path, monkeypatch):
    # The kernel inherits this process's environment.
    monkeypatch.setenv("JAXLSTM_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("JAXLSTM_NOTEBOOK_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("JAXLSTM_DATA_DIR", str(data_dir))
    notebook = jupytext.read(MARKDOWN)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = [o for c in notebook.cells if c.cell_type == "code"
               for o in c.outputs]  # fmt: skip
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the two loss curves
    text = "".join(o.get("text", "") for o in outputs)
    assert "word: thou art more" in text
    assert "char: wherefore art thou" in text
    assert (tmp_path / "runs" / "char" / "loss.png").is_file()
