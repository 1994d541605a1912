"""Every ```python block of README.md and of docs/*.md runs, in order, one namespace a file.

A ```python block followed directly by a ```text block prints exactly that text.
"""

import contextlib
import io
import re

import pytest

from helpers import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A python block, and the text block right after it (its printed output) when there is one.
BLOCK = re.compile(r"```python\n(.*?)```(?:\s*?\n```text\n(.*?)```)?", flags=re.DOTALL)


def blocks(document):
    return [(code, shown) for code, shown in BLOCK.findall(document.read_text())]


# jax before 0.9 (the minimum-version run) warns that jax.make_mesh's default axis type
# will change; the pages use today's default.
@pytest.mark.filterwarnings("ignore:The default axis_types will change:DeprecationWarning")
@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_python_blocks_run(document):
    namespace = {"__name__": document.stem}
    for number, (code, shown) in enumerate(blocks(document), 1):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"{document.name} python block {number}", "exec"), namespace)
        if shown:
            assert printed.getvalue() == shown, f"{document.name} python block {number} printed:\n{printed.getvalue()}"


def test_every_document_but_the_demo_report_has_examples():
    with_examples = {p.name for p in DOCUMENTS if "```python" in p.read_text()}
    assert with_examples >= {"README.md", "arguments.md", "index.md", "layers.md", "recipe.md"}, with_examples


def test_the_landing_page_shows_what_its_example_prints():
    ((_, shown),) = blocks(ROOT / "docs" / "index.md")
    assert shown.strip(), "docs/index.md: the example's output, in a ```text block after it"


# jax before 0.9 (the minimum-version run) warns that jax.make_mesh's default axis type
# will change; the pages use today's default.
@pytest.mark.filterwarnings("ignore:The default axis_types will change:DeprecationWarning")
@pytest.mark.parametrize("number", range(1, 1 + len(blocks(ROOT / "README.md"))))
def test_every_readme_block_runs_pasted_alone(number):
    # A reader copies one block, not the page: each imports and builds what it uses.
    code, _ = blocks(ROOT / "README.md")[number - 1]
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, f"README.md python block {number}", "exec"), {"__name__": "readme"})
