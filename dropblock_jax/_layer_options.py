"""What every layer checks when it is built, and the options it shares with ``drop_block``.

*Options.* Every layer holds ``drop_block``'s keyword options as attributes of the same
names (:data:`LAYER_OPTIONS`) and checks them at construction with
:func:`check_layer_arguments`, so that a bad configuration fails before any call, with
the message ``drop_block`` would give.

*Ported rates.* Other DropBlock and dropout layers take the probability of *dropping* a
unit, first and by position: ``nn.Dropout(0.1)``, timm's ``DropBlock2d(drop_prob=0.1)``,
torchvision's ``DropBlock2d(p=0.1)``, keras-cv's ``DropBlock2D(rate=0.1)``. Read as
``keep_prob``, such a value would keep 10% of the units, so every layer here takes
``keep_prob`` by keyword only and answers these spellings with the conversion
(:func:`reject_ported_arguments`) instead of Python's generic "takes 1 positional
argument" or "unexpected keyword argument". The message is
``_checks.ported_argument_error``'s, as for the functions.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

from dropblock_jax._checks import (
    GAMMA_MODES,
    INT_BLOCK_RANK,
    NORMALIZE_MODES,
    PORTED_RATE_NAMES,
    SEED_REGIONS,
    check_axis_name,
    check_choice,
    check_floating,
    check_layout_arguments,
    checked_probability,
    default_spatial_axes,
    is_int,
    parse_block_size,
    ported_argument_error,
)

# The keyword options of drop_block that a layer holds as attributes of the same names.
LAYER_OPTIONS = ("spatial_axes", "broadcast_dims", "seed_region", "gamma", "normalize", "axis_name")


def layer_options(layer: object) -> dict[str, Any]:
    """The drop_block keyword options a layer holds, by name."""
    return {name: getattr(layer, name) for name in LAYER_OPTIONS}


# The largest stand-in rank check_layer_arguments builds; an axis so large that it needs
# more (no feature map has thousands of dimensions) is left to the call to refuse.
_LAYER_CHECK_MAX_RANK = 4096

# Argument sets that passed check_layer_arguments, by _exact key. A Linen module is
# constructed again at every clone, apply and trace, where a set lookup costs far less
# than checking the layout again.
_PASSED_LAYER_ARGUMENTS: set[Hashable] = set()
_PASSED_LAYER_ARGUMENTS_MAX = 1024


def _exact(value: object) -> Hashable:
    """``value`` with its type, through tuples and lists: ``1`` and ``True``, ``3`` and ``3.0`` get different keys."""
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_exact(v) for v in value))
    return (type(value), value)


def _axis_ints(axes: object) -> list[int]:
    """The int entries of an axis argument (an int or a sequence); other entries are left to the checks."""
    entries = axes if isinstance(axes, (tuple, list)) else (axes,)
    return [int(a) for a in entries if is_int(a)]


def check_layer_arguments(
    *,
    keep_prob: float | None,
    block_size: int | Sequence[int],
    spatial_axes: int | Sequence[int] | None,
    broadcast_dims: int | Sequence[int],
    seed_region: str,
    gamma: str,
    normalize: str,
    axis_name: Hashable | None = None,
) -> None:
    """Checks a layer's ``drop_block`` arguments when the layer is built, with ``drop_block``'s messages.

    Every check that holds whatever the input's rank runs here: ``keep_prob`` (unless
    None), the types and sizes of ``block_size``, ``spatial_axes`` against
    ``block_size``, repeated axes, ``broadcast_dims`` naming a spatial axis as written,
    ``seed_region``, ``gamma``, ``normalize`` and ``axis_name``, with the messages
    ``drop_block`` gives for the smallest array these arguments fit. What depends on
    the input (an axis out of range, too few dimensions for the spatial axes, negative
    and positive axes that meet) is checked at the call.

    Args:
      keep_prob: the layer's keep_prob, or None where it is not checked here.
      block_size, spatial_axes, broadcast_dims, seed_region, gamma, normalize,
        axis_name: as given to :func:`dropblock_jax.drop_block`.

    Raises:
      TypeError: for an argument of the wrong type.
      ValueError: for an argument out of range, or inconsistent with another one.

    Examples:
      >>> check_layer_arguments(keep_prob=0.9, block_size=3, spatial_axes=None, broadcast_dims=(-1,),
      ...                       seed_region="valid", gamma="paper", normalize="batch")
      >>> check_layer_arguments(keep_prob=None, block_size=(3, 3), spatial_axes=(1,), broadcast_dims=(),
      ...                       seed_region="valid", gamma="paper", normalize="batch")
      Traceback (most recent call last):
      ...
      ValueError: block_size must have one entry per spatial axis (1), got (3, 3).
    """
    arguments = (keep_prob, block_size, spatial_axes, broadcast_dims, seed_region, gamma, normalize, axis_name)
    key = _exact(arguments)
    try:
        if key in _PASSED_LAYER_ARGUMENTS:
            return
    except TypeError:  # an unhashable argument (an array, a tracer) is checked every time
        key = None
    if keep_prob is not None:
        checked_probability("keep_prob", keep_prob)
    check_choice("gamma", gamma, GAMMA_MODES)
    # The layout of the smallest array these arguments fit, in which axes written
    # differently are different axes: check_layout_arguments then raises exactly the errors
    # drop_block raises for every input, and its messages name that array's axes.
    named = _axis_ints(broadcast_dims) + ([] if spatial_axes is None else _axis_ints(spatial_axes))
    after = [a for a in named if a >= 0]
    before = [-a for a in named if a < 0]
    if spatial_axes is None and is_int(block_size):
        # An int with the default axes fits a rank-4 input only.
        rank = INT_BLOCK_RANK
    else:
        if spatial_axes is None:
            # The default spatial axes reach back to the one before the channel axis.
            before.append(len(block_size) + 1 if isinstance(block_size, (tuple, list)) else 1)
        rank = max(after, default=-1) + 1 + max(before, default=0)
    if rank <= _LAYER_CHECK_MAX_RANK:
        check_layout_arguments((1,) * rank, block_size, spatial_axes, broadcast_dims)
    else:
        parse_block_size(block_size)
    check_choice("seed_region", seed_region, SEED_REGIONS)
    check_choice("normalize", normalize, NORMALIZE_MODES)
    check_axis_name(axis_name)
    if key is not None and len(_PASSED_LAYER_ARGUMENTS) < _PASSED_LAYER_ARGUMENTS_MAX:
        _PASSED_LAYER_ARGUMENTS.add(key)


def check_layer_input(inputs: Any, block_size: int | Sequence[int], spatial_axes: object) -> None:
    """What a Flax layer checks of its input at every call, deterministic or not.

    The input must be floating, and with the default ``spatial_axes`` its axis 0 is the
    batch: an int ``block_size`` needs a rank-4 ``(N, H, W, C)`` input and a tuple one
    more axis than ``drop_block`` needs, so that no block spans samples (see
    ``_checks.default_spatial_axes``). Checked in evaluation too, so
    that a model that evaluates also trains.
    """
    x = check_floating(inputs)
    if spatial_axes is None:
        default_spatial_axes(tuple(x.shape), block_size, batched=True)


_Init = TypeVar("_Init", bound=Callable[..., None])


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
