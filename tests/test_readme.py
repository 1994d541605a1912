"""Every ```python block of README.md and of docs/*.md runs, in order, one namespace a file."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_python_blocks_run(document):
    blocks = re.findall(r"```python\n(.*?)```", document.read_text(), flags=re.DOTALL)
    namespace = {"__name__": document.stem}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"{document.name} python block {number}", "exec"), namespace)


def test_every_document_but_the_demo_report_has_examples():
    with_examples = {p.name for p in DOCUMENTS if "```python" in p.read_text()}
    assert with_examples >= {"README.md", "arguments.md", "layers.md", "recipe.md"}, with_examples
