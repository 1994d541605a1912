"""Tests of the NNX layer ``dropblock_jax.nnx.DropBlock`` and ``set_keep_prob``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dropblock_jax import drop_block
from dropblock_jax.nnx import DropBlock, set_keep_prob
from helpers import drop_block_error

X = jax.random.normal(jax.random.key(42), (2, 8, 8, 3))


class _Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs | None):
        self.drop = DropBlock(keep_prob=0.6, block_size=3, rngs=rngs)

    def __call__(self, x):
        return self.drop(x)


def _stream_keys(seed, n, collection="dropout"):
    """The first ``n`` keys a layer constructed with ``nnx.Rngs(**{collection: seed})`` draws."""
    stream = nnx.Rngs(**{collection: seed})[collection].fork()
    return [stream() for _ in range(n)]


def test_successive_calls_draw_new_masks_from_the_forked_stream():
    layer = DropBlock(keep_prob=0.6, block_size=3, rngs=nnx.Rngs(dropout=0))
    ys = [layer(X) for _ in range(3)]
    for y, key in zip(ys, _stream_keys(0, 3)):
        np.testing.assert_array_equal(y, drop_block(key, X, 0.6, 3))
    assert not np.array_equal(ys[0] == 0, ys[1] == 0)
    assert not np.array_equal(ys[1] == 0, ys[2] == 0)


def test_rng_stream_and_collection_name():
    layer = DropBlock(keep_prob=0.6, block_size=3, rng_collection="noise", rngs=nnx.Rngs(noise=3))
    np.testing.assert_array_equal(layer(X), drop_block(_stream_keys(3, 1, "noise")[0], X, 0.6, 3))
    stream_layer = DropBlock(keep_prob=0.6, block_size=3, rngs=nnx.Rngs(dropout=3)["dropout"])
    np.testing.assert_array_equal(stream_layer(X), drop_block(_stream_keys(3, 1)[0], X, 0.6, 3))


def test_train_and_eval_switch_the_layer():
    model = _Net(nnx.Rngs(dropout=0))
    model.eval()
    assert model.drop.deterministic is True
    np.testing.assert_array_equal(model(X), X)
    model.train()
    assert model.drop.deterministic is False
    y = model(X)
    np.testing.assert_array_equal(y, drop_block(_stream_keys(0, 1)[0], X, 0.6, 3))
    assert not np.array_equal(y, X)


def test_eval_does_not_advance_the_stream():
    model = _Net(nnx.Rngs(dropout=0))
    model.eval()
    model(X)
    model.train()
    np.testing.assert_array_equal(model(X), drop_block(_stream_keys(0, 1)[0], X, 0.6, 3))


def test_nnx_view_switches_a_view_and_leaves_the_model():
    model = _Net(nnx.Rngs(dropout=0))
    frozen = nnx.view(model, deterministic=True)
    assert frozen.drop.deterministic is True
    assert model.drop.deterministic is False
    np.testing.assert_array_equal(frozen(X), X)
    model.eval()
    training = nnx.view(model, deterministic=False)
    assert not np.array_equal(training(X), X)
    assert model.drop.deterministic is True


def test_call_time_deterministic_overrides_the_attribute():
    layer = DropBlock(keep_prob=0.6, block_size=3, rngs=nnx.Rngs(dropout=0))
    np.testing.assert_array_equal(layer(X, deterministic=True), X)
    layer.eval()
    np.testing.assert_array_equal(layer(X, deterministic=False), drop_block(_stream_keys(0, 1)[0], X, 0.6, 3))


def test_training_without_rngs_is_a_value_error_that_says_how_to_fix_it():
    model = _Net(None)
    with pytest.raises(ValueError, match="rngs") as info:
        model(X)
    message = str(info.value)
    assert "nnx.Rngs" in message
    assert "eval()" in message
    assert "deterministic=True" in message
    model.eval()
    np.testing.assert_array_equal(model(X), X)


def test_bad_rngs_argument_is_a_type_error_naming_it_and_the_value():
    with pytest.raises(TypeError, match=r"rngs must be an nnx.Rngs, an nnx.RngStream or None, got 0 \(int\)"):
        DropBlock(keep_prob=0.6, block_size=3, rngs=0)
    layer = DropBlock(keep_prob=0.6, block_size=3, rngs=nnx.Rngs(dropout=0))
    for bad, shown in [(0, "got 0 (int)"), ("key", "got 'key' (str)"), (np.zeros(3, np.uint32), "(ndarray)")]:
        with pytest.raises(TypeError, match=r"rngs must be an nnx\.Rngs, an nnx\.RngStream or a PRNG key") as info:
            layer(X, rngs=bad)
        assert shown in str(info.value)
    # A layer without rngs reports that, not the type of what it lacks.
    with pytest.raises(ValueError, match="has no rngs"):
        DropBlock(keep_prob=0.6, block_size=3)(X)


def test_call_time_rngs_accept_every_key_drop_block_accepts():
    layer = DropBlock(keep_prob=0.6, block_size=3, rngs=nnx.Rngs(dropout=0))
    legacy = jax.random.PRNGKey(9)
    expected = drop_block(legacy, X, 0.6, 3)
    np.testing.assert_array_equal(layer(X, rngs=legacy), expected)
    np.testing.assert_array_equal(layer(X, rngs=np.asarray(legacy)), expected)  # a NumPy legacy key
    rbg = jax.random.key(9, impl="rbg")
    np.testing.assert_array_equal(layer(X, rngs=rbg), drop_block(rbg, X, 0.6, 3))


def test_what_depends_on_the_input_is_checked_at_the_call():
    # Axis 1 is spatial in an (N, H, W, C) input but not in an (N, T, H, W, C) one.
    layer = DropBlock(keep_prob=0.6, block_size=(3, 3), broadcast_dims=(1,), rngs=nnx.Rngs(dropout=0))
    error, message = drop_block_error(X, {"block_size": (3, 3), "broadcast_dims": (1,)})
    with pytest.raises(error) as info:
        layer(X)
    assert str(info.value) == message
    volume = jnp.stack([X, X], axis=1)
    np.testing.assert_array_equal(
        layer(volume), drop_block(_stream_keys(0, 2)[1], volume, 0.6, (3, 3), broadcast_dims=(1,))
    )


def test_axes_given_as_an_int_or_a_list_reach_drop_block():
    axes = [1, 2]
    layer = DropBlock(keep_prob=0.6, block_size=[3, 3], spatial_axes=axes, broadcast_dims=-1, rngs=nnx.Rngs(dropout=0))
    axes.append(3)  # the layer holds its own copy
    expected = drop_block(_stream_keys(0, 1)[0], X, 0.6, (3, 3), spatial_axes=(1, 2), broadcast_dims=(-1,))
    np.testing.assert_array_equal(nnx.jit(lambda layer, x: layer(x))(layer, X), expected)


def test_set_keep_prob_counts_the_layers_and_refuses_a_tree_without_any():
    model = nnx.Sequential(
        DropBlock(keep_prob=0.9, block_size=3, rngs=nnx.Rngs(dropout=0)),
        nnx.Sequential(DropBlock(keep_prob=0.8, block_size=3, rngs=nnx.Rngs(dropout=1))),
    )
    assert set_keep_prob(model, 0.7) == 2
    assert [float(model.layers[0].keep_prob[...]), float(model.layers[1].layers[0].keep_prob[...])] == [
        np.float32(0.7)
    ] * 2
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    with pytest.raises(ValueError, match=r"set_keep_prob found no dropblock_jax\.nnx\.DropBlock inside the Optimizer"):
        set_keep_prob(optimizer, 0.9)
    with pytest.raises(ValueError, match=r"no dropblock_jax\.nnx\.DropBlock"):
        set_keep_prob(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), 0.9)


@pytest.mark.parametrize("bad", [1.5, -0.5])
def test_bad_keep_prob_names_the_argument(bad):
    with pytest.raises(ValueError, match="keep_prob"):
        DropBlock(keep_prob=bad, block_size=3)
    with pytest.raises(ValueError, match="value"):
        set_keep_prob(DropBlock(keep_prob=0.9, block_size=3), bad)


def test_call_time_rngs_override_the_layer_stream():
    layer = DropBlock(keep_prob=0.6, block_size=3, rngs=nnx.Rngs(dropout=0))
    key = jax.random.key(9)
    np.testing.assert_array_equal(layer(X, rngs=key), drop_block(key, X, 0.6, 3))
    rngs = nnx.Rngs(dropout=9)
    expected = drop_block(nnx.Rngs(dropout=9)["dropout"](), X, 0.6, 3)
    np.testing.assert_array_equal(layer(X, rngs=rngs), expected)
    np.testing.assert_array_equal(layer(X, rngs=nnx.Rngs(dropout=9)["dropout"]), expected)
    # The layer's own stream was not consumed by the overrides.
    np.testing.assert_array_equal(layer(X), drop_block(_stream_keys(0, 1)[0], X, 0.6, 3))


def test_a_call_at_keep_prob_1_still_draws_from_the_stream():
    # The next call gets the stream's second key, as if the first had dropped blocks.
    layer = DropBlock(keep_prob=0.6, block_size=3, rngs=nnx.Rngs(dropout=0))
    np.testing.assert_array_equal(layer(X, keep_prob=1.0), X)
    np.testing.assert_array_equal(layer(X, keep_prob=0.8), drop_block(_stream_keys(0, 2)[1], X, 0.8, 3))


def test_keep_prob_is_data_not_a_parameter():
    model = _Net(nnx.Rngs(dropout=0))
    assert isinstance(model.drop.keep_prob, nnx.Variable)
    assert not isinstance(model.drop.keep_prob, nnx.Param)
    assert jax.tree.leaves(nnx.state(model, nnx.Param)) == []


def test_set_keep_prob_never_retraces_nnx_jit():
    model = nnx.Sequential(
        DropBlock(keep_prob=0.9, block_size=3, rngs=nnx.Rngs(dropout=0)),
        DropBlock(keep_prob=0.9, block_size=3, rngs=nnx.Rngs(dropout=1)),
    )
    traces = []

    @nnx.jit
    def forward(model, x):
        traces.append(None)
        return model(x)

    for value in (0.9, 0.8, 0.7, 0.5):
        set_keep_prob(model, value)
        for layer in model.layers:
            assert float(layer.keep_prob[...]) == np.float32(value)
        y = forward(model, X)
        assert 0 < float((y == 0).mean()) < 1
    set_keep_prob(model, 1.0)
    np.testing.assert_array_equal(forward(model, X), X)
    set_keep_prob(model, 0.0)
    np.testing.assert_array_equal(forward(model, X), jnp.zeros_like(X))
    set_keep_prob(model, jnp.asarray(0.75))
    forward(model, X)
    assert len(traces) == 1


def test_set_keep_prob_value_reaches_the_jitted_layer():
    layer = DropBlock(keep_prob=0.9, block_size=3, rngs=nnx.Rngs(dropout=0))
    forward = nnx.jit(lambda layer, x: layer(x))
    set_keep_prob(layer, 0.7)
    np.testing.assert_array_equal(forward(layer, X), drop_block(_stream_keys(0, 1)[0], X, 0.7, 3))


@pytest.mark.parametrize("tx", [optax.sgd(0.1), optax.adamw(1e-2, weight_decay=0.5)], ids=["sgd", "adamw"])
@pytest.mark.parametrize("inside_the_step", [False, True], ids=["set_outside", "set_from_optimizer_step"])
def test_scheduled_training_with_nnx_optimizer(tx, inside_the_step):
    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
            self.drop = DropBlock(keep_prob=1.0, block_size=3, rngs=rngs)
            self.head = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(self.drop(nnx.relu(self.conv(x))).mean(axis=(1, 2)))

    model = CNN(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    images = jax.random.normal(jax.random.key(0), (4, 8, 8, 2))
    labels = jnp.array([0, 1, 2, 1])
    schedule = optax.linear_schedule(1.0, 0.8, transition_steps=4)
    traces = []

    @nnx.jit
    def train_step(model, optimizer, x, y):
        traces.append(None)
        if inside_the_step:  # the flax tutorials' way: the schedule of the optimizer's own step
            set_keep_prob(model, schedule(optimizer.step[...]))

        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, grads

    for step in range(5):
        if not inside_the_step:
            set_keep_prob(model, schedule(step))
        loss, grads = train_step(model, optimizer, images, labels)
        assert np.isfinite(float(loss))
        assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
        # The optimizer must leave the scheduled value alone.
        assert float(model.drop.keep_prob[...]) == float(schedule(step))
    # Steps 0..4 with transition_steps=4: the last step trains at the target.
    assert float(model.drop.keep_prob[...]) == np.float32(0.8)
    assert len(traces) == 1


def _stacked_layers(n, seed=0):
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(rngs):
        return DropBlock(keep_prob=0.5, block_size=3, rngs=rngs)

    return create(nnx.Rngs(dropout=seed).split(n))


def _unstacked(layers, n):
    """Copies of the ``n`` layers a stack holds, as plain DropBlocks."""
    graphdef, state = nnx.split(layers)
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(n)]


def test_nnx_vmap_over_a_stack_of_layers():
    layers = _stacked_layers(3)
    singles = _unstacked(layers, 3)
    apply_each = nnx.vmap(lambda layer, x: layer(x), in_axes=(0, None), out_axes=0)
    ys = apply_each(layers, X)
    for y, single in zip(ys, singles):
        np.testing.assert_array_equal(y, single(X))
    assert not np.array_equal(ys[0] == 0, ys[1] == 0)
    assert not np.array_equal(ys[1] == 0, ys[2] == 0)
    np.testing.assert_array_equal(layers.rngs.count[...], [1, 1, 1])
    again = apply_each(layers, X)
    assert not np.array_equal(again[0] == 0, ys[0] == 0)


def test_nnx_vmap_over_unbatched_inputs_with_split_rngs():
    # A layer's input is batched unless its spatial axes are named: an unbatched (H, W, C) names them.
    layer = DropBlock(keep_prob=0.5, block_size=3, spatial_axes=(0, 1), rngs=nnx.Rngs(dropout=0))

    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(nnx.StateAxes({nnx.RngState: 0, ...: None}), 0))
    def per_sample(layer, x):
        return layer(x)

    ys = per_sample(layer, X)
    assert ys.shape == X.shape
    assert not np.array_equal(ys[0] == 0, ys[1] == 0)
    # Unbatched (H, W, C) maps: the blocks lie on the spatial axes, one mask per channel.
    kept = np.asarray(ys != 0)
    assert kept.any() and not kept.all()
    assert not all(np.array_equal(kept[..., 0], kept[..., c]) for c in (1, 2))


def test_nnx_scan_over_a_stack_of_layers():
    layers = _stacked_layers(3)
    singles = _unstacked(layers, 3)
    set_keep_prob(layers, 0.7)
    for single in singles:
        set_keep_prob(single, 0.7)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, layer):
        return layer(x)

    y = forward(X, layers)
    expected = X
    for single in singles:
        expected = single(expected)
    np.testing.assert_array_equal(y, expected)
    assert 0 < float((y == 0).mean()) < 1
    np.testing.assert_array_equal(layers.rngs.count[...], [1, 1, 1])
    np.testing.assert_array_equal(layers.keep_prob[...], np.full(3, 0.7, np.float32))
