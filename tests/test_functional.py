"""drop_block and block_mask: values, normalization, keys, jit, vmap, gradients."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dropblock_jax as db
import helpers
from dropblock_jax import _mask

MODES = list(itertools.product(["valid", "everywhere"], ["paper", "calibrated"], ["batch", "expected", "none"]))
SHAPE = (4, 14, 14, 6)


def _x(shape=SHAPE, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(42), shape, dtype)


@pytest.mark.parametrize("seed_region,gamma,normalize", MODES)
def test_keep_prob_one_is_identity_and_zero_drops_everything(seed_region, gamma, normalize):
    x = _x()
    kwargs = dict(seed_region=seed_region, gamma=gamma, normalize=normalize)
    key = jax.random.key(0)
    np.testing.assert_array_equal(
        np.asarray(db.drop_block(key, x, 1.0, 5, **kwargs)).view(np.uint32), np.asarray(x).view(np.uint32)
    )
    # A traced keep_prob of 1 takes the general path and is still bit for bit the input.
    traced = jax.jit(lambda p: db.drop_block(key, x, p, 5, **kwargs))(1.0)
    np.testing.assert_array_equal(np.asarray(traced).view(np.uint32), np.asarray(x).view(np.uint32))

    def loss(x, p):
        return jnp.sum(db.drop_block(key, x, p, 5, **kwargs) ** 2)

    for p in [0.0, jnp.float32(0.0)]:
        assert not np.asarray(db.drop_block(key, x, p, 5, **kwargs)).any()
        grad = jax.jit(jax.grad(loss))(x, p)
        assert np.isfinite(grad).all() and not grad.any()


# Maps where the calibrated solve at keep_prob 1 works at its round-off and, unguarded, lands below 0.
ROUNDING_MAPS = [((7, 7), 3), ((7, 7), 5), ((14, 14), 2), ((28, 28), 3), ((6, 7, 8), (2, 3, 3))]


@pytest.mark.parametrize("seed_region", ["valid", "everywhere"])
@pytest.mark.parametrize("sizes,block", ROUNDING_MAPS)
def test_traced_keep_prob_one_returns_x_bit_for_bit_on_maps_where_the_solve_rounds(sizes, block, seed_region):
    x = _x((2, *sizes, 3)).at[0, 0, 0].set(-0.0).at[1, -1, -1].set(jnp.nan)
    expected = np.asarray(x).view(np.uint32)

    @jax.jit
    def every_mode(keep_prob):
        return [
            db.drop_block(
                jax.random.key(0), x, keep_prob, block, seed_region=seed_region, gamma=gamma, normalize=normalize
            )
            for gamma, normalize in itertools.product(["paper", "calibrated"], ["batch", "expected", "none"])
        ]

    for y in every_mode(1.0):
        np.testing.assert_array_equal(np.asarray(y).view(np.uint32), expected)


def test_drop_block_is_x_times_block_mask_times_scale():
    x = _x()
    key = jax.random.key(1)
    for kwargs in [{}, dict(broadcast_dims=(-1,)), dict(seed_region="everywhere", gamma="calibrated")]:
        y = db.drop_block(key, x, 0.8, 3, **kwargs)
        mask = db.block_mask(key, x.shape, 0.8, 3, **kwargs)
        scale = mask.size / jnp.sum(mask)
        np.testing.assert_allclose(y, x * mask * scale, rtol=1e-6)
        assert ((y == 0) == ~mask).all()


def test_normalize_batch_preserves_the_sum_exactly():
    ones = jnp.ones((8, 20, 20, 16))
    for seed in range(3):
        y = db.drop_block(jax.random.key(seed), ones, 0.85, 5)
        assert float((y == 0).mean()) > 0.05
        np.testing.assert_allclose(np.sum(np.asarray(y, np.float64)), ones.size, rtol=1e-6)


def test_normalize_expected_with_calibrated_gamma_scales_by_one_over_keep_prob():
    ones = jnp.ones((4, 16, 16, 8))
    for keep in [0.9, 0.75]:
        y = np.asarray(db.drop_block(jax.random.key(0), ones, keep, 5, gamma="calibrated", normalize="expected"))
        kept = y[y != 0]
        np.testing.assert_allclose(kept, 1.0 / keep, rtol=1e-6)


@pytest.mark.parametrize("seed_region", ["valid", "everywhere"])
@pytest.mark.parametrize("sizes,block,keep", [((16, 16), 5, 0.9), ((14, 14), 7, 0.75), ((9, 13), (3, 5), 0.8)])
def test_normalize_expected_with_the_paper_gamma_scales_by_one_over_the_expected_keep_fraction(
    sizes, block, keep, seed_region
):
    # The paper's gamma keeps more than keep_prob (blocks overlap), so 1 / keep_prob would be wrong.
    gamma = helpers.paper_gamma(keep, sizes, block, seed_region)
    expected_scale = 1.0 / helpers.expected_keep_fraction(gamma, sizes, block, seed_region)
    assert abs(expected_scale * keep - 1.0) > 1e-3
    ones = jnp.ones((4, *sizes, 8))
    y = np.asarray(db.drop_block(jax.random.key(0), ones, keep, block, seed_region=seed_region, normalize="expected"))
    kept = y[y != 0]
    assert 0 < kept.size < y.size
    np.testing.assert_allclose(kept, expected_scale, rtol=4 * 2.0**-24)


def test_normalize_none_leaves_kept_values_alone():
    x = _x()
    y = np.asarray(db.drop_block(jax.random.key(0), x, 0.7, 3, normalize="none"))
    kept = y != 0
    assert 0.3 < kept.mean() < 0.95
    np.testing.assert_array_equal(y[kept], np.asarray(x)[kept])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_inputs_of_millions_of_elements_keep_a_correct_scale(dtype):
    # 4.2M units: far past float16's largest finite value of 65504.
    ones = jnp.ones((16, 64, 64, 64), dtype)
    y = db.drop_block(jax.random.key(0), ones, 0.9, 7)
    assert y.dtype == dtype
    kept = np.asarray(y.astype(jnp.float32))
    kept_fraction = (kept != 0).mean()
    assert 0.85 < kept_fraction < 0.95
    expected_scale = 1.0 / kept_fraction
    np.testing.assert_allclose(kept[kept != 0], expected_scale, rtol=float(jnp.finfo(dtype).eps))


def test_float64_under_x64():
    with jax.enable_x64(True):
        x = jnp.ones((2, 12, 12, 3), jnp.float64)
        y = db.drop_block(jax.random.key(0), x, 0.8, 3)
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(float(y.sum()), x.size, rtol=1e-12)


def test_dropped_units_are_zero_even_for_inf_and_nan_inputs():
    x = jnp.full((2, 10, 10, 4), jnp.inf).at[0, 0, 0, 0].set(jnp.nan)
    y = np.asarray(db.drop_block(jax.random.key(0), x, 0.5, 3))
    mask = np.asarray(db.block_mask(jax.random.key(0), x.shape, 0.5, 3))
    assert (y[~mask] == 0).all()


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_same_key_same_result_with_and_without_jit(impl):
    x = _x((4, 28, 28, 64))  # maps of a real network's size
    key = jax.random.key(3, impl=impl)
    eager = db.drop_block(key, x, 0.9, 7)
    np.testing.assert_array_equal(eager, db.drop_block(key, x, 0.9, 7))
    np.testing.assert_array_equal(eager, jax.jit(db.drop_block, static_argnums=3)(key, x, 0.9, 7))
    np.testing.assert_array_equal(eager, jax.jit(lambda k, x: db.drop_block(k, x, 0.9, 7))(key, x))
    assert not np.array_equal(eager, db.drop_block(jax.random.key(4, impl=impl), x, 0.9, 7))


def test_legacy_key_gives_the_same_result_as_the_typed_threefry_key():
    x = _x()
    legacy = db.drop_block(jax.random.PRNGKey(5), x, 0.8, 3)
    typed = db.drop_block(jax.random.wrap_key_data(jax.random.PRNGKey(5)), x, 0.8, 3)
    np.testing.assert_array_equal(legacy, typed)


def test_traced_keep_prob_compiles_once():
    traces = []

    @jax.jit
    def step(key, x, keep_prob):
        traces.append(None)
        return db.drop_block(key, x, keep_prob, 5)

    x = jnp.ones((2, 16, 16, 4))
    dropped = []
    for keep in np.linspace(1.0, 0.8, 6):
        dropped.append(float((step(jax.random.key(0), x, keep) == 0).mean()))
    assert len(traces) == 1
    assert dropped[0] == 0.0 and dropped[-1] > 0.0


def test_traced_keep_prob_out_of_range_is_clipped():
    x = jnp.ones((2, 16, 16, 4))
    key = jax.random.key(0)
    f = jax.jit(lambda p: db.drop_block(key, x, p, 5))
    np.testing.assert_array_equal(f(1.5), x)
    assert not f(-0.5).any()


def test_vmap_over_keep_prob_matches_separate_calls():
    x = _x((2, 32, 32, 64))
    key = jax.random.key(0)
    keeps = jnp.array([1.0, 0.95, 0.9, 0.5])
    batched = jax.vmap(lambda p: db.drop_block(key, x, p, 5))(keeps)
    for i, keep in enumerate(keeps):
        np.testing.assert_array_equal(batched[i], db.drop_block(key, x, keep, 5))


def test_gradient_is_mask_times_scale():
    x = _x()
    key = jax.random.key(2)
    mask = np.asarray(db.block_mask(key, x.shape, 0.8, 3))
    gamma = helpers.paper_gamma(0.8, SHAPE[1:3], 3)
    scales = {
        "batch": mask.size / mask.sum(),
        "expected": 1.0 / helpers.expected_keep_fraction(gamma, SHAPE[1:3], 3),
        "none": 1.0,
    }
    weights = np.asarray(_x(dtype=jnp.float32) ** 2)  # a loss that weighs every unit differently
    for normalize, scale in scales.items():

        def loss(x, normalize=normalize):
            return jnp.sum(weights * db.drop_block(key, x, 0.8, 3, normalize=normalize))

        grad = jax.jit(jax.grad(loss))(x)
        np.testing.assert_allclose(grad, weights * mask * scale, rtol=4 * 2.0**-24, atol=0)


def test_vmap_with_axis_name_normalizes_over_the_mapped_axis():
    ones = jnp.ones((4, 12, 12, 3))
    keys = jax.random.split(jax.random.key(0), 4)
    y = jax.vmap(lambda k, xi: db.drop_block(k, xi, 0.7, (3, 3), axis_name="batch"), axis_name="batch")(keys, ones)
    masks = np.stack([np.asarray(db.block_mask(k, ones.shape[1:], 0.7, (3, 3))) for k in keys])
    global_scale = masks.size / masks.sum()
    per_sample_scales = masks[0].size / masks.sum(axis=(1, 2, 3))
    # Each sample's own count would give another scale, by far more than round-off.
    assert np.abs(per_sample_scales / global_scale - 1).max() > 1e-2
    np.testing.assert_allclose(np.asarray(y), masks * global_scale, rtol=2.0**-24, atol=0)


@pytest.mark.parametrize("shape", [(0, 8, 8, 4), (2, 8, 8, 0), (2, 0, 8, 4), (0, 0, 0, 0)])
@pytest.mark.parametrize("broadcast_dims", [(), (-1,), (0,)])
def test_zero_size_arrays_work_in_both_functions(shape, broadcast_dims):
    key = jax.random.key(0)
    x = jnp.ones(shape)
    assert db.drop_block(key, x, 0.9, 3, broadcast_dims=broadcast_dims) is x
    mask = db.block_mask(key, shape, 0.9, 3, broadcast_dims=broadcast_dims)
    assert mask.shape == shape and mask.dtype == jnp.bool_
    assert jax.jit(lambda x: db.drop_block(key, x, 0.9, 3, broadcast_dims=broadcast_dims))(x).shape == shape


def test_zero_size_arrays_still_check_their_arguments_in_both_functions():
    key = jax.random.key(0)
    for call in (
        lambda **kw: db.drop_block(key, jnp.ones((0, 8, 8, 4)), 0.9, 3, **kw),
        lambda **kw: db.block_mask(key, (0, 8, 8, 4), 0.9, 3, **kw),
    ):
        with pytest.raises(ValueError, match="spatial_axes entry 7 is out of range"):
            call(spatial_axes=(1, 7))
        with pytest.raises(ValueError, match="broadcast_dims must not contain a spatial axis"):
            call(broadcast_dims=(1,))
        with pytest.raises(ValueError, match="keep_prob must be in"):
            db.block_mask(key, (0, 8, 8, 4), 2.0, 3)
        with pytest.raises(ValueError, match="keep_prob must be in"):
            db.drop_block(key, jnp.ones((0, 8, 8, 4)), 2.0, 3)


def test_numpy_integers_are_sizes_in_shape_as_in_block_size():
    key = jax.random.key(3)
    shape = (np.int64(2), np.int32(8), 8, np.uint8(4))
    mask = db.block_mask(key, shape, 0.7, np.int64(3))
    assert mask.shape == (2, 8, 8, 4)
    np.testing.assert_array_equal(mask, db.block_mask(key, (2, 8, 8, 4), 0.7, 3))


@pytest.mark.parametrize("gamma", ["paper", "calibrated"])
def test_a_traced_nan_keep_prob_makes_the_output_nan_not_silently_unchanged(gamma):
    x = _x()
    key = jax.random.key(0)

    @jax.jit
    def every_mode(keep_prob):
        outputs = [
            db.drop_block(key, x, keep_prob, 3, seed_region=seed_region, gamma=gamma, normalize=normalize)
            for seed_region, normalize in itertools.product(["valid", "everywhere"], ["batch", "expected", "none"])
        ]
        # A NaN rate fires no seed: the mask keeps every unit.
        masks = [
            db.block_mask(key, SHAPE, keep_prob, 3, seed_region=region, gamma=gamma)
            for region in ["valid", "everywhere"]
        ]
        return outputs, masks

    outputs, masks = every_mode(jnp.nan)
    assert all(np.isnan(y).all() for y in outputs)
    assert all(np.asarray(m).all() for m in masks)
    with pytest.raises(ValueError, match=r"keep_prob must be in \[0, 1\], got nan"):
        db.drop_block(key, x, float("nan"), 3, gamma=gamma)


def test_a_nan_seed_rate_fires_no_seed():
    # Not left to how the platform converts a NaN threshold to an integer.
    assert int(jax.jit(_mask.seed_threshold)(jnp.float32(jnp.nan))) == 0
    words = jax.jit(lambda g: _mask.bernoulli_seed_words(jax.random.key(0), (4, 64), g))(jnp.float32(jnp.nan))
    assert not np.asarray(words).any()


def test_checkify_reports_a_nan_keep_prob():
    from jax.experimental import checkify

    step = checkify.checkify(jax.jit(lambda p: db.drop_block(jax.random.key(0), _x(), p, 3)))
    error, _ = step(jnp.float32(jnp.nan))
    assert "keep_prob=NaN" in error.get()
    error, y = step(jnp.float32(0.9))
    assert error.get() is None and jnp.isfinite(y).all()


def test_axis_name_is_ignored_by_the_modes_that_need_no_counts():
    ones = jnp.ones((4, 12, 12, 3))
    keys = jax.random.split(jax.random.key(0), 4)
    for normalize in ["expected", "none"]:
        with_name = jax.vmap(
            lambda k, xi, normalize=normalize: db.drop_block(
                k, xi, 0.7, (3, 3), normalize=normalize, axis_name="batch"
            ),
            axis_name="batch",
        )(keys, ones)
        without = jax.vmap(lambda k, xi, normalize=normalize: db.drop_block(k, xi, 0.7, (3, 3), normalize=normalize))(
            keys, ones
        )
        np.testing.assert_array_equal(with_name, without)
