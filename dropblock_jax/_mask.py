"""Block masks: Bernoulli seeds on the seed grid, dilated into blocks.

The seeds are the only random numbers DropBlock needs, and at the rates DropBlock
uses (gamma ~ 0.003 for keep_prob 0.9 and block 7) almost all of them are zero. So
instead of one random number per position, each row of the seed grid draws the gaps
between consecutive seeds, which are geometric (inverse-CDF sampling), and scatters
ones at the resulting positions: a fixed number of draws per row, ``1 / 32`` of the
row. The cap is static, so a row could in principle need more seeds than it has
draws; the sparse path is taken only when ``gamma`` is small enough that this has
probability below ``2 ** -64`` per row (a Chernoff bound), and otherwise every
position draws its own 32 random bits. Both paths sample the same distribution; they
produce different bits for the same key, and which one runs is a function of the
arguments only, so a key always gives the same mask.

Rows are the leading axes of the seed grid, so a batch-sharded array draws and
scatters its seeds locally on each device.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dropblock_jax._geometry import MaskLayout

# One draw per SPARSE_FRACTION positions of a row.
SPARSE_FRACTION = 32
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
                raise TypeError(f"key must be a single PRNG key, got a key array of shape {key.shape}; use jax.vmap for a batch of keys.")
            return key
        legacy_shape = jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape
        if key.dtype == jnp.uint32 and key.shape == legacy_shape:
            return jax.random.wrap_key_data(key)
    raise TypeError(
        "key must be a PRNG key from jax.random.key (any impl) or a legacy "
        f"jax.random.PRNGKey, got {type(key).__name__} with "
        f"dtype={getattr(key, 'dtype', None)} and shape={getattr(key, 'shape', None)}."
    )


def _rows_and_length(shape: tuple[int, ...]) -> tuple[int, int]:
    """Splits ``shape`` at an axis boundary into (leading product, trailing product <= MAX_ROW)."""
    for split in range(len(shape) + 1):
        length = math.prod(shape[split:])
        if length <= MAX_ROW:
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


def _sparse_gamma_limit(length: int, draws: int) -> float:
    """Largest gamma whose overflow probability per row stays below the bound."""
    low, high = 0.0, (draws + 1) / length
    for _ in range(60):
        mid = 0.5 * (low + high)
        if _log_binomial_tail_bound(length, draws, mid) <= OVERFLOW_LOG_PROBABILITY:
            low = mid
        else:
            high = mid
    return low


def _dense_seeds(key: jax.Array, rows: int, length: int, gamma: jax.Array) -> jax.Array:
    # Drawn as a matrix and reshaped by the caller: XLA compiles threefry on a
    # high-rank shape several times slower.
    bits = jax.random.bits(key, (rows, length), jnp.uint32)
    # Compare 32-bit integers against gamma * 2**32: no float conversion per element.
    threshold = jnp.floor(gamma.astype(jnp.float32) * np.float32(2.0**32))
    threshold = jnp.minimum(threshold, np.float32(2.0**32 - 256)).astype(jnp.uint32)
    return ((bits < threshold) | (gamma >= 1.0)).astype(jnp.uint8)


def _sparse_seeds(key: jax.Array, rows: int, length: int, draws: int, gamma: jax.Array) -> jax.Array:
    bits = jax.random.bits(key, (rows, draws), jnp.uint32)
    # Midpoints of a 2**-24 grid: uniform on the open interval (0, 1), exactly representable.
    uniform = ((bits >> 8).astype(jnp.float32) + 0.5) * np.float32(2.0**-24)
    log_survive = jnp.log1p(-gamma.astype(jnp.float32))
    # Gap - 1 ~ Geometric(gamma) on {0, 1, ...}: P(gap - 1 >= m) = (1 - gamma) ** m.
    gaps = jnp.floor(jnp.log(uniform) / jnp.minimum(log_survive, -np.float32(1e-30))) + 1.0
    # A gap past `length` already leaves the row; clipping keeps the int32 cumsum exact.
    gaps = jnp.minimum(gaps, np.float32(length + 1)).astype(jnp.int32)
    positions = jnp.cumsum(gaps, axis=1) - 1

    def scatter_row(row_positions):
        return jnp.zeros((length,), jnp.uint8).at[row_positions].set(1, mode="drop")

    return jax.vmap(scatter_row)(positions)


def bernoulli_seeds(key: jax.Array, shape: tuple[int, ...], gamma: jax.Array) -> jax.Array:
    """Independent Bernoulli(``gamma``) seeds of ``shape``, as uint8 zeros and ones."""
    rows, length = _rows_and_length(shape)
    draws = -(-length // SPARSE_FRACTION)
    if length < MIN_SPARSE_ROW:
        return _dense_seeds(key, rows, length, gamma).reshape(shape)
    limit = _sparse_gamma_limit(length, draws)
    sparse_key, dense_key = jax.random.split(key)
    seeds = lax.cond(
        gamma <= limit,
        lambda: _sparse_seeds(sparse_key, rows, length, draws, gamma),
        lambda: _dense_seeds(dense_key, rows, length, gamma),
    )
    return seeds.reshape(shape)


def kept_mask(key: jax.Array, layout: MaskLayout, gamma: jax.Array) -> jax.Array:
    """Boolean mask of ``layout.mask_shape`` (True = kept) for seed rate ``gamma``."""
    geometry = layout.geometry
    seeds = bernoulli_seeds(key, layout.seed_shape, lax.stop_gradient(gamma))
    ndim = len(layout.shape)
    # One 1-D max-pool per spatial axis: separable, and on uint8 it is cheap.
    for axis, size, padding in zip(layout.spatial_axes, geometry.windows, geometry.padding):
        window = [1] * ndim
        window[axis] = size
        pads = [(0, 0)] * ndim
        pads[axis] = padding
        seeds = lax.reduce_window(seeds, np.uint8(0), lax.max, window, (1,) * ndim, pads)
    return seeds == 0
