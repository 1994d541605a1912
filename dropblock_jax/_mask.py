"""Block masks: Bernoulli seeds on the seed grid, dilated into blocks, 8 flags a byte.

Three things make the mask cheaper than plain dropout's, with the same statistics.

*Few random numbers.* At the rates DropBlock uses (gamma ~ 0.003 for keep_prob 0.9 and
block 7) almost every seed is zero. Instead of one random number per position, each
row of the seed grid draws the gaps between consecutive seeds, which are geometric
(inverse-CDF sampling of a uniform), and scatters the seeds at the resulting
positions: a fixed number of draws per row, a fraction of its length. The number of
draws is static, so a row could in principle need more; a sparse tier is taken only
when ``gamma`` is small enough that this has probability below ``2 ** -64`` per row (a
Chernoff bound), the cheapest such tier, and above every tier's limit each position
draws 32 random bits. All paths sample the same distribution; they produce different
bits for the same key, and which one runs depends on the arguments only, so a key
always gives the same mask.

*Packed flags.* Seeds, and the dropped flags they dilate into, are kept 8 to a byte
along one non-spatial axis (the channels, or the batch when channels share a mask).
Blocks extend only over spatial axes, so a bitwise-or max-pool dilates all 8 flags of a
byte at once, on an eighth of the bytes, and the full-size mask never exists in memory:
it is unpacked inside the fused pass that applies it.

*Separable pooling.* One 1-D ``lax.reduce_window`` per spatial axis.

Rows are the leading axes of the packed grid, so a batch-sharded array draws and
scatters its seeds locally on each device.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dropblock_jax._geometry import MaskLayout

FLAGS_PER_BYTE = 8
# Sparse tiers: one draw per `fraction` positions of a row, the cheapest tier whose
# seed rate limit admits gamma is used. 1/64 covers keep_prob 0.9 with blocks of 5 or
# more on maps of 14 and more; 1/16 covers blocks of 3 and keep_prob down to ~0.7.
SPARSE_FRACTIONS = (64, 16)
# Rows of at most this many positions (int32 positions never overflow) and at least
# MIN_SPARSE_ROW (shorter rows concentrate too little to gain from sparsity).
MAX_ROW = 1 << 16
MIN_SPARSE_ROW = 1 << 11
# Probability, per row, that the sparse path would need more draws than it has.
OVERFLOW_LOG_PROBABILITY = -64 * math.log(2)


def check_key(key) -> jax.Array:
    """Returns a typed PRNG key, accepting typed keys of any impl and legacy uint32 keys."""
    if isinstance(key, (jax.Array, np.ndarray)):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.shape != ():
                raise TypeError(
                    f"key must be a single PRNG key, got a key array of shape {key.shape}; "
                    "use jax.vmap for a batch of keys."
                )
            return key
        legacy_shape = jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape
        if key.dtype == jnp.uint32 and key.shape == legacy_shape:
            return jax.random.wrap_key_data(key)
    raise TypeError(
        "key must be a PRNG key from jax.random.key (any impl) or a legacy "
        f"jax.random.PRNGKey, got {type(key).__name__} with "
        f"dtype={getattr(key, 'dtype', None)} and shape={getattr(key, 'shape', None)}."
    )


def _rows_and_length(shape: tuple[int, ...], max_length: int) -> tuple[int, int]:
    """Splits ``shape`` at an axis boundary into (leading product, trailing product <= max_length)."""
    for split in range(len(shape) + 1):
        length = math.prod(shape[split:])
        if length <= max_length:
            return math.prod(shape[:split]), length
    raise AssertionError("unreachable: the empty trailing product is 1")


def _log_binomial_tail_bound(length: int, draws: int, gamma: float) -> float:
    """Chernoff bound on log P(Binomial(length, gamma) > draws)."""
    a = (draws + 1) / length
    if a >= 1.0:
        return -math.inf
    if gamma <= 0.0 or gamma >= a:
        return 0.0
    relative_entropy = a * math.log(a / gamma) + (1 - a) * math.log((1 - a) / (1 - gamma))
    return -length * relative_entropy


def sparse_gamma_limit(length: int, draws: int) -> float:
    """Largest gamma whose overflow probability per row stays below the bound."""
    low, high = 0.0, (draws + 1) / length
    for _ in range(60):
        mid = 0.5 * (low + high)
        if _log_binomial_tail_bound(length, draws, mid) <= OVERFLOW_LOG_PROBABILITY:
            low = mid
        else:
            high = mid
    return low


def _pack_along_last_axis(flags: jax.Array) -> jax.Array:
    """(..., 8 * n) zeros and ones -> (..., n) bytes, flag ``i`` of a byte in bit ``i``."""
    grouped = flags.reshape(*flags.shape[:-1], -1, FLAGS_PER_BYTE).astype(jnp.uint8)
    weights = jnp.left_shift(jnp.uint8(1), jnp.arange(FLAGS_PER_BYTE, dtype=jnp.uint8))
    return jnp.sum(grouped * weights, axis=-1, dtype=jnp.uint8)


def _dense_seed_bytes(key: jax.Array, rows: int, length: int, gamma: jax.Array) -> jax.Array:
    # Drawn as a matrix: XLA compiles threefry on a high-rank shape several times slower.
    bits = jax.random.bits(key, (rows, length * FLAGS_PER_BYTE), jnp.uint32)
    # Compare 32-bit integers against gamma * 2**32: no float conversion per position.
    threshold = jnp.floor(gamma.astype(jnp.float32) * np.float32(2.0**32))
    threshold = jnp.minimum(threshold, np.float32(2.0**32 - 256)).astype(jnp.uint32)
    return _pack_along_last_axis((bits < threshold) | (gamma >= 1.0))


def _sparse_seed_bytes(key: jax.Array, rows: int, length: int, draws: int, gamma: jax.Array) -> jax.Array:
    flags = length * FLAGS_PER_BYTE
    bits = jax.random.bits(key, (rows, draws), jnp.uint32)
    # Midpoints of a 2**-24 grid: uniform on the open interval (0, 1), exactly representable.
    uniform = ((bits >> 8).astype(jnp.float32) + 0.5) * np.float32(2.0**-24)
    log_survive = jnp.log1p(-gamma.astype(jnp.float32))
    # Gap - 1 ~ Geometric(gamma) on {0, 1, ...}: P(gap - 1 >= m) = (1 - gamma) ** m.
    gaps = jnp.floor(jnp.log(uniform) / jnp.minimum(log_survive, -np.float32(1e-30))) + 1.0
    # A gap past the row already leaves it; clipping keeps the int32 cumsum exact.
    gaps = jnp.minimum(gaps, np.float32(flags + 1)).astype(jnp.int32)
    positions = jnp.cumsum(gaps, axis=1) - 1
    # Positions strictly increase, so the bits added to one byte are distinct: add is or.
    flag_bits = jnp.left_shift(jnp.uint8(1), (positions % FLAGS_PER_BYTE).astype(jnp.uint8))

    def scatter_row(byte_index, row_bits):
        return jnp.zeros((length,), jnp.uint8).at[byte_index].add(row_bits, mode="drop")

    return jax.vmap(scatter_row)(positions // FLAGS_PER_BYTE, flag_bits)


def bernoulli_seed_bytes(key: jax.Array, shape: tuple[int, ...], gamma: jax.Array) -> jax.Array:
    """Bytes of ``shape`` holding 8 independent Bernoulli(``gamma``) flags each."""
    rows, length = _rows_and_length(shape, MAX_ROW // FLAGS_PER_BYTE)
    flags = length * FLAGS_PER_BYTE
    if flags < MIN_SPARSE_ROW:
        return _dense_seed_bytes(key, rows, length, gamma).reshape(shape)
    sparse_key, dense_key = jax.random.split(key)
    limits, branches = [], []
    for fraction in SPARSE_FRACTIONS:
        draws = -(-flags // fraction)
        limits.append(sparse_gamma_limit(flags, draws))
        branches.append(functools.partial(_sparse_seed_bytes, sparse_key, rows, length, draws))
    branches.append(functools.partial(_dense_seed_bytes, dense_key, rows, length))
    # The first tier whose limit admits gamma: limits grow with the number of draws.
    tier = jnp.sum(gamma > jnp.asarray(limits, jnp.float32), dtype=jnp.int32)
    return lax.switch(tier, branches, gamma).reshape(shape)


def _pack_axis(layout: MaskLayout) -> int:
    """The non-spatial axis flags are packed along: the last one with >= 8 mask entries,
    else the one with the most."""
    mask_shape = layout.mask_shape
    candidates = [a for a in range(len(mask_shape)) if a not in layout.spatial_axes]
    return max(candidates, key=lambda a: (min(mask_shape[a], FLAGS_PER_BYTE), a))


@dataclasses.dataclass(frozen=True)
class PackedMask:
    """Dropped flags of a mask, 8 to a byte along ``axis`` (bit ``i`` of byte ``j`` is
    entry ``8 * j + i``; entries past ``size`` are padding).

    Attributes:
      dropped_bits: uint8 array, the mask's shape with ``axis`` cut to ``ceil(size / 8)``.
      axis: the packed axis.
      size: the mask's length along ``axis``.
      mask_shape: the shape of the unpacked mask.
    """

    dropped_bits: jax.Array
    axis: int
    size: int
    mask_shape: tuple[int, ...]

    def kept(self) -> jax.Array:
        """The boolean mask, True = kept; cheap to fuse into the pass that applies it."""
        repeated = jnp.repeat(self.dropped_bits, FLAGS_PER_BYTE, axis=self.axis)
        repeated = lax.slice_in_dim(repeated, 0, self.size, axis=self.axis)
        bit_shape = [1] * repeated.ndim
        bit_shape[self.axis] = self.size
        bit = (np.arange(self.size) % FLAGS_PER_BYTE).astype(np.uint8).reshape(bit_shape)
        return ((repeated >> bit) & 1 == 0).reshape(self.mask_shape)

    def count_kept(self) -> jax.Array:
        """Number of kept entries, as int32."""
        valid_shape = [1] * self.dropped_bits.ndim
        valid_shape[self.axis] = self.dropped_bits.shape[self.axis]
        entries = np.arange(self.dropped_bits.shape[self.axis] * FLAGS_PER_BYTE).reshape(-1, FLAGS_PER_BYTE)
        valid = np.sum((entries < self.size) << np.arange(FLAGS_PER_BYTE), axis=1).astype(np.uint8)
        dropped = lax.population_count(self.dropped_bits & valid.reshape(valid_shape))
        total = self.dropped_bits.size // self.dropped_bits.shape[self.axis] * self.size
        # A plain full reduction: under sharding it is a local sum and a scalar all-reduce.
        return jnp.int32(total) - jnp.sum(dropped, dtype=jnp.int32)


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
    packed_shape[axis] = -(-size // FLAGS_PER_BYTE)
    dropped = bernoulli_seed_bytes(key, tuple(packed_shape), lax.stop_gradient(gamma))
    ndim = len(layout.shape)
    # One 1-D pool per spatial axis; bitwise or dilates the 8 flags of a byte at once.
    for spatial_axis, window_size, padding in zip(layout.spatial_axes, geometry.windows, geometry.padding):
        window = [1] * ndim
        window[spatial_axis] = window_size
        pads = [(0, 0)] * ndim
        pads[spatial_axis] = padding
        dropped = lax.reduce_window(dropped, np.uint8(0), lax.bitwise_or, window, (1,) * ndim, pads)
    return PackedMask(dropped, axis, size, layout.mask_shape)
