"""Fails the build (a warning under -W) when a public name is missing from the reference.

The modules to check are ``public_api_modules`` in conf.py. A module's public names are
its ``__all__`` when it has one, else every name without a leading underscore that the
module's own top-level statements define (classes, functions, constants), not what it
imports.
"""

import ast
import importlib
import inspect
import types

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging

logger = logging.getLogger(__name__)


def public_names(module: types.ModuleType) -> list[str]:
    """The public names of ``module``: ``__all__``, or what it defines without a leading underscore."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    tree = ast.parse(inspect.getsource(module))
    names = []
    for statement in tree.body:
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(statement.name)
        elif isinstance(statement, ast.Assign):
            names.extend(target.id for target in statement.targets if isinstance(target, ast.Name))
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            names.append(statement.target.id)
    return [name for name in names if not name.startswith("_")]


def check_public_names(app: Sphinx, env: BuildEnvironment) -> None:
    """Warns once for every public name of the checked modules that no page documents."""
    documented = set(env.get_domain("py").objects)
    for module_name in app.config.public_api_modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            logger.warning("public_api: cannot import %s: %s", module_name, error)
            continue
        for name in public_names(module):
            if f"{module_name}.{name}" not in documented:
                logger.warning("public_api: %s.%s is public but not in the API reference", module_name, name)


def setup(app: Sphinx) -> dict[str, object]:
    """Registers the ``public_api_modules`` setting and the check."""
    app.add_config_value("public_api_modules", [], "env")
    app.connect("env-check-consistency", check_public_names)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
