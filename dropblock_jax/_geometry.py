"""Static geometry of DropBlock: argument checks, clipped blocks, seed grids, cover counts.

Everything here is plain Python and NumPy on shapes, computed once at trace time.

Block alignment. A seed at position ``p`` drops the positions
``p - (k - 1) // 2 .. p + k // 2`` along an axis with block size ``k``: the block is
centred on its seed, and for an even ``k`` the extra position lies after the seed
(the convention of the seed document's max-pool code and of timm). With
``seed_region="valid"`` seeds are drawn only where this whole block lies inside the
map, the region of paper Section 3; with ``"everywhere"`` seeds are drawn at every
position and blocks are cut at the border, except that a block as large as the map
along an axis spans that whole axis, so such a block drops whole maps
(SpatialDropout) in both regions.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Hashable, Sequence
from typing import TypeGuard

import numpy as np

SEED_REGIONS = ("valid", "everywhere")
GAMMA_MODES = ("paper", "calibrated")
NORMALIZE_MODES = ("batch", "expected", "none")

# An int block_size means a square block over this many spatial axes.
DEFAULT_SPATIAL_RANK = 2


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """Returns ``value`` if it is one of the strings ``allowed``; raises ValueError otherwise."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}.")
    return value


def is_int(value: object) -> TypeGuard[int]:
    """True for Python and NumPy integers, False for bools."""
    # NumPy integers count: they act as ints wherever sizes and axes are used.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


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


def parse_block_size(block_size: int | Sequence[int], rank: int | None = None) -> tuple[int, ...]:
    """Returns ``block_size`` as a tuple of ints >= 1.

    An int becomes a cube over ``rank`` axes (2 when ``rank`` is None); a tuple must
    have ``rank`` entries when ``rank`` is given.
    """
    if is_int(block_size):
        sizes = (int(block_size),) * (DEFAULT_SPATIAL_RANK if rank is None else rank)
    elif isinstance(block_size, (tuple, list)) and block_size and all(map(is_int, block_size)):
        sizes = tuple(int(b) for b in block_size)
        if rank is not None and len(sizes) != rank:
            raise ValueError(f"block_size must have one entry per spatial axis ({rank}), got {block_size!r}.")
    else:
        raise TypeError(f"block_size must be an int or a non-empty tuple of ints, got {block_size!r}.")
    if min(sizes) < 1:
        raise ValueError(f"block_size entries must be >= 1, got {block_size!r}.")
    return sizes


def _normalize_axes(name: str, axes: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    if is_int(axes):
        axes = (axes,)
    if not isinstance(axes, (tuple, list)) or not all(map(is_int, axes)):
        raise TypeError(f"{name} must be a tuple of ints, got {axes!r}.")
    normalized = []
    for axis in axes:
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"{name} entry {axis} is out of range for an array with {ndim} dimensions "
                f"(allowed: {-ndim} .. {ndim - 1}); got {name}={tuple(axes)!r}."
            )
        normalized.append(int(axis) % ndim)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"{name} must not repeat an axis, got {tuple(axes)!r}.")
    return tuple(normalized)


def _axis_pooling(size: int, block: int, seed_region: str) -> tuple[int, int, tuple[int, int]]:
    """Seed grid length, max-pool window and padding of one axis (block already clipped).

    Output position ``i`` of the pool sees seeds ``i - low .. i - low + window - 1``.
    """
    if seed_region == "valid":
        # Seed q of the valid grid drops q .. q + block - 1.
        return size - block + 1, block, (block - 1, block - 1)
    if block == size:
        # A block as large as the map spans the whole axis whatever its seed, so that
        # such a block drops whole maps in both seed regions.
        return size, 2 * size - 1, (size - 1, size - 1)
    return size, block, (block // 2, (block - 1) // 2)


def _cover_counts_1d(size: int, seed_size: int, window: int, low: int) -> np.ndarray:
    """How many seeds of the grid drop each position of one axis."""
    position = np.arange(size)
    first = np.maximum(0, position - low)
    last = np.minimum(seed_size - 1, position - low + window - 1)
    return last - first + 1


@dataclasses.dataclass(frozen=True)
class SpatialGeometry:
    """Block and seed grid of one feature map, with its cover-count histogram.

    Attributes:
      sizes: the map's spatial sizes.
      block: block sizes clipped to ``sizes``.
      seed_region: ``"valid"`` or ``"everywhere"``.
      seed_sizes: spatial sizes of the grid seeds are drawn on.
      windows: max-pool window per axis; the block, except where an "everywhere"
        block spans the whole axis.
      padding: ``(low, high)`` padding per axis that turns a max-pool of the seed grid
        into the dropped region, with the output the size of the map.
      cover_values: distinct numbers of seeds that cover a position.
      cover_counts: how many positions have each of those numbers.
    """

    sizes: tuple[int, ...]
    block: tuple[int, ...]
    seed_region: str
    seed_sizes: tuple[int, ...]
    windows: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    cover_values: tuple[int, ...]
    cover_counts: tuple[int, ...]

    @property
    def num_positions(self) -> int:
        """Number of positions of the map."""
        return int(np.prod(self.sizes))

    @property
    def paper_gamma_factor(self) -> float:
        """``gamma / (1 - keep_prob)`` of the paper's formula (Section 3, Eq. 1)."""
        factor = 1.0 / np.prod(self.block, dtype=np.float64)
        if self.seed_region == "valid":
            factor *= self.num_positions / np.prod(self.seed_sizes, dtype=np.float64)
        return float(factor)


def spatial_geometry(sizes: Sequence[int], block: Sequence[int], seed_region: str) -> SpatialGeometry:
    """Builds the static geometry of a map of spatial ``sizes`` (block already parsed)."""
    check_choice("seed_region", seed_region, SEED_REGIONS)
    sizes = tuple(int(s) for s in sizes)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"spatial sizes must be >= 1, got {sizes!r}.")
    block = tuple(min(b, s) for b, s in zip(block, sizes))
    seed_sizes, windows, padding = zip(*(_axis_pooling(s, b, seed_region) for s, b in zip(sizes, block)))

    # The cover count of a position is the product of its per-axis counts, so its
    # histogram is the product of the per-axis histograms.
    values, counts = np.array([1], np.int64), np.array([1], np.int64)
    for size, seed_size, window, (low, _) in zip(sizes, seed_sizes, windows, padding):
        axis_counts = _cover_counts_1d(size, seed_size, window, low)
        axis_values, axis_weights = np.unique(axis_counts, return_counts=True)
        products = np.multiply.outer(values, axis_values).ravel()
        weights = np.multiply.outer(counts, axis_weights).ravel()
        values, inverse = np.unique(products, return_inverse=True)
        counts = np.bincount(inverse.ravel(), weights=weights).astype(np.int64)
    return SpatialGeometry(
        sizes=sizes,
        block=block,
        seed_region=seed_region,
        seed_sizes=tuple(seed_sizes),
        windows=tuple(windows),
        padding=tuple(padding),
        cover_values=tuple(int(v) for v in values),
        cover_counts=tuple(int(c) for c in counts),
    )


def feature_geometry(
    feature_shape: int | Sequence[int], block_size: int | Sequence[int], seed_region: str
) -> SpatialGeometry:
    """Geometry from the ``feature_shape`` / ``block_size`` arguments of the rate functions."""
    if is_int(feature_shape):
        feature_shape = (feature_shape,)
    if not isinstance(feature_shape, (tuple, list)) or not all(map(is_int, feature_shape)):
        raise TypeError(f"feature_shape must be a tuple of ints (the spatial sizes), got {feature_shape!r}.")
    if not feature_shape or min(feature_shape) < 1:
        raise ValueError(f"feature_shape must be a non-empty tuple of sizes >= 1, got {feature_shape!r}.")
    block = parse_block_size(block_size, None if not is_int(block_size) else len(feature_shape))
    if len(block) != len(feature_shape):
        raise ValueError(
            f"block_size {block_size!r} has {len(block)} entries but feature_shape "
            f"{tuple(feature_shape)!r} has {len(feature_shape)}."
        )
    return spatial_geometry(feature_shape, block, seed_region)


@dataclasses.dataclass(frozen=True)
class MaskLayout:
    """Where the spatial geometry sits inside an array, and which axes share a mask.

    Attributes:
      shape: the array's shape.
      spatial_axes: the axes blocks extend over, in ``block_size`` order.
      broadcast_dims: the axes that share one mask.
      geometry: the spatial geometry.
    """

    shape: tuple[int, ...]
    spatial_axes: tuple[int, ...]
    broadcast_dims: tuple[int, ...]
    geometry: SpatialGeometry

    @property
    def mask_shape(self) -> tuple[int, ...]:
        """The shape of one mask draw: ``shape`` with broadcast dims set to 1."""
        return tuple(1 if axis in self.broadcast_dims else n for axis, n in enumerate(self.shape))

    @property
    def seed_shape(self) -> tuple[int, ...]:
        """The shape seeds are drawn on: ``mask_shape`` with spatial axes cut to the seed grid."""
        shape = list(self.mask_shape)
        for axis, n in zip(self.spatial_axes, self.geometry.seed_sizes):
            shape[axis] = n
        return tuple(shape)


def mask_layout(
    shape: Sequence[int],
    block_size: int | Sequence[int],
    spatial_axes: int | Sequence[int] | None,
    broadcast_dims: int | Sequence[int],
    seed_region: str,
) -> MaskLayout:
    """Checks the array-level arguments and returns the static layout."""
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    if spatial_axes is None:
        block = parse_block_size(block_size)
        if ndim < len(block) + 1:
            raise ValueError(
                f"an array of shape {shape} has too few dimensions for {len(block)} spatial axes "
                f"before a channel axis (block_size={block_size!r}); pass spatial_axes explicitly."
            )
        axes = tuple(range(ndim - 1 - len(block), ndim - 1))
    else:
        axes = _normalize_axes("spatial_axes", spatial_axes, ndim)
        if not axes:
            raise ValueError("spatial_axes must name at least one axis, got ().")
        block = parse_block_size(block_size, len(axes))
    broadcast = _normalize_axes("broadcast_dims", broadcast_dims, ndim)
    shared = sorted(set(broadcast) & set(axes))
    if shared:
        given = tuple(broadcast_dims) if isinstance(broadcast_dims, (tuple, list)) else (broadcast_dims,)
        raise ValueError(
            f"broadcast_dims must not contain a spatial axis: got broadcast_dims={given!r} with spatial axes {axes}."
        )
    sizes = tuple(shape[a] for a in axes)
    if min(sizes) < 1:
        raise ValueError(f"spatial axes {axes} of shape {shape} must have sizes >= 1.")
    return MaskLayout(
        shape=shape,
        spatial_axes=axes,
        broadcast_dims=tuple(sorted(broadcast)),
        geometry=spatial_geometry(sizes, block, seed_region),
    )


# The largest stand-in rank check_layer_arguments builds; an axis so large that it needs
# more (no feature map has thousands of dimensions) is left to the call to refuse.
_LAYER_CHECK_MAX_RANK = 4096

# Argument sets that passed check_layer_arguments, by _exact key. A Linen module is
# constructed again at every clone, apply and trace; the layout check costs a few
# hundred microseconds, a set lookup a few.
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
        # The rates module builds on this one, so it can only be imported once both are loaded.
        from dropblock_jax._rates import checked_probability

        checked_probability("keep_prob", keep_prob)
    check_choice("gamma", gamma, GAMMA_MODES)
    # The layout of the smallest array these arguments fit, in which axes written
    # differently are different axes: mask_layout then raises exactly the errors
    # drop_block raises for every input, and its messages name that array's axes.
    named = _axis_ints(broadcast_dims) + ([] if spatial_axes is None else _axis_ints(spatial_axes))
    after = [a for a in named if a >= 0]
    before = [-a for a in named if a < 0]
    if spatial_axes is None:
        # The default spatial axes reach back to the one before the channel axis.
        before.append((len(block_size) if isinstance(block_size, (tuple, list)) else DEFAULT_SPATIAL_RANK) + 1)
    rank = max(after, default=-1) + 1 + max(before, default=0)
    if rank <= _LAYER_CHECK_MAX_RANK:
        mask_layout((1,) * rank, block_size, spatial_axes, broadcast_dims, seed_region)
    else:
        parse_block_size(block_size)
        check_choice("seed_region", seed_region, SEED_REGIONS)
    check_choice("normalize", normalize, NORMALIZE_MODES)
    check_axis_name(axis_name)
    if key is not None and len(_PASSED_LAYER_ARGUMENTS) < _PASSED_LAYER_ARGUMENTS_MAX:
        _PASSED_LAYER_ARGUMENTS.add(key)
