"""Realized keep fractions against the exact expectation, and a NumPy reference of
the authors' algorithm (paper Algorithm 1 with the valid seed region)."""

import jax
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import dropblock_jax as db
import helpers
from helpers import assert_mean_matches

CASES = [
    # (spatial sizes, block, keep_prob)
    ((14, 14), 7, 0.9),
    ((56, 56), 7, 0.9),
    ((9, 13), (3, 5), 0.7),
    ((40,), (7,), 0.8),
    ((8, 10, 12), (3, 3, 3), 0.85),
    ((10, 10), 4, 0.5),
]
DRAWS = 48


def _realized_keep_fractions(sizes, block, keep, **kwargs):
    shape = (4, *sizes, 8)
    keys = jax.random.split(jax.random.key(hash((sizes, str(block), keep)) % 2**31), DRAWS)
    fraction = jax.jit(jax.vmap(lambda k: db.block_mask(k, shape, keep, block, **kwargs).mean()))
    return np.asarray(fraction(keys))


@pytest.mark.parametrize("seed_region", ["valid", "everywhere"])
@pytest.mark.parametrize("gamma", ["paper", "calibrated"])
@pytest.mark.parametrize("sizes,block,keep", CASES)
def test_realized_keep_fraction_equals_the_expectation(sizes, block, keep, seed_region, gamma):
    # The expectation from the NumPy references: the paper's Eq. 1 or, calibrated, keep_prob itself.
    if gamma == "calibrated":
        expected = keep
    else:
        rate = helpers.paper_gamma(keep, sizes, block, seed_region)
        expected = helpers.expected_keep_fraction(rate, sizes, block, seed_region)
    realized = _realized_keep_fractions(sizes, block, keep, seed_region=seed_region, gamma=gamma)
    assert_mean_matches(realized, expected)


@pytest.mark.parametrize("seed_region", ["valid", "everywhere"])
def test_calibrated_gamma_hits_keep_prob_where_the_paper_gamma_does_not(seed_region):
    paper = float(db.seed_rate(0.9, (14, 14), 7, seed_region=seed_region))
    calibrated = float(db.seed_rate(0.9, (14, 14), 7, seed_region=seed_region, gamma="calibrated"))
    assert abs(helpers.expected_keep_fraction(paper, (14, 14), 7, seed_region) - 0.9) > 0.005
    np.testing.assert_allclose(helpers.expected_keep_fraction(calibrated, (14, 14), 7, seed_region), 0.9, atol=1e-6)
    for sizes, block in [((7, 7), 7), ((30,), 3), ((6, 7, 8), (2, 3, 4)), ((56, 56), 7)]:
        # The solver itself is exact to float64 round-off ...
        with jax.enable_x64(True):
            for keep in [0.999, 0.9, 0.5, 0.1, 1e-4]:
                rate = float(db.seed_rate(keep, sizes, block, seed_region=seed_region, gamma="calibrated"))
                fraction = helpers.expected_keep_fraction(rate, sizes, block, seed_region)
                np.testing.assert_allclose(fraction, keep, rtol=1e-10)
        # ... and in float32 to float32 round-off of gamma, for the keep_probs DropBlock uses.
        for keep in [0.999, 0.9, 0.5]:
            rate = float(db.seed_rate(keep, sizes, block, seed_region=seed_region, gamma="calibrated"))
            fraction = helpers.expected_keep_fraction(rate, sizes, block, seed_region)
            np.testing.assert_allclose(fraction, keep, rtol=1e-5)


def test_large_maps_realize_the_expected_fraction_in_one_draw():
    # One 16x56x56x256 draw averages 12.8M units; its spread is tiny, so this checks
    # the mask at the scale it is used.
    keys = jax.random.split(jax.random.key(11), 8)
    shape = (16, 56, 56, 256)
    fractions = [float(db.block_mask(k, shape, 0.9, 7, gamma="calibrated").mean()) for k in keys]
    assert_mean_matches(fractions, 0.9)


def _authors_algorithm(rng, x, keep_prob, block_size):
    """Paper Algorithm 1 as the authors' TensorFlow code computes it, in NumPy.

    Seeds are Bernoulli(gamma) on positions whose centred block lies inside the map,
    blocks are a SAME max-pool of the seeds, kept units are rescaled by
    count / count_kept. Odd block sizes only (the SAME-padding centring).
    """
    _, height, width, _ = x.shape
    gamma = (1.0 - keep_prob) * width * height / block_size**2 / ((width - block_size + 1) * (height - block_size + 1))
    half = block_size // 2
    valid = np.zeros((height, width), bool)
    valid[half : height - half, half : width - half] = True
    seeds = (rng.random(x.shape) < gamma) & valid[None, :, :, None]
    padded = np.pad(seeds, ((0, 0), (half, half), (half, half), (0, 0)))
    dropped = sliding_window_view(padded, (block_size, block_size), axis=(1, 2)).any(axis=(-2, -1))
    kept = ~dropped
    return gamma, kept, x * kept * kept.size / kept.sum()


@pytest.mark.parametrize("sizes,block,keep", [((14, 14), 7, 0.9), ((20, 12), 5, 0.75), ((9, 9), 3, 0.6)])
def test_agrees_with_a_numpy_reference_of_the_authors_algorithm(sizes, block, keep):
    rng = np.random.default_rng(0)
    x = np.ones((4, *sizes, 8))
    fractions = []
    for _ in range(DRAWS):
        gamma, kept, y = _authors_algorithm(rng, x, keep, block)
        fractions.append(kept.mean())
        np.testing.assert_allclose(y.sum(), x.size)
    np.testing.assert_allclose(db.seed_rate(keep, sizes, block), gamma, rtol=1e-6)
    expected = helpers.expected_keep_fraction(gamma, sizes, block)
    # The reference realizes our exact expectation ...
    assert_mean_matches(fractions, expected)
    # ... and so do we, with the same spread across draws.
    ours = _realized_keep_fractions(sizes, block, keep)
    assert_mean_matches(ours, expected)
    ratio = np.std(ours, ddof=1) / np.std(fractions, ddof=1)
    assert 0.6 < ratio < 1.6, ratio
