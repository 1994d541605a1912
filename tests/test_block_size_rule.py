"""One meaning for an int ``block_size`` everywhere, and no block across samples.

With the default ``spatial_axes``, ``drop_block``, ``block_mask`` and the Flax layers take
an int on a rank-4 ``(N, H, W, C)`` input only; Keras and Equinox, which know their
spatial axes, take it on any number of them as the same size along each. The expected
blocks come from NumPy (``helpers.is_union_of_blocks``), never from the code under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dropblock_jax as db
from dropblock_jax import equinox as db_equinox
from dropblock_jax import keras as db_keras
from dropblock_jax import nnx as db_nnx
from helpers import is_union_of_blocks

KEY = jax.random.key(3)


def _assert_int_refused(call, size, rank):
    """``call()`` raises the int rule's ValueError, naming the value, the rank, the tuples and spatial_axes."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert f"block_size={size} (an int)" in message, message
    assert f"rank {rank}" in message, message
    for tuple_ in [f"({size},)", f"({size}, {size})", f"({size}, {size}, {size})"]:
        assert tuple_ in message, message
    assert "spatial_axes" in message, message


def _dropped_per_map(y, spatial_axes):
    """The dropped units of ``y`` as one boolean map per position of its other axes (samples, channels)."""
    dropped = np.asarray(y) == 0
    others = [a for a in range(dropped.ndim) if a not in spatial_axes]
    moved = np.transpose(dropped, others + list(spatial_axes))
    return moved.reshape(-1, *moved.shape[len(others) :])


def _assert_blocks(y, spatial_axes, block):
    """Every map of ``y`` (x was all positive) drops a union of whole ``block`` blocks, and some drop one."""
    maps = _dropped_per_map(y, spatial_axes)
    assert maps.any(), "nothing dropped: the check would be vacuous"
    for dropped in maps:
        assert is_union_of_blocks(dropped, block, "valid")


# ---- drop_block and block_mask ----


@pytest.mark.parametrize("shape", [(8, 40, 1), (2, 4, 8, 8, 3), (16, 16), (2, 2, 4, 8, 8, 3)])
def test_an_int_with_the_default_axes_needs_a_rank_4_input(shape):
    x = jnp.ones(shape)
    _assert_int_refused(lambda: db.drop_block(KEY, x, 0.8, 5), 5, len(shape))
    _assert_int_refused(lambda: db.block_mask(KEY, shape, 0.8, 5), 5, len(shape))
    _assert_int_refused(lambda: db.drop_block(KEY, x, 1.0, 5), 5, len(shape))  # before keep_prob 1 returns x


def test_a_batch_of_sequences_drops_runs_within_each_sample():
    # The reported case: (N, T, C) with block 5 once dropped the same steps in 5 samples.
    x = jnp.ones((8, 40, 1))
    y = db.drop_block(KEY, x, 0.8, (5,))
    _assert_blocks(y, (1,), (5,))


def test_an_int_on_rank_4_is_the_square_over_h_and_w():
    x = jnp.ones((2, 12, 12, 3))
    np.testing.assert_array_equal(db.drop_block(KEY, x, 0.7, 3), db.drop_block(KEY, x, 0.7, (3, 3)))
    _assert_blocks(db.drop_block(KEY, x, 0.7, 3), (1, 2), (3, 3))


@pytest.mark.parametrize(
    "shape,spatial_axes",
    [((8, 40, 1), (1,)), ((2, 4, 8, 8, 3), (1, 2, 3)), ((2, 3, 12, 12), (2, 3)), ((12, 12, 3), (0, 1))],
)
def test_an_int_with_explicit_axes_is_accepted_on_any_rank(shape, spatial_axes):
    x = jnp.ones(shape)
    cube = (3,) * len(spatial_axes)
    y = db.drop_block(KEY, x, 0.6, 3, spatial_axes=spatial_axes)
    np.testing.assert_array_equal(y, db.drop_block(KEY, x, 0.6, cube, spatial_axes=spatial_axes))
    _assert_blocks(y, spatial_axes, cube)
    mask = db.block_mask(KEY, shape, 0.6, 3, spatial_axes=spatial_axes)
    np.testing.assert_array_equal(mask, db.block_mask(KEY, shape, 0.6, cube, spatial_axes=spatial_axes))


def test_drop_block_takes_an_unbatched_image_with_a_tuple():
    # Under vmap drop_block sees one (H, W, C) sample: a tuple's default axes are H and W.
    y = db.drop_block(KEY, jnp.ones((12, 12, 3)), 0.6, (3, 3))
    _assert_blocks(y, (0, 1), (3, 3))


# ---- the Flax layers ----


def _linen(block_size, **options):
    layer = db.DropBlock(keep_prob=0.7, block_size=block_size, **options)
    return lambda x, key, deterministic=False: layer.apply({}, x, deterministic=deterministic, rng=key)


def _nnx(block_size, **options):
    layer = db_nnx.DropBlock(keep_prob=0.7, block_size=block_size, rngs=nnx.Rngs(dropout=0), **options)
    return lambda x, key, deterministic=False: layer(x, rngs=key, deterministic=deterministic)


FLAX_LAYERS = {"linen": _linen, "nnx": _nnx}


@pytest.mark.parametrize("make", FLAX_LAYERS.values(), ids=FLAX_LAYERS.keys())
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shape", [(8, 40, 1), (2, 4, 8, 8, 3)])
def test_flax_layers_follow_the_int_rule_in_training_and_in_evaluation(make, deterministic, shape):
    layer = make(5)
    _assert_int_refused(lambda: layer(jnp.ones(shape), KEY, deterministic), 5, len(shape))


@pytest.mark.parametrize("make", FLAX_LAYERS.values(), ids=FLAX_LAYERS.keys())
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("block_size,shape", [((3, 3, 3), (2, 8, 8, 3)), ((3, 3), (8, 8, 3)), ((3,), (8, 3))])
def test_flax_layers_refuse_default_axes_that_include_the_batch_axis(make, deterministic, block_size, shape):
    layer = make(block_size)
    with pytest.raises(ValueError) as info:
        layer(jnp.ones(shape), KEY, deterministic)
    message = str(info.value)
    assert f"block_size={block_size}" in message and f"rank {len(shape)}" in message, message
    assert "axis 0, the batch axis" in message and "spatial_axes" in message, message


@pytest.mark.parametrize("make", FLAX_LAYERS.values(), ids=FLAX_LAYERS.keys())
def test_flax_layers_take_an_int_with_explicit_axes_and_a_tuple_with_a_batch_axis(make):
    key = jax.random.key(5)
    sequences = jnp.ones((8, 40, 2))
    np.testing.assert_array_equal(
        make(5, spatial_axes=(1,))(sequences, key), db.drop_block(key, sequences, 0.7, (5,), spatial_axes=(1,))
    )
    volume = jnp.ones((2, 4, 8, 8, 3))
    np.testing.assert_array_equal(make((3, 3, 3))(volume, key), db.drop_block(key, volume, 0.7, (3, 3, 3)))


def test_flax_layers_check_the_int_rule_at_construction_against_broadcast_dims():
    # With an int and the default axes the input has rank 4, so axis 1 is always spatial.
    for build in [
        lambda: db.DropBlock(keep_prob=0.9, block_size=3, broadcast_dims=(1,)),
        lambda: db_nnx.DropBlock(keep_prob=0.9, block_size=3, broadcast_dims=(1,)),
    ]:
        with pytest.raises(ValueError, match=r"broadcast_dims must not contain a spatial axis"):
            build()


# ---- all four layers and drop_block agree ----


def _keras_output(block_size, x, keep_prob):
    layer = db_keras.DropBlock(keep_prob=keep_prob, block_size=block_size, data_format="channels_last", seed=1)
    return np.asarray(layer(x, training=True))


def _equinox_output(block_size, x, keep_prob):
    # Equinox's layout: one channels-first sample at a time, under vmap.
    layer = db_equinox.DropBlock(keep_prob=keep_prob, block_size=block_size)
    samples = jnp.moveaxis(x, -1, 1)
    keys = jax.random.split(jax.random.key(2), len(x))
    return np.asarray(jnp.moveaxis(jax.vmap(lambda s, k: layer(s, key=k))(samples, keys), 1, -1))


def _every_output(flax_block, other_block, x, keep_prob):
    key = jax.random.key(4)
    return {
        "drop_block": db.drop_block(key, x, keep_prob, flax_block),
        "linen": db.DropBlock(keep_prob=keep_prob, block_size=flax_block).apply({}, x, deterministic=False, rng=key),
        "nnx": db_nnx.DropBlock(keep_prob=keep_prob, block_size=flax_block)(x, rngs=key),
        "keras": _keras_output(other_block, x, keep_prob),
        "equinox": _equinox_output(other_block, x, keep_prob),
    }


@pytest.mark.parametrize("keras_and_equinox_block", [3, (3, 3, 3)])
def test_every_layer_drops_cubes_of_a_volume_given_a_tuple(keras_and_equinox_block):
    # (N, D, H, W, C): cubes within each sample and channel, never squares on depth slices.
    x = jnp.ones((2, 6, 8, 8, 3))
    for name, y in _every_output((3, 3, 3), keras_and_equinox_block, x, 0.7).items():
        assert np.asarray(y).shape == x.shape, name
        _assert_blocks(y, (1, 2, 3), (3, 3, 3))


@pytest.mark.parametrize("keras_and_equinox_block", [3, (3, 3)])
def test_every_layer_drops_squares_of_an_image_given_an_int(keras_and_equinox_block):
    x = jnp.ones((2, 10, 10, 3))
    for name, y in _every_output(3, keras_and_equinox_block, x, 0.7).items():
        assert np.asarray(y).shape == x.shape, name
        _assert_blocks(y, (1, 2), (3, 3))


def test_keras_and_equinox_take_an_int_on_sequences_as_runs():
    x = jnp.ones((4, 40, 2))
    _assert_blocks(_keras_output(5, x, 0.7), (1,), (5,))
    _assert_blocks(_equinox_output(5, x, 0.7), (1,), (5,))
