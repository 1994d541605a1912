"""Argument checks: every argument of the package is parsed and checked here.

A leaf module (it imports nothing else of the package), so that the core, the layers,
``models`` and the demo refuse the same bad argument with the same error type and
message wherever it enters: a value of the wrong type is a ``TypeError``, a value of the
right type out of range a ``ValueError``, and the message names the argument, the value
received and what is allowed. NumPy integers count as ints everywhere; bools never do.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeGuard, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import core
from jax.typing import ArrayLike

SEED_REGIONS = ("valid", "everywhere")
GAMMA_MODES = ("paper", "calibrated")
NORMALIZE_MODES = ("batch", "expected", "none")

# With the default spatial_axes, an int block_size means a square over the H and W axes
# of an (N, H, W, C) input: this many spatial axes, in an input of this rank only.
DEFAULT_SPATIAL_RANK = 2
INT_BLOCK_RANK = 4

# The dtypes x may have. The 8-, 6- and 4-bit floats are not among them: they are storage
# formats for matrix-multiply operands with their scales kept elsewhere, JAX promotes
# none of them, float8_e8m0fnu has no zero (a dropped unit could not be 0), several have
# no inf, and 2 or 3 mantissa bits cannot hold the rescaled units.
FLOATING_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))

_Choice = TypeVar("_Choice", str, int)
_Function = TypeVar("_Function", bound=Callable[..., Any])

#: Keyword names other libraries give the probability of dropping a unit (flax and
#: keras-cv ``rate``, timm ``drop_prob``, torchvision ``p``, the seed code ``drop_rate``).
PORTED_RATE_NAMES = ("rate", "drop_prob", "p", "drop_rate")


def ported_argument_error(name: str, received: str, example: str | None = None) -> TypeError:
    """The TypeError for a dropout-style argument ``received`` (e.g. ``"rate=0.1"``) given to ``name``.

    Args:
      name: the function or layer, as the user writes it.
      received: what was given, e.g. ``"rate=0.1"``.
      example: a call with ``keep_prob=0.9``; None for a layer, which takes keep_prob by
        keyword only: ``name(keep_prob=0.9)``.

    Examples:
      >>> str(ported_argument_error("resnet", "drop_prob=0.1", "resnet(50, keep_prob=0.9)"))
      'resnet got drop_prob=0.1, but it takes keep_prob, the probability of keeping a unit: a drop rate r is ...'
    """
    how = "" if example else " by keyword"
    return TypeError(
        f"{name} got {received}, but it takes keep_prob, the probability of keeping a unit{how}: "
        f"a drop rate r is keep_prob = 1 - r (e.g. {example or f'{name}(keep_prob=0.9)'} for a rate of 0.1)."
    )


def rejects_rate_keywords(example: str) -> Callable[[_Function], _Function]:
    """Makes a function answer a dropout-style rate keyword with :func:`ported_argument_error`.

    A keyword of :data:`PORTED_RATE_NAMES` the function does not take gets the
    ``keep_prob = 1 - rate`` conversion instead of Python's "unexpected keyword
    argument". The signature is kept (``inspect.signature`` follows ``__wrapped__``).

    Args:
      example: a call of the function with ``keep_prob=0.9``, for the message.
    """

    def decorate(function: _Function) -> _Function:
        accepts = inspect.signature(function).parameters
        names = tuple(name for name in PORTED_RATE_NAMES if name not in accepts)

        @functools.wraps(function)
        def checked(*args: Any, **kwargs: Any) -> Any:
            for name in names:
                if name in kwargs:
                    raise ported_argument_error(function.__name__, f"{name}={kwargs[name]!r}", example)
            return function(*args, **kwargs)

        return cast(_Function, checked)

    return decorate


def is_int(value: object) -> TypeGuard[int]:
    """True for Python and NumPy integers, False for bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_choice(name: str, value: object, allowed: Sequence[_Choice], detail: str = "") -> _Choice:
    """Returns ``value`` if it is one of ``allowed`` (strings, or ints); raises ValueError otherwise.

    A value of another type than the choices is not one of them (``True`` is not the
    choice ``1``), and is refused with the same message; ``detail`` follows the choices
    in it.

    Examples:
      >>> check_choice("seed_region", "valid", SEED_REGIONS)
      'valid'
      >>> check_choice("depth", 42, (18, 50))
      Traceback (most recent call last):
      ...
      ValueError: depth must be one of (18, 50), got 42.
    """
    same_kind = is_int(value) if all(map(is_int, allowed)) else isinstance(value, str)
    if not same_kind or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}{detail}, got {value!r}.")
    return cast(_Choice, value)


def check_int(name: str, value: object, low: int | None = None, high: int | None = None, detail: str = "") -> int:
    """Returns ``value`` as an int if it is one in ``[low, high]``.

    Args:
      name: the argument's name, for the message.
      value: the value received.
      low: the smallest value allowed, or None.
      high: the largest value allowed, or None.
      detail: words after what is allowed, e.g. ``" (the number of stages)"``.

    Raises:
      TypeError: when ``value`` is not an int (a bool is not).
      ValueError: when it is out of range.

    Examples:
      >>> check_int("df", 3, low=1)
      3
      >>> check_int("df", 0, low=1)
      Traceback (most recent call last):
      ...
      ValueError: df must be an int >= 1, got 0.
    """
    if low is not None and high is not None:
        allowed = f"an int in [{low}, {high}]"
    elif low is not None:
        allowed = f"an int >= {low}"
    else:
        allowed = "an int"
    message = f"{name} must be {allowed}{detail}, got {value!r}."
    if not is_int(value):
        raise TypeError(message)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(message)
    return int(value)


def check_ints(name: str, values: object, length: int | None = None, detail: str = "") -> tuple[int, ...]:
    """Returns ``values``, a tuple or list of ints >= 1 (of ``length`` entries when given), as a tuple.

    Raises:
      TypeError: when ``values`` is not a tuple or list of ints.
      ValueError: when it is empty, of another length, or holds an int below 1.

    Examples:
      >>> check_ints("widths", [16, 32])
      (16, 32)
    """
    allowed = "a non-empty tuple of ints >= 1" if length is None else f"a tuple of {length} ints >= 1"
    message = f"{name} must be {allowed}{detail}, got {values!r}."
    if not isinstance(values, (tuple, list)) or not all(map(is_int, values)):
        raise TypeError(message)
    if not values or (length is not None and len(values) != length) or min(values) < 1:
        raise ValueError(message)
    return tuple(int(v) for v in values)


def check_bool(name: str, value: object) -> bool:
    """Returns ``value`` if it is a bool; raises TypeError otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}.")
    return value


def check_axis_name(axis_name: object) -> Hashable | None:
    """Returns ``axis_name`` if it can name a mapped axis: None, a name, or a tuple of names.

    A name is any hashable that is not a number: JAX reads an int given to ``psum`` as
    a positional array axis, not as the name of a ``vmap``/``pmap``/``shard_map`` axis.
    """
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if axis_name is None or (
        names and all(isinstance(n, Hashable) and not isinstance(n, numbers.Number) for n in names)
    ):
        return axis_name
    raise TypeError(
        "axis_name must be None, the name of a mapped axis (e.g. 'batch', as given to jax.vmap, "
        f"jax.pmap or shard_map's mesh) or a tuple of names, got {axis_name!r}."
    )


def check_axis_name_is_bound(axis_name: Hashable | None) -> None:
    """Raises a ValueError naming ``axis_name`` where JAX's psum would raise a NameError about psum."""
    if axis_name is None:
        return
    try:
        jax.lax.axis_size(axis_name)
    except NameError as error:
        raise ValueError(
            f"axis_name {axis_name!r} is not bound here: normalize='batch' sums its counts over that "
            "mapped axis, so call drop_block inside the jax.vmap, jax.pmap or shard_map that names it "
            "(vmap(..., axis_name=...)), or pass axis_name=None."
        ) from error


def parse_block_size(block_size: object, rank: int | None = None) -> tuple[int, ...]:
    """Returns ``block_size`` as a tuple of ints >= 1.

    An int becomes a cube over ``rank`` axes (2 when ``rank`` is None); a tuple must
    have ``rank`` entries when ``rank`` is given.

    Examples:
      >>> parse_block_size(3), parse_block_size([3, 2])
      ((3, 3), (3, 2))
    """
    if is_int(block_size):
        sizes = (int(block_size),) * (DEFAULT_SPATIAL_RANK if rank is None else rank)
    elif isinstance(block_size, (tuple, list)) and block_size and all(map(is_int, block_size)):
        sizes = tuple(int(b) for b in block_size)
        if rank is not None and len(sizes) != rank:
            raise ValueError(f"block_size must have one entry per spatial axis ({rank}), got {block_size!r}.")
    else:
        entries = block_size if isinstance(block_size, (tuple, list)) else (block_size,)
        hint = (
            ": it shapes the mask, so it must be a static Python int; under jax.jit mark it static "
            "(jax.jit(f, static_argnames='block_size') or static_argnums)"
            if any(isinstance(b, (core.Tracer, jax.Array)) for b in entries)
            else ""
        )
        raise TypeError(f"block_size must be an int or a non-empty tuple of ints, got {block_size!r}{hint}.")
    if min(sizes) < 1:
        raise ValueError(f"block_size entries must be >= 1, got {block_size!r}.")
    return sizes


def static_block_size(block_size: int | Sequence[int]) -> int | tuple[int, ...]:
    """A checked ``block_size`` as a layer holds it, an int or a tuple of ints.

    An int stays an int: a cube over however many spatial axes the input has.
    """
    if is_int(block_size):
        return int(block_size)
    return tuple(int(b) for b in cast(Sequence[int], block_size))


def axes_tuple(name: str, axes: object) -> tuple[int, ...]:
    """An axis argument, an int or a tuple or list of ints, as a tuple of ints (not yet checked against a rank).

    Examples:
      >>> axes_tuple("broadcast_dims", -1), axes_tuple("spatial_axes", [1, 2])
      ((-1,), (1, 2))
    """
    entries = (axes,) if is_int(axes) else axes
    if not isinstance(entries, (tuple, list)) or not all(map(is_int, entries)):
        raise TypeError(f"{name} must be a tuple of ints, got {axes!r}.")
    return tuple(int(a) for a in entries)


def _as_given(axes: object) -> tuple[object, ...]:
    """An axis argument as a tuple of its entries as given (NumPy ints stay NumPy ints), for messages."""
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def _normalize_axes(name: str, axes: object, ndim: int) -> tuple[int, ...]:
    """The axes of an axis argument in an array of ``ndim`` dimensions, each in ``0 .. ndim - 1``, none repeated."""
    entries = axes_tuple(name, axes)
    for axis in entries:
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"{name} entry {axis} is out of range for an array with {ndim} dimensions "
                f"(allowed: {-ndim} .. {ndim - 1}); got {name}={_as_given(axes)!r}."
            )
    normalized = tuple(axis % ndim for axis in entries)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"{name} must not repeat an axis, got {_as_given(axes)!r}.")
    return normalized


def _block_tuples(size: int, batched: bool) -> str:
    """The tuples an int block size ``size`` stands for, one per layout, for messages."""
    image = "(N, H, W, C) images" if batched else "(N, H, W, C) images or one (H, W, C) image"
    return (
        f"block_size=({size},) for (N, T, C) sequences, ({size}, {size}) for {image}, "
        f"({size}, {size}, {size}) for (N, D, H, W, C) volumes"
    )


def default_spatial_axes(shape: tuple[int, ...], block_size: object, *, batched: bool = False) -> tuple[int, ...]:
    """The spatial axes ``spatial_axes=None`` means for an array of ``shape``: the rule for an int ``block_size``.

    A tuple ``block_size`` extends over the ``len(block_size)`` axes just before the last
    (channels-last, any number of leading axes, also none). An int extends over H and W
    of a rank-4 ``(N, H, W, C)`` array only: on any other rank it is ambiguous (``(N, T,
    C)`` sequences or one ``(H, W, C)`` image? ``(N, D, H, W, C)`` frames or a volume?),
    and read as a square it could span samples, so it is refused with the tuples to pass.

    Args:
      shape: the array's shape.
      block_size: an int or a tuple of ints (checked here).
      batched: True where axis 0 is a batch axis, as in a layer's input: default axes
        that include it are refused too.

    Raises:
      ValueError: for an int on another rank than 4, for too few dimensions, and with
        ``batched`` for default axes that include axis 0.

    Examples:
      >>> default_spatial_axes((8, 16, 16, 3), 5), default_spatial_axes((8, 40, 1), (5,))
      ((1, 2), (1,))
      >>> default_spatial_axes((8, 40, 1), 5)
      Traceback (most recent call last):
      ...
      ValueError: block_size=5 (an int) with the default spatial_axes needs a rank-4 (N, H, W, C) input, ...
    """
    ndim = len(shape)
    if is_int(block_size):
        parse_block_size(block_size)
        if ndim != INT_BLOCK_RANK:
            raise ValueError(
                f"block_size={block_size!r} (an int) with the default spatial_axes needs a rank-4 (N, H, W, C) "
                f"input, but the input has rank {ndim} (shape {shape}): on this rank an int is ambiguous and its "
                "square could span samples. Pass a tuple, one size per spatial axis "
                f"({_block_tuples(block_size, batched)}), or pass spatial_axes (e.g. spatial_axes=(2, 3) for NCHW)."
            )
        return tuple(range(1, 1 + DEFAULT_SPATIAL_RANK))
    block = parse_block_size(block_size)
    if ndim < len(block) + 1:
        raise ValueError(
            f"an array of shape {shape} has too few dimensions for {len(block)} spatial axes "
            f"before a channel axis (block_size={block_size!r}); pass spatial_axes explicitly."
        )
    axes = tuple(range(ndim - 1 - len(block), ndim - 1))
    if batched and axes[0] == 0:
        raise ValueError(
            f"block_size={block_size!r} with the default spatial_axes extends over the {len(block)} axes before the "
            f"last, but the input has rank {ndim} (shape {shape}), so they would include axis 0, the batch axis, "
            "and blocks would span samples. A layer's input is batched: pass a block_size with one entry per "
            f"spatial axis ({_block_tuples(block[0], batched)}), or pass spatial_axes."
        )
    return axes


def check_layout_arguments(
    shape: tuple[int, ...],
    block_size: object,
    spatial_axes: object,
    broadcast_dims: object,
    *,
    batched: bool = False,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Checks ``block_size``, ``spatial_axes`` and ``broadcast_dims`` against an array of ``shape``.

    ``batched`` is :func:`default_spatial_axes`'s: True for a layer's (batched) input.

    Returns:
      ``(spatial_axes, block, broadcast_dims)``: the spatial axes in ``block_size``
      order, the block as a tuple, one entry per spatial axis, and the sorted axes that
      share one mask, all non-negative.
    """
    ndim = len(shape)
    if spatial_axes is None:
        axes = default_spatial_axes(shape, block_size, batched=batched)
        block = parse_block_size(block_size, len(axes))
    else:
        axes = _normalize_axes("spatial_axes", spatial_axes, ndim)
        if not axes:
            raise ValueError("spatial_axes must name at least one axis, got ().")
        block = parse_block_size(block_size, len(axes))
    broadcast = _normalize_axes("broadcast_dims", broadcast_dims, ndim)
    if set(broadcast) & set(axes):
        raise ValueError(
            f"broadcast_dims must not contain a spatial axis: got broadcast_dims={_as_given(broadcast_dims)!r} "
            f"with spatial axes {axes}."
        )
    if min(shape[a] for a in axes) < 1:
        raise ValueError(f"spatial axes {axes} of shape {shape} must have sizes >= 1.")
    return axes, block, tuple(sorted(broadcast))


def parse_feature_arguments(feature_shape: object, block_size: object) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ``feature_shape`` and ``block_size`` of the rate functions, checked, as tuples of equal length."""
    if is_int(feature_shape):
        feature_shape = (feature_shape,)
    if not isinstance(feature_shape, (tuple, list)) or not all(map(is_int, feature_shape)):
        raise TypeError(f"feature_shape must be a tuple of ints (the spatial sizes), got {feature_shape!r}.")
    if not feature_shape or min(feature_shape) < 1:
        raise ValueError(f"feature_shape must be a non-empty tuple of sizes >= 1, got {feature_shape!r}.")
    block = parse_block_size(block_size, len(feature_shape) if is_int(block_size) else None)
    if len(block) != len(feature_shape):
        raise ValueError(
            f"block_size {block_size!r} has {len(block)} entries but feature_shape "
            f"{tuple(feature_shape)!r} has {len(feature_shape)}."
        )
    return tuple(int(s) for s in feature_shape), block


def check_shape(shape: object) -> tuple[int, ...]:
    """``block_mask``'s ``shape``: a tuple or list of ints >= 0, as a tuple of ints."""
    if not isinstance(shape, (tuple, list)) or not all(map(is_int, shape)):
        raise TypeError(f"shape must be a tuple of ints, got {shape!r}.")
    if min(shape, default=0) < 0:
        raise ValueError(f"shape must have sizes >= 0, got {shape!r}.")
    return tuple(int(n) for n in shape)


def _rate_dtype() -> np.dtype:
    """float32, or float64 when ``jax_enable_x64`` is on."""
    return jnp.asarray(1.0).dtype


def concrete_value(value: ArrayLike) -> float | None:
    """The value of a scalar as a float, or None while it is traced."""
    # Callers pass real scalars (checked_probability refuses the rest); ArrayLike also
    # names complex numbers, which have no float().
    return None if isinstance(value, core.Tracer) else float(value)  # type: ignore[arg-type]


def checked_probability(name: str, value: ArrayLike) -> jax.Array:
    """Validates a probability argument and returns it as a scalar in [0, 1], without gradient.

    A concrete value outside [0, 1] raises; a traced one is clipped, so that a schedule
    never has to be concrete.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number, np.ndarray, jax.Array)):
        raise TypeError(f"{name} must be a real number or a scalar array, got {value!r}.")
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got an array of shape {np.shape(value)}.")
    dtype = getattr(value, "dtype", None)
    if dtype is not None and not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{name} must be a real number, got dtype {dtype}.")
    concrete = concrete_value(value)
    if concrete is not None and not 0.0 <= concrete <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {concrete!r}.")
    probability = jnp.asarray(value, _rate_dtype())
    return jnp.clip(jax.lax.stop_gradient(probability), 0.0, 1.0)


def check_key(key: object) -> jax.Array:
    """Returns a typed PRNG key, accepting typed keys of any impl and legacy uint32 keys."""
    if isinstance(key, (jax.Array, np.ndarray)):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.shape != ():
                raise TypeError(
                    f"key must be a single PRNG key, got a key array of shape {key.shape}; "
                    "use jax.vmap for a batch of keys."
                )
            # Only a jax.Array has a PRNG key dtype.
            return cast(jax.Array, key)
        legacy_shape = jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape
        if key.dtype == jnp.uint32 and key.shape == legacy_shape:
            # wrap_key_data takes NumPy arrays too; its annotation names jax.Array only.
            return jax.random.wrap_key_data(key)  # type: ignore[arg-type]
    raise TypeError(
        "key must be a PRNG key from jax.random.key (any impl) or a legacy "
        f"jax.random.PRNGKey, got {type(key).__name__} with "
        f"dtype={getattr(key, 'dtype', None)} and shape={getattr(key, 'shape', None)}; a seed is not a key: "
        "make one with jax.random.key(0) (and a new one per step with jax.random.split or jax.random.fold_in)."
    )


# Any, not ArrayLike: objects with ``__jax_array__`` are accepted and pass through as they are.
def check_floating(x: Any) -> jax.Array:
    """Returns ``x`` as an array if its dtype is one of :data:`FLOATING_DTYPES`; raises TypeError otherwise."""
    # The dtype is read before any conversion: XLA cannot even hold some narrow floats
    # (float6), so converting a NumPy array of them first would fail inside XLA.
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        x = jnp.asarray(x)
        dtype = x.dtype
    if jnp.dtype(dtype) not in FLOATING_DTYPES:
        allowed = ", ".join(d.name for d in FLOATING_DTYPES)
        hint = (
            "; cast 8-, 6- and 4-bit floats to bfloat16 or float16 before DropBlock"
            if jnp.issubdtype(dtype, jnp.floating)
            else ""
        )
        raise TypeError(f"x must be a floating array ({allowed}), got dtype {dtype}{hint}.")
    if not isinstance(x, jax.Array) and not hasattr(x, "__jax_array__"):
        x = jnp.asarray(x)
    return x
