"""The notebooks in notebooks/ are stored executed, with their pictures, so GitHub shows them.

``make notebooks`` (docs/execute_notebooks.py) runs them and stores the outputs. These
tests read the stored files only: running the notebooks is the documentation build's job
(``make docs``, a step of ``make test``), which executes both from top to bottom and fails
on an error or on anything written to stderr, so they run once per ``make test``.
"""

import json
import re

import pytest

from helpers import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# A top-level call that draws a figure: plt.show() or the first notebook's show() helper.
DRAWS_A_FIGURE = re.compile(r"^(plt\.)?show\(", flags=re.MULTILINE)


def code_cells(path):
    notebook = json.loads(path.read_text())
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == [
        "01_dropblock_in_pictures.ipynb",
        "02_training_with_dropblock_nnx.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_as_one_run_from_top_to_bottom(path):
    # A cell edited and not rerun, or cells run out of order, break the 1, 2, 3, ... count.
    counts = [cell["execution_count"] for cell in code_cells(path)]
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: run `make notebooks` ({counts})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_without_errors_or_warnings(path):
    bad = [
        (number, output.get("ename") or "".join(output["text"]))
        for number, cell in enumerate(code_cells(path), 1)
        for output in cell["outputs"]
        if output["output_type"] == "error" or (output["output_type"] == "stream" and output["name"] == "stderr")
    ]
    assert not bad, f"{path.name}: {bad}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_figure_is_stored_as_a_picture(path):
    drawing = 0
    for number, cell in enumerate(code_cells(path), 1):
        source = "".join(cell["source"])
        pictures = [output for output in cell["outputs"] if "image/png" in output.get("data", {})]
        expected = len(DRAWS_A_FIGURE.findall(source))
        assert len(pictures) == expected, (
            f"{path.name}, code cell {number}: {len(pictures)} pictures, {expected} figures"
        )
        drawing += expected
    assert drawing >= 2, f"{path.name} draws {drawing} figures"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_without_timings(path):
    # docs/execute_notebooks.py leaves them out, so that rerunning a notebook whose results
    # did not change leaves the file unchanged.
    assert all("execution" not in cell["metadata"] for cell in code_cells(path)), path.name
