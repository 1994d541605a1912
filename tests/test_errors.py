"""Bad input raises ValueError/TypeError naming the argument, the value and what is allowed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dropblock_jax as db

X = jnp.ones((2, 10, 10, 3))
KEY = jax.random.key(0)


@pytest.mark.parametrize(
    "key",
    [0, np.array([1, 2], np.int32), jnp.zeros((3,), jnp.uint32), jnp.zeros((2,), jnp.float32), "key"],
)
def test_bad_key(key):
    with pytest.raises(TypeError, match=r"key must be a PRNG key .*got"):
        db.drop_block(key, X, 0.9, 3)


def test_key_array_instead_of_a_key():
    with pytest.raises(TypeError, match=r"key must be a single PRNG key.*shape \(2,\).*vmap"):
        db.drop_block(jax.random.split(KEY), X, 0.9, 3)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_non_floating_x(dtype):
    with pytest.raises(TypeError, match=rf"x must be a floating array .*got dtype {jnp.dtype(dtype).name}"):
        db.drop_block(KEY, jnp.ones((2, 10, 10, 3), dtype), 0.9, 3)


# Every float narrower than 16 bits this JAX names: storage formats that DropBlock refuses by name.
NARROW_FLOATS = [
    jnp.dtype(getattr(jnp, name))
    for name in dir(jnp)
    if name.startswith(("float8_", "float6_", "float4_")) and jnp.issubdtype(getattr(jnp, name), jnp.floating)
]


def _jax_holds(dtype):
    try:
        jnp.zeros(1, dtype)
    except jax.errors.JaxRuntimeError:  # XLA has no arrays of some (float6)
        return False
    return True


NARROW_JAX_FLOATS = [dtype for dtype in NARROW_FLOATS if _jax_holds(dtype)]


def _narrow_float_message(dtype):
    return (
        rf"x must be a floating array \(float16, bfloat16, float32, float64\), got dtype {dtype.name}; "
        r"cast 8-, 6- and 4-bit floats to bfloat16 or float16"
    )


@pytest.mark.parametrize("dtype", NARROW_FLOATS, ids=lambda dtype: dtype.name)
def test_numpy_floats_narrower_than_16_bits_are_refused_by_name(dtype):
    x = np.ones((2, 10, 10, 3), dtype)
    for keep_prob in [0.9, 1.0]:  # keep_prob 1 would return x untouched
        with pytest.raises(TypeError, match=_narrow_float_message(dtype)):
            db.drop_block(KEY, x, keep_prob, 3)


@pytest.mark.parametrize("dtype", NARROW_JAX_FLOATS, ids=lambda dtype: dtype.name)
def test_jax_floats_narrower_than_16_bits_are_refused_by_name(dtype):
    x = jnp.ones((2, 10, 10, 3), dtype)
    with pytest.raises(TypeError, match=_narrow_float_message(dtype)):
        db.drop_block(KEY, x, 0.9, 3)
    with pytest.raises(TypeError, match=_narrow_float_message(dtype)):
        jax.jit(lambda x, p: db.drop_block(KEY, x, p, 3))(x, 0.9)


def test_the_narrow_floats_include_the_float8_formats():
    names = {dtype.name for dtype in NARROW_JAX_FLOATS}
    assert {"float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu"} <= names, names


@pytest.mark.parametrize("keep_prob", [1.5, -0.1, float("nan"), jnp.float32(2.0)])
def test_keep_prob_out_of_range(keep_prob):
    with pytest.raises(ValueError, match=r"keep_prob must be in \[0, 1\], got"):
        db.drop_block(KEY, X, keep_prob, 3)
    with pytest.raises(ValueError, match=r"keep_prob must be in \[0, 1\]"):
        db.block_mask(KEY, X.shape, keep_prob, 3)
    with pytest.raises(ValueError, match=r"keep_prob must be in \[0, 1\]"):
        db.seed_rate(keep_prob, (10, 10), 3)


def test_keep_prob_not_a_scalar():
    with pytest.raises(ValueError, match=r"keep_prob must be a scalar, got an array of shape \(2,\)"):
        db.drop_block(KEY, X, jnp.array([0.9, 0.8]), 3)
    with pytest.raises(ValueError, match=r"keep_prob must be a scalar"):
        jax.jit(lambda p: db.drop_block(KEY, X, p, 3))(jnp.array([0.9, 0.8]))


@pytest.mark.parametrize("keep_prob", ["0.9", True, None, [0.9]])
def test_keep_prob_of_the_wrong_type(keep_prob):
    with pytest.raises(TypeError, match=r"keep_prob must be a real number"):
        db.drop_block(KEY, X, keep_prob, 3)


@pytest.mark.parametrize(
    "block_size,error,message",
    [
        (0, ValueError, r"block_size entries must be >= 1, got 0"),
        ((3, -1), ValueError, r"block_size entries must be >= 1, got \(3, -1\)"),
        (2.5, TypeError, r"block_size must be an int or a non-empty tuple of ints, got 2.5"),
        ((), TypeError, r"block_size must be an int or a non-empty tuple of ints, got \(\)"),
        (True, TypeError, r"block_size must be an int .*got True"),
        ((3, 3, 3, 3), ValueError, r"too few dimensions for 4 spatial axes"),
    ],
)
def test_bad_block_size(block_size, error, message):
    with pytest.raises(error, match=message):
        db.drop_block(KEY, X, 0.9, block_size)


def test_block_size_length_must_match_spatial_axes():
    with pytest.raises(ValueError, match=r"block_size must have one entry per spatial axis \(2\), got \(3, 3, 3\)"):
        db.drop_block(KEY, X, 0.9, (3, 3, 3), spatial_axes=(1, 2))


@pytest.mark.parametrize(
    "spatial_axes,error,message",
    [
        ((1, 4), ValueError, r"spatial_axes entry 4 is out of range .*allowed: -4 \.\. 3"),
        ((1, -5), ValueError, r"spatial_axes entry -5 is out of range"),
        ((1, 1), ValueError, r"spatial_axes must not repeat an axis, got \(1, 1\)"),
        ((1, -3), ValueError, r"spatial_axes must not repeat an axis, got \(1, -3\)"),
        (("h", "w"), TypeError, r"spatial_axes must be a tuple of ints, got \('h', 'w'\)"),
        ((), ValueError, r"spatial_axes must name at least one axis"),
    ],
)
def test_bad_spatial_axes(spatial_axes, error, message):
    with pytest.raises(error, match=message):
        db.drop_block(KEY, X, 0.9, 3, spatial_axes=spatial_axes)


@pytest.mark.parametrize(
    "broadcast_dims,message",
    [
        ((1,), r"broadcast_dims must not contain a spatial axis: got broadcast_dims=\(1,\)"),
        (1, r"broadcast_dims must not contain a spatial axis: got broadcast_dims=\(1,\)"),
        ((-2,), r"broadcast_dims must not contain a spatial axis"),
        ((7,), r"broadcast_dims entry 7 is out of range"),
        ((0, 0), r"broadcast_dims must not repeat an axis"),
    ],
)
def test_bad_broadcast_dims(broadcast_dims, message):
    with pytest.raises(ValueError, match=message):
        db.drop_block(KEY, X, 0.9, 3, broadcast_dims=broadcast_dims)


@pytest.mark.parametrize(
    "argument,value",
    [("seed_region", "same"), ("gamma", "exact"), ("normalize", "mean"), ("seed_region", None)],
)
def test_bad_mode_strings(argument, value):
    with pytest.raises(ValueError, match=rf"{argument} must be one of \(.*\), got {value!r}"):
        db.drop_block(KEY, X, 0.9, 3, **{argument: value})


def test_too_few_dimensions_for_the_default_layout():
    with pytest.raises(ValueError, match=r"shape \(10, 10\) has too few dimensions .*spatial_axes"):
        db.drop_block(KEY, jnp.ones((10, 10)), 0.9, (3, 3))


def test_block_mask_shape_argument():
    with pytest.raises(ValueError, match=r"shape must have sizes >= 0, got \[2, -1, 4\]"):
        db.block_mask(KEY, [2, -1, 4], 0.9, 3)
    with pytest.raises(TypeError, match=r"shape must be a tuple of ints, got \(2, 8.0, 8, 4\)"):
        db.block_mask(KEY, (2, 8.0, 8, 4), 0.9, 3)


@pytest.mark.parametrize("axis_name", [3, 1.5, True, ["batch"], ("batch", 0), ()])
@pytest.mark.parametrize("normalize", ["batch", "expected"])
def test_bad_axis_name(axis_name, normalize):
    with pytest.raises(TypeError, match=r"axis_name must be None, the name of a mapped axis .* got "):
        db.drop_block(KEY, X, 0.9, 3, normalize=normalize, axis_name=axis_name)


def test_rate_functions():
    with pytest.raises(TypeError, match=r"feature_shape must be a tuple of ints \(the spatial sizes\), got 'hw'"):
        db.seed_rate(0.9, "hw", 3)
    with pytest.raises(ValueError, match=r"feature_shape must be a non-empty tuple of sizes >= 1, got \(0, 4\)"):
        db.seed_rate(0.9, (0, 4), 3)
    with pytest.raises(ValueError, match=r"block_size \(3, 3\) has 2 entries but feature_shape \(10,\) has 1"):
        db.seed_rate(0.9, (10,), (3, 3))
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\], got 1.5"):
        db.expected_keep_fraction(1.5, (10, 10), 3)
    with pytest.raises(ValueError, match=r"gamma must be one of \('paper', 'calibrated'\), got 'exact'"):
        db.seed_rate(0.9, (10, 10), 3, gamma="exact")


def test_no_nan_from_legal_extremes():
    for keep in [0.0, 1e-7, 0.5, 1.0]:
        for gamma in ["paper", "calibrated"]:
            for normalize in ["batch", "expected", "none"]:
                y = db.drop_block(KEY, X, keep, 3, gamma=gamma, normalize=normalize)
                assert np.isfinite(y).all()


@pytest.mark.parametrize("axis_name", ["batch", ("batch", "model")])
def test_unbound_axis_name(axis_name):
    with pytest.raises(ValueError, match=r"axis_name .* is not bound here") as info:
        db.drop_block(KEY, X, 0.9, 3, axis_name=axis_name)
    assert repr(axis_name) in str(info.value)
    with pytest.raises(ValueError, match="is not bound here"):  # before keep_prob 1 returns x
        db.drop_block(KEY, X, 1.0, 3, axis_name=axis_name)
    with pytest.raises(ValueError, match="is not bound here"):  # bound to another axis
        jax.vmap(lambda x: db.drop_block(KEY, x, 0.9, (3, 3), axis_name=axis_name), axis_name="other")(X)
