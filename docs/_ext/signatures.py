"""Full signatures and no borrowed docstrings in the API reference.

What autodoc would otherwise print:

- Flax NNX modules (through their metaclass's ``__call__``) and Keras layers (through
  ``Layer.__new__``) report ``(*args, **kwargs)`` as their class signature; the
  reference shows the signature of the class's own ``__init__`` instead.
- An ``X | None`` annotation whose ``X`` is an ``autodoc_type_aliases`` entry prints as
  ``TypeAliasForwardRef('X') | None``; the reference shows ``X | None``.
- A default value whose repr is ``<module.Class object>`` (the ``parent`` of every Linen
  module) is not Python, so Sphinx cannot parse the signature and splits it at every
  comma, brackets included; the reference shows it as ``module.Class()``.
- A constant without a docstring of its own (``__version__``, a tuple of choices) gets
  its type's docstring (``str``'s, ``tuple``'s); the reference shows only what
  api.md says of it.
"""

import inspect
import re

from sphinx.application import Sphinx
from sphinx.util.inspect import signature as evaluated_signature
from sphinx.util.inspect import stringify_signature

_FORWARD_REF = re.compile(r"TypeAliasForwardRef\('([^']*)'\)")
_OBJECT_REPR = re.compile(r"<([\w.]+) object(?: at 0x[0-9a-f]+)?>")
_PASS_THROUGH = {"(*args, **kwargs)", "(*args: Any, **kwargs: Any)"}


def full_signature(
    app: Sphinx,
    what: str,
    name: str,
    obj: object,
    options: object,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str | None, str | None]:
    """Replaces a pass-through class signature by ``__init__``'s and unwraps alias references."""
    if what == "class" and signature in _PASS_THROUGH and isinstance(obj, type) and "__init__" in vars(obj):
        init = evaluated_signature(obj.__init__, bound_method=True, type_aliases=app.config.autodoc_type_aliases)
        short = app.config.autodoc_typehints_format == "short"
        signature = stringify_signature(init, show_return_annotation=False, unqualified_typehints=short)
    if signature is not None:
        signature = _OBJECT_REPR.sub(r"\1()", _FORWARD_REF.sub(r"\1", signature))
    if return_annotation is not None:
        return_annotation = _FORWARD_REF.sub(r"\1", return_annotation)
    return signature, return_annotation


def no_borrowed_docstring(app: Sphinx, what: str, name: str, obj: object, options: object, lines: list[str]) -> None:
    """Drops the docstring a constant inherits from its type."""
    borrowed = type(obj).__doc__
    if what in ("data", "attribute") and borrowed and "\n".join(lines).strip() == inspect.cleandoc(borrowed):
        lines.clear()


def setup(app: Sphinx) -> dict[str, object]:
    """Connects the hooks."""
    app.connect("autodoc-process-signature", full_signature)
    app.connect("autodoc-process-docstring", no_borrowed_docstring)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
