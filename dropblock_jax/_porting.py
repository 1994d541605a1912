"""The error a user porting a dropout-style layer gets: DropBlock takes ``keep_prob = 1 - rate``.

Other DropBlock and dropout layers take the probability of *dropping* a unit, first and
by position: ``nn.Dropout(0.1)``, timm's ``DropBlock2d(drop_prob=0.1)``, torchvision's
``DropBlock2d(p=0.1)``, keras-cv's ``DropBlock2D(rate=0.1)``. Read as ``keep_prob``, such
a value would keep 10% of the units, so every layer here takes ``keep_prob`` by keyword
only and answers these spellings with the conversion instead of Python's generic
"takes 1 positional argument" or "unexpected keyword argument".
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["PORTED_RATE_NAMES", "ported_argument_error", "reject_ported_arguments", "rejects_ported_arguments"]

#: Keyword names other libraries give the probability of dropping a unit (flax and
#: keras-cv ``rate``, timm ``drop_prob``, torchvision ``p``, the seed code ``drop_rate``).
PORTED_RATE_NAMES = ("rate", "drop_prob", "p", "drop_rate")

_Init = TypeVar("_Init", bound=Callable[..., None])


def ported_argument_error(layer: str, received: str) -> TypeError:
    """The TypeError for a dropout-style argument ``received`` (e.g. ``"rate=0.1"``) given to ``layer``."""
    return TypeError(
        f"{layer} got {received}, but it takes keep_prob, the probability of keeping a unit, by keyword: "
        f"a drop rate r is keep_prob = 1 - r (e.g. {layer}(keep_prob=0.9) for a rate of 0.1)."
    )


def reject_ported_arguments(layer: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Raises :func:`ported_argument_error` for positional arguments or a dropout-style keyword.

    Args:
      layer: the layer's name, as the user writes it.
      args: the positional arguments given to the constructor (self excluded).
      kwargs: the keyword arguments given to the constructor.

    Raises:
      TypeError: when ``args`` is not empty or ``kwargs`` holds one of :data:`PORTED_RATE_NAMES`.

    Examples:
      >>> reject_ported_arguments("DropBlock", (), {"keep_prob": 0.9})
      >>> reject_ported_arguments("DropBlock", (0.1,), {})
      Traceback (most recent call last):
      ...
      TypeError: DropBlock got the positional argument 0.1, but it takes keep_prob, ...
    """
    if args:
        shown = ", ".join(repr(a) for a in args)
        raise ported_argument_error(layer, f"the positional argument{'s' if len(args) > 1 else ''} {shown}")
    for name in PORTED_RATE_NAMES:
        if name in kwargs:
            raise ported_argument_error(layer, f"{name}={kwargs[name]!r}")


def rejects_ported_arguments(init: _Init) -> _Init:
    """Wraps a keyword-only ``__init__`` so that dropout-style calls get :func:`ported_argument_error`.

    The wrapper keeps the signature (``inspect.signature`` follows ``__wrapped__``) and
    checks before the original runs, so Python's generic binding errors never reach a
    user who passed a rate.
    """
    accepts = inspect.signature(init).parameters

    @functools.wraps(init)
    def checked_init(self: Any, *args: Any, **kwargs: Any) -> None:
        ported = {name: value for name, value in kwargs.items() if name in PORTED_RATE_NAMES and name not in accepts}
        reject_ported_arguments(type(self).__name__, args, ported)
        init(self, **kwargs)

    return checked_init  # type: ignore[return-value]
