"""Executes the notebooks of notebooks/ and stores them with their outputs.

``make notebooks`` runs it after a change to a notebook or to what it draws, so that
GitHub shows the current pictures. Each notebook runs top to bottom in a fresh kernel,
in an empty temporary directory (a notebook that writes a file fails here rather than
litter the checkout). An error, or anything written to stderr (a warning), fails the
run and leaves the notebook as it was. Cell timings are not stored and consecutive
stream outputs are merged, so an unchanged result gives an unchanged file.

Usage: python docs/execute_notebooks.py [NOTEBOOK ...]   (default: every notebook)
"""

import os
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Set before a kernel starts (it inherits them). The notebooks compile many small
# programs: LLVM's optimization passes dominate their compile time on CPU and change
# neither the random bits nor the printed results (the test suite runs with this flag).
_FLAG = "--xla_backend_optimization_level=0"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
# jupyter_core warns unless told to use the platformdirs paths.
os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")
# A non-interactive backend inherited from a shell would store no picture; the kernel's
# inline backend draws them.
if os.environ.get("MPLBACKEND", "").lower() == "agg":
    del os.environ["MPLBACKEND"]

import nbclient  # noqa: E402
import nbformat  # noqa: E402


def merged_streams(outputs: list[nbformat.NotebookNode]) -> list[nbformat.NotebookNode]:
    """``outputs`` with each run of consecutive outputs to the same stream joined into one."""
    merged: list[nbformat.NotebookNode] = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if (
            previous is not None
            and output.output_type == "stream"
            and previous.output_type == "stream"
            and previous.name == output.name
        ):
            previous.text += output.text
        else:
            merged.append(output)
    return merged


def execute(path: pathlib.Path) -> None:
    """Runs the notebook at ``path`` and writes it back with its outputs."""
    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as workdir:
        client = nbclient.NotebookClient(
            notebook,
            timeout=600,
            kernel_name="python3",
            record_timing=False,
            resources={"metadata": {"path": workdir}},
        )
        client.execute()
        left = os.listdir(workdir)
    if left:
        raise SystemExit(f"{path.name} wrote files into its working directory: {left}")
    for number, cell in enumerate(notebook.cells, 1):
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        cell.outputs = merged_streams(cell.outputs)
        stderr = [output.text for output in cell.outputs if output.output_type == "stream" and output.name == "stderr"]
        if stderr:
            raise SystemExit(f"{path.name}, cell {number}, wrote to stderr:\n{''.join(stderr)}")
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    print(f"executed {path.relative_to(ROOT)}")


def main(arguments: list[str]) -> None:
    """Executes the notebooks named in ``arguments``, or all of notebooks/."""
    paths = [pathlib.Path(a).resolve() for a in arguments] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in paths:
        execute(path)


if __name__ == "__main__":
    main(sys.argv[1:])
