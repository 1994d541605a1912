"""Release files: the license, and the configurations that build and publish the docs.

The documentation site itself is built (and its notebooks executed) by ``make docs``,
a step of ``make test``; these checks read files only.
"""

import hashlib
import subprocess
import sys

import pytest
import yaml

from helpers import PYPROJECT, ROOT

COPYRIGHT = "   Copyright 2026 The dropblock_jax Authors"
# MD5 of the Apache License 2.0 as the Apache Software Foundation publishes it
# (LICENSE-2.0.txt), whose appendix has the placeholder line below.
APACHE_2_0_MD5 = "3b83ef96387f14655fc854ddc3c6bd57"
PLACEHOLDER = "   Copyright [yyyy] [name of copyright owner]"


def test_license_is_the_apache_2_0_text_with_our_copyright():
    text = (ROOT / "LICENSE").read_text()
    assert text.count(COPYRIGHT + "\n") == 1
    assert hashlib.md5(text.replace(COPYRIGHT, PLACEHOLDER).encode()).hexdigest() == APACHE_2_0_MD5


def test_the_package_declares_and_ships_the_license():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]


def test_the_docs_extra_holds_what_the_site_build_needs():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(requirement.startswith("sphinx>=") for requirement in extras["docs"])


def test_read_the_docs_builds_the_site_make_docs_builds():
    config = yaml.safe_load((ROOT / ".readthedocs.yaml").read_text())
    assert config["sphinx"]["configuration"] == "docs/conf.py"
    assert config["sphinx"]["fail_on_warning"] is True
    (install,) = config["python"]["install"]
    assert install["extra_requirements"] == ["docs"]


@pytest.mark.launches
def test_the_gamma_sweep_on_the_arguments_page_is_what_its_command_prints():
    page = (ROOT / "docs" / "arguments.md").read_text()
    command = "python benchmarks/gamma_table.py --sweep"
    assert f"`{command}`" in page
    printed = subprocess.run(
        [sys.executable, *command.split()[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    ).stdout.strip()
    assert printed.count("\n") > 10, printed
    assert f"\n\n{printed}\n\n" in page, f"rerun `{command}` and paste its table into docs/arguments.md:\n{printed}"
