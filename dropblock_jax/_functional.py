"""The public functions ``drop_block`` and ``block_mask``."""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import checkify
from jax.typing import ArrayLike, DTypeLike

from dropblock_jax._checks import (
    GAMMA_MODES,
    NORMALIZE_MODES,
    check_axis_name,
    check_axis_name_is_bound,
    check_choice,
    check_floating,
    check_key,
    check_shape,
    checked_probability,
    concrete_value,
    rejects_rate_keywords,
)
from dropblock_jax._geometry import MaskLayout, mask_layout
from dropblock_jax._mask import PackedMask, count_from_parts, count_parts, packed_block_mask
from dropblock_jax._rates import gamma_for, keep_fraction


def _layout(
    shape: tuple[int, ...],
    block_size: int | Sequence[int],
    spatial_axes: int | Sequence[int] | None,
    broadcast_dims: int | Sequence[int],
    seed_region: str,
    gamma: str,
) -> MaskLayout | None:
    """The checked layout of an array of ``shape``; None for an empty array, which has nothing to drop.

    An empty array's arguments are checked as for the array with its zero-size axes at
    size 1, so an argument that is wrong for the shape fails whatever the batch size.
    """
    check_choice("gamma", gamma, GAMMA_MODES)
    if math.prod(shape) == 0:
        mask_layout(tuple(max(n, 1) for n in shape), block_size, spatial_axes, broadcast_dims, seed_region)
        return None
    return mask_layout(shape, block_size, spatial_axes, broadcast_dims, seed_region)


def _mask_and_gamma(key: jax.Array, keep: jax.Array, layout: MaskLayout, gamma: str) -> tuple[PackedMask, jax.Array]:
    seed_gamma = gamma_for(keep, layout.geometry, gamma)
    return packed_block_mask(key, layout, seed_gamma), seed_gamma


@functools.partial(jax.jit, static_argnames=("layout", "gamma"))
def _block_mask(key: jax.Array, keep: jax.Array, layout: MaskLayout, gamma: str) -> jax.Array:
    mask, _ = _mask_and_gamma(key, keep, layout, gamma)
    return jnp.broadcast_to(mask.kept(), layout.shape)


def _batch_scale(mask: PackedMask, axis_name: Hashable | None, dtype: DTypeLike) -> jax.Array:
    """``count / count_kept`` of the mask, over ``axis_name`` too; 0 when nothing is kept.

    Both counts are exact integers (the mask's broadcast axes cancel out of the
    ratio). The ratio is formed in ``dtype``, float32 or wider, never float16: each
    count is rounded once to ``dtype`` and then divided, so the scale's relative error
    is at most three units in the last place (``3 * 2**-24`` in float32), and one
    (the division's rounding) while the counts are below ``2**24``. Summed over
    ``axis_name``, the int32 parts stay exact below ``2**46`` entries in all and ``2**15``
    devices.
    """
    kept_high, kept_low = mask.count_kept()
    total_high, total_low = count_parts(mask.num_entries)
    if axis_name is not None:
        kept_high, kept_low, total_high, total_low = jax.lax.psum(
            (kept_high, kept_low, total_high, total_low), axis_name
        )
    kept = count_from_parts(kept_high, kept_low, dtype)
    total = count_from_parts(total_high, total_low, dtype)
    return jnp.where(kept > 0, total / jnp.maximum(kept, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("layout", "gamma", "normalize", "axis_name"))
def _drop_block(
    key: jax.Array,
    x: jax.Array,
    keep: jax.Array,
    layout: MaskLayout,
    gamma: str,
    normalize: str,
    axis_name: Hashable | None,
) -> jax.Array:
    # A NaN keep_prob (only a traced one gets here) has a NaN seed rate, which fires no
    # seed, and a NaN scale: the whole output is NaN, so that a broken schedule shows in
    # the loss instead of silently dropping nothing.
    checkify.debug_check(~jnp.isnan(keep), "drop_block got keep_prob=NaN; the output is all NaN.")
    mask, seed_gamma = _mask_and_gamma(key, keep, layout, gamma)
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    if normalize == "batch":
        scale = _batch_scale(mask, axis_name, compute_dtype)
    elif normalize == "expected":
        expected = keep_fraction(seed_gamma, layout.geometry).astype(compute_dtype)
        scale = jnp.where(expected > 0, 1.0 / jnp.where(expected > 0, expected, 1.0), 0.0)
    else:
        scale = jnp.ones((), compute_dtype)
    scale = jnp.where(jnp.isnan(keep), jnp.nan, scale)
    kept = mask.kept(x.shape)
    zero = jnp.zeros((), compute_dtype)
    # Selects, not a product with the mask: dropped units are exactly zero even where x
    # (or the scale) is inf or NaN, and kept units are x * scale, rounded once to x's dtype.
    # The product comes last so that its transpose, the backward pass, scales the incoming
    # gradient before it selects: with the select first, XLA's CPU fusion recomputes the
    # gradient of a residual stream whose shortcuts are dropped inside each of its three
    # consumers in every block (docs/performance.md gives what that costs a ResNet-50 step).
    return (jnp.where(kept, x.astype(compute_dtype), zero) * jnp.where(kept, scale, zero)).astype(x.dtype)


@rejects_rate_keywords("drop_block(key, x, keep_prob=0.9)")
def drop_block(
    key: ArrayLike,
    x: ArrayLike,
    keep_prob: ArrayLike,
    block_size: int | Sequence[int] = 7,
    *,
    spatial_axes: Sequence[int] | None = None,
    broadcast_dims: Sequence[int] = (),
    seed_region: str = "valid",
    gamma: str = "paper",
    normalize: str = "batch",
    axis_name: Hashable | None = None,
) -> jax.Array:
    """DropBlock: zeroes random contiguous blocks of a feature map and rescales the rest.

    Seeds are drawn Bernoulli(``gamma``) on the seed region (see :func:`seed_rate`),
    every seed drops the ``block_size`` block around it, and the kept units are
    rescaled (paper Algorithm 1). Every sample and channel has its own mask unless
    ``broadcast_dims`` shares one.

    Args:
      key: a PRNG key (``jax.random.key`` of any impl, or legacy ``jax.random.PRNGKey``).
      x: float16, bfloat16, float32 or float64 array; channels-last by default
        (``(N, H, W, C)``, ``(N, T, C)``, ...). 8-, 6- and 4-bit floats are refused:
        cast them to bfloat16 or float16 first.
        An array with a zero-size axis is returned as it is (its arguments are
        still checked).
      keep_prob: probability of keeping a unit, in [0, 1] (the fraction KEPT, not a
        drop rate: ``drop_block(key, x, 0.1)`` keeps 10%; a rate ``r`` of another library
        is ``keep_prob = 1 - r``, and ``rate=``, ``drop_prob=``, ``p=``, ``drop_rate=``
        are a TypeError that says so); may be traced (a traced value is clipped to
        [0, 1]). 1 returns ``x`` unchanged; 0 drops everything.
        A concrete NaN is a ``ValueError``; a traced NaN has a NaN seed rate (see
        :func:`seed_rate`): no seed is drawn and the scale is NaN, so the whole output
        is NaN, in every mode, and a broken schedule shows in the loss. Under
        ``jax.experimental.checkify.checkify`` it is reported as an error.
      block_size: a static int or tuple of ints, one per spatial axis; clipped to the
        map (a block as large as the map drops whole maps, as SpatialDropout). An int
        is the same size along every spatial axis: with the default ``spatial_axes``
        it needs a rank-4 ``(N, H, W, C)`` input (a square over H and W); on any other
        rank it is a ValueError that names the tuple to pass (``(k,)`` for ``(N, T,
        C)``, ``(k, k, k)`` for ``(N, D, H, W, C)``), so that no block spans samples.
      spatial_axes: axes the blocks extend over. Default: the ``len(block_size)``
        axes just before the last axis (channels-last, with any number of leading
        axes, also none: an unbatched ``(H, W, C)`` under ``vmap`` takes a tuple);
        ``(1, 2)`` for an int. Channels-first ``(N, C, H, W)`` input needs
        ``spatial_axes=(2, 3)``: the default reads it as ``(N, H, W, C)`` and drops
        blocks over C and H.
      broadcast_dims: axes that share one mask, as in ``flax.linen.Dropout``; e.g.
        ``(-1,)`` shares a mask across channels, ``(0,)`` across the batch.
      seed_region: ``"valid"`` (seeds only where the whole block fits, the paper) or
        ``"everywhere"`` (blocks cut at the border).
      gamma: ``"paper"`` (Eq. 1 of the paper) or ``"calibrated"`` (expected kept
        fraction exactly ``keep_prob``).
      normalize: ``"batch"`` scales by ``count / count_kept`` over the whole array
        (and over ``axis_name``); ``"expected"`` by ``1 / expected_keep_fraction``;
        ``"none"`` does not scale.
      axis_name: a mapped axis name (``vmap``, ``pmap``, ``shard_map``) over which
        ``"batch"`` normalization sums its counts; the other modes need no
        communication and ignore it.

    Returns:
      An array of ``x``'s shape and dtype.

    Raises:
      TypeError: for a key that is not a PRNG key, an ``x`` of another dtype than
        float16, bfloat16, float32 or float64, a traced ``block_size``, a drop-rate
        keyword, or arguments of the wrong type.
      ValueError: for out-of-range or inconsistent arguments, and an int
        ``block_size`` on an input of another rank than 4 without ``spatial_axes``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dropblock_jax import drop_block
      >>> x = jnp.ones((2, 16, 16, 8))
      >>> y = drop_block(jax.random.key(0), x, keep_prob=0.9, block_size=5)
      >>> y.shape, y.dtype
      ((2, 16, 16, 8), dtype('float32'))
      >>> kept = y != 0
      >>> bool(jnp.allclose(y[kept], x.size / kept.sum()))  # "batch" normalization: count / kept count
      True
      >>> drop_block(jax.random.key(0), jnp.ones((2, 40, 8)), 0.9, block_size=(5,)).shape  # (N, T, C)
      (2, 40, 8)

    References:
      Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional networks",
      NeurIPS 2018 (arXiv 1810.12890), Algorithm 1.
    """
    key = check_key(key)
    x = check_floating(x)
    keep = checked_probability("keep_prob", keep_prob)
    layout = _layout(x.shape, block_size, spatial_axes, broadcast_dims, seed_region, gamma)
    check_choice("normalize", normalize, NORMALIZE_MODES)
    check_axis_name(axis_name)
    if normalize == "batch":
        check_axis_name_is_bound(axis_name)
    if layout is None or concrete_value(keep_prob) == 1.0:
        return x
    return _drop_block(key, x, keep, layout, gamma, normalize, axis_name)


@rejects_rate_keywords("block_mask(key, shape, keep_prob=0.9)")
def block_mask(
    key: ArrayLike,
    shape: Sequence[int],
    keep_prob: ArrayLike,
    block_size: int | Sequence[int] = 7,
    *,
    spatial_axes: Sequence[int] | None = None,
    broadcast_dims: Sequence[int] = (),
    seed_region: str = "valid",
    gamma: str = "paper",
) -> jax.Array:
    """The boolean DropBlock mask (``True`` = kept) that :func:`drop_block` applies.

    For the same key and arguments,
    ``drop_block(key, x, ...) == x * block_mask(key, x.shape, ...) * scale``.

    Args:
      key: a PRNG key (``jax.random.key`` of any impl, or legacy ``jax.random.PRNGKey``).
      shape: shape of the feature map the mask is for (Python or NumPy ints); a
        zero-size axis gives an empty mask.
      keep_prob: probability of keeping a unit, in [0, 1]; may be traced (a traced
        value is clipped to [0, 1]). A traced NaN has a NaN seed rate (see
        :func:`seed_rate`), which fires no seed: every unit is kept, and
        :func:`drop_block`, whose scale is then NaN, returns NaN everywhere.
      block_size, spatial_axes, broadcast_dims, seed_region, gamma: as in
        :func:`drop_block`.

    Returns:
      A bool array of ``shape``; axes in ``broadcast_dims`` repeat one mask.

    Examples:
      >>> import jax
      >>> from dropblock_jax import block_mask
      >>> m = block_mask(jax.random.key(1), (1, 8, 8, 1), 0.5, block_size=3)
      >>> m.shape, m.dtype
      ((1, 8, 8, 1), dtype('bool'))
    """
    key = check_key(key)
    keep = checked_probability("keep_prob", keep_prob)
    shape = check_shape(shape)
    layout = _layout(shape, block_size, spatial_axes, broadcast_dims, seed_region, gamma)
    if layout is None:
        return jnp.ones(shape, bool)
    return _block_mask(key, keep, layout, gamma)
