"""seed_rate and expected_keep_fraction against NumPy references, at the ends of [0, 1] and for NaN."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dropblock_jax as db
import helpers

SEED_REGIONS = ("valid", "everywhere")
GAMMAS = ("paper", "calibrated")

# Maps and blocks of every rank, square or not, blocks clipped to the map among them.
GEOMETRIES = [
    ((7, 7), 3),
    ((7, 7), 5),
    ((14, 14), 2),
    ((14, 14), 7),
    ((28, 28), 3),
    ((5, 9), (2, 4)),
    ((9, 13), (3, 5)),
    ((13, 9), (5, 3)),
    ((6, 4), (3, 9)),
    ((12,), (4,)),
    ((11,), (4,)),
    ((6, 7, 8), (2, 3, 4)),
    ((5, 8, 3), (4, 2, 3)),
]
# float32 numbers at and next to 1, where the calibrated solve works at its round-off.
NEAR_ONE = [1.0, float(np.nextafter(np.float32(1), np.float32(0))), 1 - 2e-7, 1 - 1e-6, 0.99999]


@pytest.mark.parametrize("seed_region", SEED_REGIONS)
@pytest.mark.parametrize("sizes,block", GEOMETRIES)
def test_paper_gamma_is_eq_1_axis_by_axis(sizes, block, seed_region):
    # Non-square and 3-D blocks: each axis has its own factor k and s / (s - k + 1).
    for keep in [0.95, 0.9, 0.7, 0.3, 0.0]:
        expected = helpers.paper_gamma(keep, sizes, block, seed_region)
        with jax.enable_x64(True):
            np.testing.assert_allclose(db.seed_rate(keep, sizes, block, seed_region=seed_region), expected, rtol=1e-14)
        # float32: keep_prob, the factor and the product each round once.
        expected = helpers.paper_gamma(float(np.float32(keep)), sizes, block, seed_region)
        ours = db.seed_rate(keep, sizes, block, seed_region=seed_region)
        np.testing.assert_allclose(ours, expected, rtol=3 * 2.0**-24)


def test_paper_gamma_of_named_geometries():
    # Written out by hand: 0.1 / (3 * 5) * (9 * 13) / (7 * 9), and 0.2 / (2 * 3 * 4) * 336 / (5 * 5 * 5).
    with jax.enable_x64(True):
        np.testing.assert_allclose(db.seed_rate(0.9, (9, 13), (3, 5)), (1 - 0.9) / 15 * 117 / 63, rtol=1e-14)
        np.testing.assert_allclose(db.seed_rate(0.8, (6, 7, 8), (2, 3, 4)), (1 - 0.8) / 24 * 336 / 125, rtol=1e-14)
        np.testing.assert_allclose(
            db.seed_rate(0.8, (6, 7, 8), (2, 3, 4), seed_region="everywhere"), (1 - 0.8) / 24, rtol=1e-14
        )


@pytest.mark.parametrize("seed_region", SEED_REGIONS)
@pytest.mark.parametrize("sizes,block", GEOMETRIES)
def test_calibrated_gamma_is_the_root_of_the_brute_force_keep_fraction(sizes, block, seed_region):
    with jax.enable_x64(True):
        for keep in [0.99, 0.9, 0.5, 0.1]:
            expected = helpers.calibrated_gamma(keep, sizes, block, seed_region)
            ours = db.seed_rate(keep, sizes, block, seed_region=seed_region, gamma="calibrated")
            np.testing.assert_allclose(ours, expected, rtol=1e-9)


@pytest.mark.parametrize("seed_region", SEED_REGIONS)
@pytest.mark.parametrize("sizes,block", GEOMETRIES)
def test_expected_keep_fraction_matches_the_brute_force_cover_counts(sizes, block, seed_region):
    with jax.enable_x64(True):
        for gamma in [0.0, 0.003, 0.05, 0.5, 1.0]:
            expected = helpers.expected_keep_fraction(gamma, sizes, block, seed_region)
            ours = db.expected_keep_fraction(gamma, sizes, block, seed_region=seed_region)
            np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("seed_region", SEED_REGIONS)
def test_gamma_lies_in_0_1_next_to_keep_prob_1_eagerly_and_under_jit(gamma, seed_region):
    def rate_and_fraction(keep, sizes, block):
        # The README's pattern: a schedule's rate, then its kept fraction.
        rate = db.seed_rate(keep, sizes, block, seed_region=seed_region, gamma=gamma)
        return rate, db.expected_keep_fraction(rate, sizes, block, seed_region=seed_region)

    keeps = jnp.asarray(NEAR_ONE, jnp.float32)
    for sizes, block in GEOMETRIES:
        traced = jax.jit(jax.vmap(lambda p, sizes=sizes, block=block: rate_and_fraction(p, sizes, block)))(keeps)
        # Eagerly, op by op, round-off differs from the fused program's: both are checked.
        eager = [rate_and_fraction(keep, sizes, block) for keep in NEAR_ONE[:2]]
        rates = np.concatenate([traced[0], [rate for rate, _ in eager]])
        fractions = np.concatenate([traced[1], [fraction for _, fraction in eager]])
        assert ((rates >= 0.0) & (rates <= 1.0)).all(), (sizes, block, rates)
        assert ((fractions >= np.concatenate([keeps, keeps[:2]]) - 1e-6) & (fractions <= 1.0)).all()
        assert rates[0] == 0.0 and rates[len(NEAR_ONE)] == 0.0, "keep_prob 1 must give gamma 0 exactly"


@pytest.mark.parametrize("gamma", GAMMAS)
def test_a_traced_nan_keep_prob_has_a_nan_rate(gamma):
    @jax.jit
    def rate_and_fraction(keep):
        rates = []
        for sizes, block, seed_region in [((7, 7), 3, "valid"), ((9, 13), (3, 5), "everywhere"), ((12,), 4, "valid")]:
            rate = db.seed_rate(keep, sizes, block, seed_region=seed_region, gamma=gamma)
            rates += [rate, db.expected_keep_fraction(rate, sizes, block, seed_region=seed_region)]
        return jnp.stack(rates)

    assert np.isnan(rate_and_fraction(jnp.nan)).all()
    assert not np.isnan(rate_and_fraction(0.5)).any()
    with pytest.raises(ValueError, match=r"keep_prob must be in \[0, 1\], got nan"):
        db.seed_rate(float("nan"), (7, 7), 3, gamma=gamma)


def test_rates_are_float32_or_float64_under_x64():
    for gamma, seed_region in itertools.product(GAMMAS, SEED_REGIONS):
        assert db.seed_rate(0.9, (7, 7), 3, seed_region=seed_region, gamma=gamma).dtype == jnp.float32
        with jax.enable_x64(True):
            assert db.seed_rate(0.9, (7, 7), 3, seed_region=seed_region, gamma=gamma).dtype == jnp.float64
