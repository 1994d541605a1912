"""Every command of ``docs/imagenet.md``, ``docs/pods.md`` and the README's ImageNet section parses.

The commands of their shell blocks that run an example script (``python
examples/...py ...``, continuation lines joined, inside ``gcloud ... --command "..."``
too) are checked against the scripts themselves: ``examples/imagenet/train.py``
parses each one with ``--only_check_args`` (absl reads every flag and applies every
``--config.FIELD=VALUE`` override, then exits before training); ``examples/train.py``
with its own ``parse_args``; ``prepare.py``'s options against its ``--help``. A flag
renamed in a script, or a config field in the docs that no config has, fails here.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest
import train as small_example
from configs import baseline

from helpers import ROOT

# examples/imagenet's own requirements, not the package's minimums: make test-min leaves it out.
pytestmark = pytest.mark.launches

DOCUMENTS = [ROOT / "docs" / "imagenet.md", ROOT / "docs" / "pods.md", ROOT / "README.md"]
SHELL_BLOCK = re.compile(r"```(?:bash|sh)\n(.*?)```", flags=re.DOTALL)
SCRIPT = re.compile(r"python3? (examples/\S+\.py)([^\n&|;\"#]*)")


def documented_commands():
    """(document, script, arguments) of every example script a shell block runs."""
    found = []
    for document in DOCUMENTS:
        for block in SHELL_BLOCK.findall(document.read_text()):
            text = block.replace("\\\n", " ")
            for script, arguments in SCRIPT.findall(text):
                found.append((document.name, script, shlex.split(arguments)))
    return found


COMMANDS = documented_commands()


def _ids(commands):
    return [f"{document}:{script}:{' '.join(arguments)[:60]}" for document, script, arguments in commands]


def test_the_documents_show_each_example_script():
    scripts = {(document, script) for document, script, _ in COMMANDS}
    assert ("imagenet.md", "examples/imagenet/train.py") in scripts
    assert ("imagenet.md", "examples/imagenet/prepare.py") in scripts
    assert ("pods.md", "examples/train.py") in scripts
    assert ("README.md", "examples/imagenet/train.py") in scripts
    # The pod and SLURM launch lines are among them.
    launches = [arguments for _, script, arguments in COMMANDS if script == "examples/imagenet/train.py"]
    assert sum("--distributed" in arguments for arguments in launches) >= 3


IMAGENET_TRAIN = [c for c in COMMANDS if c[1] == "examples/imagenet/train.py"]


@pytest.mark.parametrize(("document", "script", "arguments"), IMAGENET_TRAIN, ids=_ids(IMAGENET_TRAIN))
def test_imagenet_train_parses_the_documented_flags_and_config_fields(document, script, arguments):
    result = subprocess.run(
        [sys.executable, ROOT / script, *arguments, "--only_check_args"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


SMALL_TRAIN = [c for c in COMMANDS if c[1] == "examples/train.py"]


@pytest.mark.parametrize(("document", "script", "arguments"), SMALL_TRAIN, ids=_ids(SMALL_TRAIN))
def test_the_small_example_parses_the_documented_flags(document, script, arguments):
    small_example.parse_args(arguments)


def test_prepare_takes_the_documented_options():
    result = subprocess.run(
        [sys.executable, ROOT / "examples" / "imagenet" / "prepare.py", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    offered = set(re.findall(r"--[a-z-]+", result.stdout))
    for _, script, arguments in COMMANDS:
        if script == "examples/imagenet/prepare.py":
            used = {argument.split("=")[0] for argument in arguments if argument.startswith("--")}
            assert used and used <= offered, used - offered


def test_every_config_field_the_documents_name_is_a_field_of_the_configs():
    fields = set(baseline.get_config())
    named = {name for document in DOCUMENTS for name in re.findall(r"--config\.([a-z_]+)", document.read_text())}
    assert named and named <= fields, named - fields
