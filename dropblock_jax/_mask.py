"""Block masks: Bernoulli seeds on the seed grid, dilated into blocks, up to 32 flags a word.

*Random bits.* Every seed flag compares 32 bits of :func:`position_bits`, a keyed hash
of its position (see ``_random``), with ``gamma * 2**32``. The hash is elementwise, so
it fuses into the pass that packs the flags. There is one path for every
``keep_prob``: no branch, traced or not.

*Packed flags.* Seeds, and the dropped flags they dilate into, are kept up to 32 to a
``uint32`` word along one non-spatial axis (the channels, or the batch when channels
share a mask). Blocks extend only over spatial axes, so a bitwise-or max-pool dilates
all the flags of a word at once, and the full-size mask never exists in memory: it is
unpacked inside the fused pass that applies it.

*Separable pooling.* One 1-D ``lax.reduce_window`` per spatial axis.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import DTypeLike

from dropblock_jax._geometry import MaskLayout
from dropblock_jax._random import flat_index, position_bits

# Flags are packed up to 32 to a uint32 word. Besides fewer elements to pool, words keep
# the count one fused pass up to 1024 channels: XLA splits a reduction over a dimension
# longer than 32 into a reduce-window that first writes an int32 copy of its input.
WORD_DTYPE = np.uint32
FLAGS_PER_WORD = 32
_BATCH_AXIS_FLAGS = 8
# Counts are exact integers held in two int32 parts, ``high * 2**16 + low``. int32 sums
# are exact below 2**31, so larger masks are counted in parts of fewer than 2**31
# entries, one full reduction each (a scalar all-reduce under sharding), and the parts
# are split into 16-bit halves before they are added up.
COUNT_LOW_BITS = 16
_MAX_PART_ENTRIES = (1 << 31) - 1
MAX_MASK_ENTRIES = 1 << 40


def flags_per_word(size: int, axis: int) -> int:
    """Flags a word holds along packed axis ``axis`` of ``size`` entries.

    The largest divisor of ``size`` up to 32, or up to 8 along the leading (batch) axis:
    words then tile the axis exactly (no padding flags), and an axis whose shards hold a
    multiple of that many entries (or that is one word) unpacks on each device without
    moving data. Data parallelism shards the batch, and batches per device are multiples
    of 8 far more often than of 32.
    """
    limit = _BATCH_AXIS_FLAGS if axis == 0 else FLAGS_PER_WORD
    return max(d for d in range(1, min(limit, size) + 1) if size % d == 0)


def _pack_along_last_axis(flags: jax.Array, per_word: int) -> jax.Array:
    """(..., per_word * n) zeros and ones -> (..., n) words, flag ``i`` of a word in bit ``i``."""
    grouped = flags.reshape(*flags.shape[:-1], -1, per_word).astype(WORD_DTYPE)
    weights = jnp.left_shift(WORD_DTYPE(1), jnp.arange(per_word, dtype=WORD_DTYPE))
    return jnp.sum(grouped * weights, axis=-1, dtype=WORD_DTYPE)


def bernoulli_seed_words(
    key: jax.Array, shape: tuple[int, ...], gamma: jax.Array, per_word: int = FLAGS_PER_WORD
) -> jax.Array:
    """Words of ``shape`` holding ``per_word`` independent Bernoulli(``gamma``) flags each.

    The flags of a word are consecutive along the last axis of the hashed positions;
    which axis the words are packed along does not matter, since all flags are i.i.d.
    """
    bits = position_bits(key, (*shape[:-1], shape[-1] * per_word))
    return _pack_along_last_axis((bits < seed_threshold(gamma)) | (gamma >= 1.0), per_word)


def seed_threshold(gamma: jax.Array) -> jax.Array:
    """The uint32 that 32 random bits fall below with probability ``gamma`` (below 1), 0 for a NaN ``gamma``.

    Comparing integers against ``gamma * 2**32`` needs no float conversion per position.
    A NaN rate fires no seed: chosen here, since what a NaN converts to is up to the
    platform.
    """
    threshold = jnp.floor(gamma.astype(jnp.float32) * np.float32(2.0**32))
    threshold = jnp.minimum(threshold, np.float32(2.0**32 - 256))
    return jnp.where(gamma > 0.0, threshold, np.float32(0.0)).astype(jnp.uint32)


def _pack_axis(layout: MaskLayout) -> int:
    """The non-spatial axis flags are packed along: the last one with >= 32 mask entries, else the one with the most."""
    mask_shape = layout.mask_shape
    candidates = [a for a in range(len(mask_shape)) if a not in layout.spatial_axes]
    return max(candidates, key=lambda a: (min(mask_shape[a], FLAGS_PER_WORD), a))


@dataclasses.dataclass(frozen=True)
class PackedMask:
    """Dropped flags of a mask, ``per_word`` to a word along ``axis``.

    Bit ``i`` of word ``j`` is entry ``per_word * j + i`` (see :func:`flags_per_word`).

    Attributes:
      dropped_bits: uint32 array, the mask's shape with ``axis`` cut to ``size / per_word``.
      axis: the packed axis.
      size: the mask's length along ``axis``.
      mask_shape: the shape of the unpacked mask.
    """

    dropped_bits: jax.Array
    axis: int
    size: int
    mask_shape: tuple[int, ...]

    @property
    def per_word(self) -> int:
        """Flags a word holds (see :func:`flags_per_word`)."""
        return flags_per_word(self.size, self.axis)

    def kept(self, shape: tuple[int, ...] | None = None) -> jax.Array:
        """The boolean mask, True = kept; cheap to fuse into the pass that applies it.

        With ``shape`` (the array's, which the mask broadcasts to), the flags are
        unpacked at that shape: a shared mask then reaches the pass that applies it as
        an elementwise function of its words rather than as a broadcast, which XLA's CPU
        fusion would duplicate into every consumer of a residual stream's gradient.
        """
        repeated = jnp.repeat(self.dropped_bits, self.per_word, axis=self.axis)
        if shape is not None and tuple(shape) != self.mask_shape:
            # Broadcast axes are not packed, so the mask has the array's rank and axes here.
            repeated = jnp.broadcast_to(repeated, shape)
        # An iota of the full shape: shifting a broadcast by a broadcast would fold back into
        # a broadcast of the mask.
        bit = lax.broadcasted_iota(WORD_DTYPE, repeated.shape, self.axis) % WORD_DTYPE(self.per_word)
        return ((repeated >> bit) & 1 == 0).reshape(self.mask_shape if shape is None else shape)

    @property
    def num_entries(self) -> int:
        """Number of entries of the unpacked mask."""
        return math.prod(self.mask_shape)

    def count_kept(self) -> tuple[jax.Array, jax.Array]:
        """Number of kept entries, exact, as int32 ``(high, low)``: ``high * 2**16 + low``.

        Raises:
          ValueError: for masks of ``2**40`` entries or more.
        """
        if self.num_entries >= MAX_MASK_ENTRIES:
            raise ValueError(f"masks of fewer than 2**40 entries are supported, got shape {self.mask_shape}.")
        dropped = lax.population_count(self.dropped_bits)
        parts = [jnp.sum(part, dtype=jnp.int32) for part in _parts_below(dropped, _MAX_PART_ENTRIES // FLAGS_PER_WORD)]
        low_mask = (1 << COUNT_LOW_BITS) - 1
        dropped_high = sum(part >> COUNT_LOW_BITS for part in parts)
        dropped_low = sum(part & low_mask for part in parts)
        total_high, total_low = count_parts(self.num_entries)
        return total_high - dropped_high, total_low - dropped_low


def count_parts(count: int) -> tuple[jax.Array, jax.Array]:
    """A static count as int32 ``(high, low)``, ``high * 2**16 + low``."""
    high, low = divmod(count, 1 << COUNT_LOW_BITS)
    return jnp.int32(high), jnp.int32(low)


def count_from_parts(high: jax.Array, low: jax.Array, dtype: DTypeLike) -> jax.Array:
    """``high * 2**16 + low`` in ``dtype`` (the inverse of :func:`count_parts`)."""
    return high.astype(dtype) * (1 << COUNT_LOW_BITS) + low.astype(dtype)


def _parts_below(values: jax.Array, max_size: int) -> list[jax.Array]:
    """``values`` as arrays of its shape, zero outside parts of at most ``max_size`` elements.

    The parts are ranges of the leading axes, selected by an ``iota`` comparison, so
    nothing is sliced or moved: a sharded array stays where it is.
    """
    if values.size <= max_size:
        return [values]
    shape = values.shape
    split = next(s for s in range(len(shape) + 1) if math.prod(shape[s:]) <= max_size)
    leading = math.prod(shape[:split])
    if leading >= 1 << 32:
        raise ValueError(f"an array of shape {shape} cannot be counted in parts.")
    rows_per_part = max_size // math.prod(shape[split:])
    row = flat_index(shape[:split], shape, 0)
    zero = jnp.zeros((), values.dtype)
    return [
        jnp.where((row >= start) & (row < min(start + rows_per_part, leading)), values, zero)
        for start in range(0, leading, rows_per_part)
    ]


def packed_block_mask(key: jax.Array, layout: MaskLayout, gamma: jax.Array) -> PackedMask:
    """The block mask of ``layout.mask_shape`` for seed rate ``gamma``, packed."""
    if len(layout.spatial_axes) == len(layout.shape):
        # Every axis is spatial: pack along a new leading axis of length 1.
        expanded = MaskLayout(
            shape=(1, *layout.shape),
            spatial_axes=tuple(a + 1 for a in layout.spatial_axes),
            broadcast_dims=(),
            geometry=layout.geometry,
        )
        packed = packed_block_mask(key, expanded, gamma)
        return dataclasses.replace(packed, mask_shape=layout.mask_shape)
    geometry = layout.geometry
    axis = _pack_axis(layout)
    size = layout.mask_shape[axis]
    packed_shape = list(layout.seed_shape)
    per_word = flags_per_word(size, axis)
    packed_shape[axis] = size // per_word
    dropped = bernoulli_seed_words(key, tuple(packed_shape), lax.stop_gradient(gamma), per_word)
    ndim = len(layout.shape)
    # One 1-D pool per spatial axis; bitwise or dilates all the flags of a word at once.
    for spatial_axis, window_size, padding in zip(layout.spatial_axes, geometry.windows, geometry.padding):
        window = [1] * ndim
        window[spatial_axis] = window_size
        pads = [(0, 0)] * ndim
        pads[spatial_axis] = padding
        dropped = lax.reduce_window(dropped, WORD_DTYPE(0), lax.bitwise_or, window, (1,) * ndim, pads)
    return PackedMask(dropped, axis, size, layout.mask_shape)
