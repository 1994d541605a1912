"""Tests of the Equinox layer ``dropblock_jax.equinox.DropBlock``."""

import inspect
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import DROP_BLOCK_OPTION_DEFAULTS
from dropblock_jax import drop_block
from dropblock_jax.equinox import DropBlock

X_HWC = jax.random.normal(jax.random.key(42), (8, 8, 3))
X_CHW = jnp.moveaxis(X_HWC, -1, 0)


class _CNN(eqx.Module):
    conv: eqx.nn.Conv2d
    drop: DropBlock
    head: eqx.nn.Linear

    def __init__(self, key):
        conv_key, head_key = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(3, 8, 3, padding=1, key=conv_key)
        self.drop = DropBlock(1.0, 3, spatial_axes=(1, 2))
        self.head = eqx.nn.Linear(8, 4, key=head_key)

    def __call__(self, x, *, key=None):
        x = self.drop(jax.nn.relu(self.conv(x)), key=key)
        return self.head(x.mean(axis=(1, 2)))


def test_signature_follows_the_contract():
    params = inspect.signature(DropBlock.__init__).parameters
    assert list(params)[1:3] == ["keep_prob", "block_size"]
    assert (params["keep_prob"].default, params["block_size"].default) == (0.9, 7)
    keyword_only = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert keyword_only == {**DROP_BLOCK_OPTION_DEFAULTS, "inference": False}
    params = inspect.signature(DropBlock.__call__).parameters
    assert list(params) == ["self", "x", "key", "inference"]
    for name in ["key", "inference"]:
        assert params[name].kind is params[name].KEYWORD_ONLY and params[name].default is None


def test_scheduled_training_under_filter_jit_compiles_once():
    model = _CNN(jax.random.key(0))
    tx = optax.sgd(0.1)
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    images = jax.random.normal(jax.random.key(1), (4, 3, 8, 8))
    labels = jnp.array([0, 1, 2, 3])
    traces = []

    @eqx.filter_jit
    def train_step(model, opt_state, key):
        traces.append(1)  # runs once per trace, not per call

        def loss_fn(model):
            keys = jax.random.split(key, images.shape[0])
            logits = jax.vmap(lambda x, k: model(x, key=k))(images, keys)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss, grads

    schedule = optax.linear_schedule(init_value=1.0, end_value=0.8, transition_steps=4)
    losses = []
    for step in range(5):
        model = eqx.tree_at(lambda m: m.drop.keep_prob, model, schedule(step))
        model, opt_state, loss, grads = train_step(model, opt_state, jax.random.key(step))
        losses.append(float(loss))
    model = eqx.tree_at(lambda m: m.drop.keep_prob, model, jnp.asarray(0.8))
    train_step(model, opt_state, jax.random.key(9))
    assert len(traces) == 1
    assert np.isfinite(losses).all()
    assert float(model.drop.keep_prob) == pytest.approx(0.8)
    # keep_prob is data, but not something the loss can move.
    assert float(grads.drop.keep_prob) == 0.0


def test_the_scheduled_value_reaches_the_jitted_layer():
    layer = DropBlock(0.9, 3)
    call = eqx.filter_jit(lambda layer, x, key: layer(x, key=key))
    key = jax.random.key(3)
    for keep in [1.0, 0.5]:
        layer = eqx.tree_at(lambda m: m.keep_prob, layer, jnp.asarray(keep))
        np.testing.assert_array_equal(call(layer, X_HWC, key), drop_block(key, X_HWC, keep, 3))


def test_equals_drop_block_for_the_same_key():
    key = jax.random.key(7)
    np.testing.assert_array_equal(DropBlock(0.7, 3)(X_HWC, key=key), drop_block(key, X_HWC, 0.7, 3))
    options = dict(
        spatial_axes=(1, 2), broadcast_dims=(0,), seed_region="everywhere", gamma="calibrated", normalize="expected"
    )
    np.testing.assert_array_equal(
        DropBlock(0.7, (3, 2), **options)(X_CHW, key=key),
        drop_block(key, X_CHW, 0.7, (3, 2), **options),
    )
    legacy = jax.random.PRNGKey(7)
    np.testing.assert_array_equal(DropBlock(0.7, 3)(X_HWC, key=legacy), drop_block(legacy, X_HWC, 0.7, 3))


def test_inference_returns_the_input_and_needs_no_key():
    training = DropBlock(0.5, 3)
    assert DropBlock(0.5, 3, inference=True)(X_HWC) is X_HWC
    assert training(X_HWC, inference=True) is X_HWC
    frozen = eqx.nn.inference_mode(training)
    assert frozen.inference is True
    assert frozen(X_HWC) is X_HWC
    # inference_mode reaches a DropBlock nested in a model, and back.
    model = eqx.nn.inference_mode(_CNN(jax.random.key(0)))
    assert model.drop.inference is True
    assert eqx.nn.inference_mode(model, value=False).drop.inference is False
    # A call-time flag overrides the field both ways.
    key = jax.random.key(1)
    np.testing.assert_array_equal(frozen(X_HWC, key=key, inference=False), training(X_HWC, key=key))


def test_training_without_a_key_is_a_runtime_error_that_says_how_to_fix_it():
    # RuntimeError, as eqx.nn.Dropout raises.
    with pytest.raises(RuntimeError, match="no key") as info:
        DropBlock(0.9, 3)(X_HWC)
    message = str(info.value)
    assert "key=" in message and "inference_mode" in message and "inference=True" in message


def test_vmap_over_keys_gives_each_sample_its_own_mask():
    layer = DropBlock(0.5, 3)
    keys = jax.random.split(jax.random.key(5), 4)
    batch = jnp.stack([X_HWC] * 4)
    ys = jax.vmap(lambda x, k: layer(x, key=k))(batch, keys)
    for y, key in zip(ys, keys):
        np.testing.assert_array_equal(y, drop_block(key, X_HWC, 0.5, 3))
    assert not np.array_equal(ys[0] == 0, ys[1] == 0)


def test_vmap_over_unbatched_channels_first_inputs():
    layer = DropBlock(0.5, 3, spatial_axes=(1, 2))
    keys = jax.random.split(jax.random.key(6), 3)
    batch = jnp.stack([X_CHW] * 3)
    ys = jax.vmap(lambda x, k: layer(x, key=k))(batch, keys)
    assert ys.shape == batch.shape
    for y, key in zip(ys, keys):
        np.testing.assert_array_equal(y, drop_block(key, X_CHW, 0.5, 3, spatial_axes=(1, 2)))
        # Blocks extend over H and W, not over channels: each channel has its own holes.
        dropped = np.asarray(y == 0)
        assert dropped.any() and not (dropped == dropped[:1]).all()


def test_vmap_with_axis_name_normalizes_over_the_whole_batch():
    layer = DropBlock(0.5, 3, axis_name="batch")
    keys = jax.random.split(jax.random.key(8), 4)
    ones = jnp.ones((4, 8, 8, 3))
    ys = jax.vmap(lambda x, k: layer(x, key=k), axis_name="batch")(ones, keys)
    np.testing.assert_allclose(float(ys.sum()), float(ones.sum()), rtol=1e-5)


def test_options_are_static_and_keep_prob_is_a_leaf():
    layer = DropBlock(0.9, 3, spatial_axes=[1, 2], broadcast_dims=[0])
    leaves = jax.tree_util.tree_leaves(layer)
    assert len(leaves) == 2  # keep_prob and the inference flag
    assert isinstance(layer.keep_prob, jax.Array) and layer.keep_prob.shape == ()
    assert layer.block_size == (3, 3)
    assert layer.spatial_axes == (1, 2) and layer.broadcast_dims == (0,)
    hash((layer.block_size, layer.spatial_axes, layer.broadcast_dims))


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(keep_prob=1.5), ValueError, "keep_prob"),
        (dict(keep_prob=-0.1), ValueError, "keep_prob"),
        (dict(keep_prob="0.9"), TypeError, "keep_prob"),
        (dict(keep_prob=jnp.ones(2)), ValueError, "keep_prob"),
        (dict(block_size=0), ValueError, "block_size"),
        (dict(block_size=2.5), TypeError, "block_size"),
        (dict(block_size=(3, 3, 3), spatial_axes=(1, 2)), ValueError, "block_size"),
        (dict(spatial_axes=(1, 1)), ValueError, "spatial_axes"),
        (dict(spatial_axes="hw"), TypeError, "spatial_axes"),
        (dict(broadcast_dims=(0.5,)), TypeError, "broadcast_dims"),
        (dict(seed_region="same"), ValueError, "seed_region"),
        (dict(gamma="timm"), ValueError, "gamma"),
        (dict(normalize="mean"), ValueError, "normalize"),
        (dict(inference="yes"), TypeError, "inference"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        DropBlock(**kwargs)


def test_rank_dependent_arguments_fail_at_the_call_naming_the_argument():
    with pytest.raises(ValueError, match="broadcast_dims"):
        DropBlock(0.9, 3, broadcast_dims=(0,))(X_HWC, key=jax.random.key(0))
    with pytest.raises(ValueError, match="spatial_axes"):
        DropBlock(0.9, 3, spatial_axes=(1, 5))(X_CHW, key=jax.random.key(0))
    with pytest.raises(TypeError, match="key"):
        DropBlock(0.9, 3)(X_HWC, key=0)


def test_without_equinox_the_import_error_says_what_to_install():
    code = (
        "import sys\n"
        "sys.modules['equinox'] = None\n"
        "import dropblock_jax\n"
        "dropblock_jax.drop_block\n"
        "try:\n"
        "    import dropblock_jax.equinox\n"
        "except ImportError as error:\n"
        "    print(error)\n"
        "else:\n"
        "    raise SystemExit('imported without equinox')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install dropblock-jax[equinox]" in result.stdout
