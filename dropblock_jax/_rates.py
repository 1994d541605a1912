"""Seed rates: the paper's gamma, the calibrated gamma, and the exact expected keep fraction."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from dropblock_jax._checks import GAMMA_MODES, check_choice, checked_probability
from dropblock_jax._geometry import SpatialGeometry, feature_geometry

# Newton on the log of the keep fraction converges quadratically and monotonically
# from its lower starting point; 8 steps reach float64 round-off for every geometry
# tried (block 1..7, maps 1..56, 1-D to 3-D, keep_prob 1e-6..0.999).
_CALIBRATION_STEPS = 8


def keep_fraction(gamma: jax.Array, geometry: SpatialGeometry) -> jax.Array:
    """Exact expected kept fraction: mean over positions of ``(1 - gamma) ** covering_seeds``."""
    values = np.asarray(geometry.cover_values, np.float64)
    counts = np.asarray(geometry.cover_counts, np.float64)
    # exp(c * log1p(-gamma)) is exactly 1 at gamma = 0 and exactly 0 at gamma = 1,
    # and the integer position counts sum exactly, so both ends are exact.
    survive = jnp.exp(jnp.asarray(values, gamma.dtype) * jnp.log1p(-gamma))
    return jnp.sum(jnp.asarray(counts, gamma.dtype) * survive) / jnp.asarray(counts.sum(), gamma.dtype)


def _calibrated_gamma(keep: jax.Array, geometry: SpatialGeometry) -> jax.Array:
    """The gamma whose exact expected keep fraction equals ``keep``.

    Solves ``log E(v) = log keep`` for ``v = -log(1 - gamma)`` by Newton's method.
    ``log E`` is a log-sum-exp of linear functions of ``v``, hence convex and
    decreasing, so Newton steps from a point left of the root stay left of it and
    converge monotonically. ``v0 = -log(keep) / max_cover`` is such a point, because
    ``E(v) >= exp(-max_cover * v)``.
    """
    values = jnp.asarray(geometry.cover_values, keep.dtype)
    log_counts = jnp.log(jnp.asarray(geometry.cover_counts, keep.dtype))
    log_total = jnp.log(jnp.asarray(sum(geometry.cover_counts), keep.dtype))
    safe_keep = jnp.clip(keep, jnp.finfo(keep.dtype).tiny, 1.0)
    log_keep = jnp.log(safe_keep)
    v = -log_keep / values[-1]
    for _ in range(_CALIBRATION_STEPS):
        log_terms = log_counts - values * v
        log_sum = jax.nn.logsumexp(log_terms)
        mean_cover = jnp.sum(jax.nn.softmax(log_terms) * values)
        v = v + (log_sum - log_total - log_keep) / mean_cover
    # Near keep = 1 the root v is below the round-off of log_sum - log_total, so the
    # iterate can land on either side of 0: a negative v would be a negative gamma.
    gamma = -jnp.expm1(-jnp.maximum(v, 0.0))
    return jnp.where(keep <= 0.0, 1.0, jnp.where(keep >= 1.0, 0.0, gamma))


def gamma_for(keep: jax.Array, geometry: SpatialGeometry, gamma: str) -> jax.Array:
    """The seed rate for a checked ``keep`` (see :func:`seed_rate`), in [0, 1]; NaN for a NaN ``keep``."""
    if gamma == "calibrated":
        rate = _calibrated_gamma(keep, geometry)
    else:
        paper = jnp.clip((1.0 - keep) * geometry.paper_gamma_factor, 0.0, 1.0)
        # The paper's formula leaves some units kept at keep_prob = 0; the contract is that
        # keep_prob = 0 drops everything.
        rate = jnp.where(keep <= 0.0, 1.0, paper)
    # A NaN keep_prob (only a traced one gets this far) is no rate at all: it stays NaN, so
    # that everything computed from it is NaN too (see seed_rate).
    return jnp.where(jnp.isnan(keep), jnp.nan, rate)


def seed_rate(
    keep_prob: ArrayLike,
    feature_shape: int | Sequence[int],
    block_size: int | Sequence[int] = 7,
    *,
    seed_region: str = "valid",
    gamma: str = "paper",
) -> jax.Array:
    """The Bernoulli rate ``gamma`` of block seeds that :func:`drop_block` uses.

    ``"paper"`` is Eq. 1 of the paper,
    ``gamma = (1 - keep_prob) / prod(k) * prod(s) / prod(s - k + 1)`` for the valid seed
    region and ``(1 - keep_prob) / prod(k)`` for ``"everywhere"`` (``k`` the block
    clipped to the map, ``s`` the map size), clipped to [0, 1]. It ignores block
    overlaps, so the realized keep fraction lies above ``keep_prob``.
    ``"calibrated"`` solves for the gamma whose exact expected keep fraction (see
    :func:`expected_keep_fraction`) equals ``keep_prob``. Either way the result lies in
    [0, 1], ``keep_prob = 0`` gives ``gamma = 1`` and ``keep_prob = 1`` gives
    ``gamma = 0`` exactly.

    A NaN ``keep_prob`` is not a probability: a concrete one raises a ``ValueError``, and
    a traced one (which cannot be refused at trace time) gives a NaN ``gamma``, for
    either ``gamma`` mode and on every platform. A NaN rate fires no seed, so
    :func:`block_mask` keeps every unit, and :func:`drop_block` scales by NaN, so its
    whole output is NaN and a broken schedule shows in the loss at once.

    Args:
      keep_prob: probability of keeping a unit, in [0, 1]; may be traced (a traced
        value is clipped to [0, 1]; a traced NaN gives NaN).
      feature_shape: spatial sizes of the feature map, e.g. ``(H, W)``.
      block_size: int (a cube over ``len(feature_shape)`` axes) or tuple of ints.
      seed_region: ``"valid"`` or ``"everywhere"``.
      gamma: ``"paper"`` or ``"calibrated"``.

    Returns:
      A scalar array, float32 (float64 under ``jax_enable_x64``).

    Examples:
      >>> import dropblock_jax as db
      >>> float(db.seed_rate(0.9, (14, 14), 7))  # 0.1 / 49 * 196 / 64
      0.00625...
      >>> g = db.seed_rate(0.9, (14, 14), 7, gamma="calibrated")
      >>> round(float(db.expected_keep_fraction(g, (14, 14), 7)), 6)
      0.9
      >>> import jax, jax.numpy as jnp
      >>> float(jax.jit(lambda p: db.seed_rate(p, (14, 14), 7))(jnp.nan))
      nan

    References:
      Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional networks",
      NeurIPS 2018 (arXiv 1810.12890), Section 3.
    """
    check_choice("gamma", gamma, GAMMA_MODES)
    geometry = feature_geometry(feature_shape, block_size, seed_region)
    return gamma_for(checked_probability("keep_prob", keep_prob), geometry, gamma)


def expected_keep_fraction(
    gamma: ArrayLike,
    feature_shape: int | Sequence[int],
    block_size: int | Sequence[int] = 7,
    *,
    seed_region: str = "valid",
) -> jax.Array:
    """The exact expected fraction of kept units for seed rate ``gamma``.

    A position is kept when none of the seeds whose block covers it fires, so the
    expected kept fraction is the mean over positions of
    ``(1 - gamma) ** covering_seeds``: overlaps between blocks and the border are
    counted exactly.

    Args:
      gamma: seed rate in [0, 1]; may be traced (a traced NaN, the rate of a NaN
        ``keep_prob``, gives NaN).
      feature_shape: spatial sizes of the feature map.
      block_size: int (a cube over ``len(feature_shape)`` axes) or tuple of ints.
      seed_region: ``"valid"`` or ``"everywhere"``.

    Returns:
      A scalar array, float32 (float64 under ``jax_enable_x64``).

    Examples:
      >>> import dropblock_jax as db
      >>> g = db.seed_rate(0.9, (56, 56), 7)
      >>> round(float(db.expected_keep_fraction(g, (56, 56), 7)), 4)
      0.9054
    """
    geometry = feature_geometry(feature_shape, block_size, seed_region)
    return keep_fraction(checked_probability("gamma", gamma), geometry)
