"""Tests of the Linen layer ``dropblock_jax.DropBlock``, modelled on Flax's dropout tests."""

import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import errors
from flax import linen as nn

import dropblock_jax
from dropblock_jax import DropBlock, drop_block
from helpers import BAD_LAYER_ARGUMENTS, PORTED_CALLS, assert_keep_prob_conversion_error, bits, drop_block_error

X = jax.random.normal(jax.random.key(42), (2, 8, 8, 3))


class _MakeRng(nn.Module):
    """Returns ``make_rng(collection)`` from the top-level scope, as a top-level DropBlock sees it."""

    collection: str = "dropout"

    def __call__(self):
        return self.make_rng(self.collection)


def test_exported_from_package_and_module():
    assert dropblock_jax.DropBlock is dropblock_jax.linen.DropBlock


class _Subclass(DropBlock):
    extra: int = 0


@pytest.mark.parametrize(("args", "kwargs", "received"), PORTED_CALLS)
@pytest.mark.parametrize("layer", [nn.remat(DropBlock), _Subclass], ids=["remat", "subclass"])
def test_a_ported_drop_rate_gets_the_keep_prob_conversion_through_flax_transforms_and_subclasses(
    layer, args, kwargs, received
):
    # DropBlock(0.1) would keep 10% where nn.Dropout(0.1) drops 10%; tests/test_layers.py checks DropBlock itself.
    assert_keep_prob_conversion_error(lambda: layer(*args, **kwargs), layer.__name__, received)


@pytest.mark.parametrize("arguments", BAD_LAYER_ARGUMENTS, ids=str)
def test_bad_attributes_fail_with_drop_blocks_message_through_remat_and_clone(arguments):
    error, message = drop_block_error(X, arguments)
    for make in (nn.remat(DropBlock), DropBlock(keep_prob=0.9, block_size=3).clone):
        with pytest.raises(error) as info:
            make(**{"keep_prob": 0.9, "block_size": 3, **arguments})
        assert str(info.value) == message


def test_an_argument_equal_to_an_accepted_one_but_of_another_type_is_still_refused():
    # Python has 1 == True and 3 == 3.0; DropBlock refuses bools and floats as sizes.
    DropBlock(keep_prob=1, block_size=(1, 3), broadcast_dims=(0,))
    for arguments in (
        {"keep_prob": True, "block_size": (1, 3), "broadcast_dims": (0,)},
        {"keep_prob": 1, "block_size": (True, 3), "broadcast_dims": (0,)},
        {"keep_prob": 1, "block_size": (1, 3.0), "broadcast_dims": (0,)},
        {"keep_prob": 1, "block_size": (1, 3), "broadcast_dims": (False,)},
    ):
        error, message = drop_block_error(X, arguments)
        with pytest.raises(error) as info:
            DropBlock(**arguments)
        assert str(info.value) == message


def test_what_depends_on_the_input_is_checked_at_the_call():
    # Axis 1 is spatial in an (N, H, W, C) input but not in an (N, T, H, W, C) one.
    layer = DropBlock(keep_prob=0.6, block_size=(3, 3), broadcast_dims=(1,), deterministic=False)
    error, message = drop_block_error(X, {"block_size": (3, 3), "broadcast_dims": (1,)})
    key = jax.random.key(4)
    with pytest.raises(error) as info:
        layer.apply({}, X, rng=key)
    assert str(info.value) == message
    volume = jnp.stack([X, X], axis=1)
    np.testing.assert_array_equal(
        layer.apply({}, volume, rng=key), drop_block(key, volume, 0.6, (3, 3), broadcast_dims=(1,))
    )


def test_a_traced_keep_prob_attribute_passes_the_construction_check():
    key = jax.random.key(3)

    @jax.jit
    def apply(keep_prob):
        return DropBlock(keep_prob=keep_prob, block_size=3, deterministic=False).apply({}, X, rng=key)

    np.testing.assert_array_equal(apply(0.7), drop_block(key, X, 0.7, 3))


def test_the_checked_layer_still_pickles_copies_and_clones():
    layer = DropBlock(keep_prob=0.7, block_size=(3, 2), broadcast_dims=(-1,), deterministic=False)
    key = jax.random.key(6)
    expected = drop_block(key, X, 0.7, (3, 2), broadcast_dims=(-1,))
    for copied in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer), layer.clone()):
        assert copied == layer
        np.testing.assert_array_equal(copied.apply({}, X, rng=key), expected)
    np.testing.assert_array_equal(
        layer.clone(keep_prob=0.5).apply({}, X, rng=key), drop_block(key, X, 0.5, (3, 2), broadcast_dims=(-1,))
    )
    assert _Subclass(keep_prob=0.7, extra=2).extra == 2


def test_an_nnx_style_rngs_argument_points_to_the_nnx_layer():
    with pytest.raises(TypeError, match=r"Flax Linen layer.*dropblock_jax\.nnx\.DropBlock"):
        DropBlock(keep_prob=0.9, block_size=3, rngs=object())


@pytest.mark.parametrize(
    "field, call, message",
    [
        (None, None, "must be passed to the constructor or at call time"),
        (True, False, "was passed to the constructor and at call time"),
        (False, False, "was passed to the constructor and at call time"),
    ],
)
def test_deterministic_given_neither_or_both_is_value_error(field, call, message):
    layer = DropBlock(keep_prob=0.9, block_size=3, deterministic=field)
    with pytest.raises(ValueError, match=f'"deterministic".*{message}|{message}.*"deterministic"'):
        layer.apply({}, X, deterministic=call, rngs={"dropout": jax.random.key(0)})


@pytest.mark.parametrize("where", ["field", "call"])
def test_deterministic_returns_inputs_unchanged(where):
    x = X.at[0, 0, 0, 0].set(jnp.nan).at[1, 2, 3, 1].set(-jnp.inf).at[0, 1, 1, 2].set(-0.0)
    if where == "field":
        y = DropBlock(keep_prob=0.1, block_size=3, deterministic=True).apply({}, x)
    else:
        y = DropBlock(keep_prob=0.1, block_size=3).apply({}, x, deterministic=True)
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(bits(y), bits(x))


def test_deterministic_needs_no_rng():
    # Like nn.Dropout: eval mode must not require a "dropout" collection.
    y = DropBlock(keep_prob=0.5, block_size=3, deterministic=True).apply({}, X)
    np.testing.assert_array_equal(y, X)


def test_key_is_make_rng_of_the_dropout_collection():
    rng = jax.random.key(7)
    layer = DropBlock(keep_prob=0.6, block_size=3, deterministic=False)
    y = layer.apply({}, X, rngs={"dropout": rng})
    expected = drop_block(_MakeRng().apply({}, rngs={"dropout": rng}), X, 0.6, 3)
    np.testing.assert_array_equal(y, expected)
    assert not np.array_equal(y, X)


def test_other_rng_collection():
    rng = jax.random.key(3)
    layer = DropBlock(keep_prob=0.6, block_size=3, deterministic=False, rng_collection="noise")
    y = layer.apply({}, X, rngs={"noise": rng})
    expected = drop_block(_MakeRng("noise").apply({}, rngs={"noise": rng}), X, 0.6, 3)
    np.testing.assert_array_equal(y, expected)
    with pytest.raises(errors.InvalidRngError, match="noise"):
        layer.apply({}, X, rngs={"dropout": rng})


def test_training_without_rng_raises_naming_the_collection():
    with pytest.raises(errors.InvalidRngError, match="dropout"):
        DropBlock(keep_prob=0.6, block_size=3).apply({}, X, deterministic=False)


def test_different_dropout_keys_give_different_masks():
    layer = DropBlock(keep_prob=0.6, block_size=3, deterministic=False)
    a = layer.apply({}, X, rngs={"dropout": jax.random.key(0)})
    b = layer.apply({}, X, rngs={"dropout": jax.random.key(1)})
    again = layer.apply({}, X, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_array_equal(a, again)
    assert not np.array_equal(a == 0, b == 0)


def test_rng_argument_overrides_the_collection():
    key = jax.random.key(11)
    layer = DropBlock(keep_prob=0.6, block_size=3, deterministic=False)
    with_collection = layer.apply({}, X, rng=key, rngs={"dropout": jax.random.key(0)})
    without_collection = layer.apply({}, X, rng=key)
    expected = drop_block(key, X, 0.6, 3)
    np.testing.assert_array_equal(with_collection, expected)
    np.testing.assert_array_equal(without_collection, expected)


def test_fields_reach_drop_block():
    key = jax.random.key(5)
    x = jnp.moveaxis(X, -1, 1)
    options = dict(
        spatial_axes=(2, 3),
        broadcast_dims=(0,),
        seed_region="everywhere",
        gamma="calibrated",
        normalize="expected",
    )
    y = DropBlock(keep_prob=0.7, block_size=(3, 2), deterministic=False, **options).apply({}, x, rng=key)
    np.testing.assert_array_equal(y, drop_block(key, x, 0.7, (3, 2), **options))
    np.testing.assert_array_equal(y[0] == 0, y[1] == 0)


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool, keep_prob=None):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.relu(x)
        x = DropBlock(keep_prob=0.8, block_size=3, name="drop")(x, deterministic=not train, keep_prob=keep_prob)
        x = x.mean(axis=(1, 2))
        return nn.Dense(3)(x)


def test_scheduled_keep_prob_compiles_once_with_finite_loss_and_grads():
    model = _CNN()
    images = jax.random.normal(jax.random.key(0), (4, 8, 8, 2))
    labels = jnp.array([0, 1, 2, 1])
    params = model.init(jax.random.key(1), images, train=False)["params"]
    total_steps = 6
    schedule = optax.linear_schedule(1.0, 0.8, transition_steps=total_steps - 1)
    tx = optax.sgd(0.1)
    opt_state = tx.init(params)
    traces = []

    def loss_fn(params, step, rng, train):
        logits = model.apply(
            {"params": params},
            images,
            train=train,
            keep_prob=schedule(step),
            rngs={} if rng is None else {"dropout": rng},
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def train_step(params, opt_state, step, rng):
        traces.append(step)
        loss, grads = jax.value_and_grad(loss_fn)(params, step, rng, True)
        updates, opt_state = tx.update(grads, opt_state, params)
        eval_loss = loss_fn(params, step, None, False)
        return optax.apply_updates(params, updates), opt_state, loss, eval_loss, grads

    rng = jax.random.key(2)
    for step in range(total_steps):
        step_rng = jax.random.fold_in(rng, step)
        params, opt_state, loss, eval_loss, grads = train_step(params, opt_state, jnp.asarray(step), step_rng)
        assert np.isfinite(float(loss))
        assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
        if step == 0:
            # keep_prob = schedule(0) = 1 must reach the layer: no unit is dropped.
            assert float(loss) == float(eval_loss)
        else:
            assert float(loss) != float(eval_loss)
    assert len(traces) == 1
    assert train_step._cache_size() == 1


def test_scheduled_keep_prob_in_a_train_state_loop_compiles_once():
    """The Flax tutorials' loop: a TrainState with AdamW, the schedule of state.step."""
    from flax.training import train_state

    model = _CNN()
    images = jax.random.normal(jax.random.key(0), (4, 8, 8, 2))
    labels = jnp.array([0, 1, 2, 1])
    params = model.init(jax.random.key(1), images, train=False)["params"]
    schedule = optax.linear_schedule(1.0, 0.6, transition_steps=4)
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adamw(1e-2, weight_decay=0.5))
    traces = []

    @jax.jit
    def train_step(state, rng):
        traces.append(None)
        keep_prob = schedule(state.step)

        def loss_fn(params):
            logits, intermediates = state.apply_fn(
                {"params": params},
                images,
                train=True,
                keep_prob=keep_prob,
                rngs={"dropout": rng},
                capture_intermediates=lambda module, _: module.name in ("Conv_0", "drop"),
                mutable=["intermediates"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            captured = intermediates["intermediates"]
            return loss, (captured["Conv_0"]["__call__"][0], captured["drop"]["__call__"][0])

        (loss, (conv, dropped)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads), loss, conv, dropped

    dropped_fractions = []
    for step in range(5):
        state, loss, conv, dropped = train_step(state, jax.random.fold_in(jax.random.key(2), step))
        assert np.isfinite(float(loss))
        # The units DropBlock zeroed: positive after the ReLU, zero after the layer.
        positive = np.asarray(conv) > 0
        dropped_fractions.append(float((np.asarray(dropped)[positive] == 0).mean()))
    assert len(traces) == 1
    # keep_prob 1 at the optimizer's step 0 drops nothing; the last steps' lower keep_prob drops.
    assert dropped_fractions[0] == 0.0 and min(dropped_fractions[3:]) > 0.1, dropped_fractions


def test_inside_nn_scan_rng_split_per_step():
    class Cell(nn.Module):
        @nn.compact
        def __call__(self, carry, x, keep_prob):
            return carry, DropBlock(keep_prob=0.5, block_size=3, deterministic=False)(x, keep_prob=keep_prob)

    xs = jnp.ones((3, 2, 8, 8, 2))
    outputs = {}
    for split in (True, False):
        scanned = nn.scan(
            Cell,
            variable_broadcast="params",
            split_rngs={"params": False, "dropout": split},
            in_axes=(0, nn.broadcast),
        )
        _, ys = scanned().apply({}, jnp.zeros(()), xs, jnp.asarray(0.5), rngs={"dropout": jax.random.key(0)})
        outputs[split] = ys
        assert ys.shape == xs.shape
    split_masks = np.asarray(outputs[True] != 0)
    shared_masks = np.asarray(outputs[False] != 0)
    assert not np.array_equal(split_masks[0], split_masks[1])
    assert not np.array_equal(split_masks[1], split_masks[2])
    np.testing.assert_array_equal(shared_masks[0], shared_masks[1])
    np.testing.assert_array_equal(shared_masks[0], shared_masks[2])
    assert 0 < shared_masks.mean() < 1


def test_inside_nn_remat_recomputes_the_same_mask():
    class Net(nn.Module):
        remat: bool

        @nn.compact
        def __call__(self, x):
            x = nn.Dense(3, name="dense")(x)
            layer = nn.remat(DropBlock) if self.remat else DropBlock
            x = layer(keep_prob=0.6, block_size=3, deterministic=False, name="drop")(x)
            return jnp.sum(jnp.sin(x) ** 2)

    params = Net(False).init(jax.random.key(0), X)["params"]
    rngs = {"dropout": jax.random.key(1)}
    results = {}
    for remat in (False, True):
        fn = jax.jit(
            jax.value_and_grad(lambda p, x, remat=remat: Net(remat).apply({"params": p}, x, rngs=rngs), argnums=(0, 1))
        )
        results[remat] = fn(params, X)
    (loss_plain, grads_plain), (loss_remat, grads_remat) = results[False], results[True]
    assert float(loss_plain) == float(loss_remat)
    for a, b in zip(jax.tree.leaves(grads_plain), jax.tree.leaves(grads_remat)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
