"""Static geometry of DropBlock: clipped blocks, seed grids, cover counts, where masks sit in an array.

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
from collections.abc import Sequence

import numpy as np

from dropblock_jax._checks import SEED_REGIONS, check_choice, check_layout_arguments, parse_feature_arguments


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
    sizes, block = parse_feature_arguments(feature_shape, block_size)
    return spatial_geometry(sizes, block, seed_region)


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
    axes, block, broadcast = check_layout_arguments(shape, block_size, spatial_axes, broadcast_dims)
    return MaskLayout(
        shape=shape,
        spatial_axes=axes,
        broadcast_dims=broadcast,
        geometry=spatial_geometry(tuple(shape[a] for a in axes), block, seed_region),
    )
