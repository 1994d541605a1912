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

    def __init__(self, key, keep_prob=1.0):
        conv_key, head_key = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(3, 8, 3, padding=1, key=conv_key)
        self.drop = DropBlock(keep_prob=keep_prob, block_size=3, spatial_axes=(1, 2))
        self.head = eqx.nn.Linear(8, 4, key=head_key)

    def __call__(self, x, *, key=None, keep_prob=None):
        x = self.drop(jax.nn.relu(self.conv(x)), key=key, keep_prob=keep_prob)
        return self.head(x.mean(axis=(1, 2)))


def test_signature_follows_the_contract():
    params = inspect.signature(DropBlock.__init__).parameters
    keyword_only = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert list(params) == ["self", *keyword_only]
    assert keyword_only == {"keep_prob": 0.9, "block_size": 7, **DROP_BLOCK_OPTION_DEFAULTS, "inference": False}
    params = inspect.signature(DropBlock.__call__).parameters
    assert list(params) == ["self", "x", "key", "inference", "keep_prob"]
    for name in ["key", "inference", "keep_prob"]:
        assert params[name].kind is params[name].KEYWORD_ONLY and params[name].default is None


def test_a_positional_keep_prob_is_refused():
    # DropBlock(0.1) would keep 10% where eqx.nn.Dropout(0.1) drops 10%.
    with pytest.raises(TypeError, match="positional"):
        DropBlock(0.1)


def _tutorial_step(tx, filter_spec, schedule=None):
    """The train step of Equinox's tutorials: optax over eqx.filter(model, filter_spec), under filter_jit.

    Besides the loss it returns what the DropBlock layer does to ones at the step's
    keep_prob (from ``schedule`` of the optimizer's count when given, else the argument).
    """
    traces = []

    @eqx.filter_jit
    def step(model, opt_state, images, labels, key, keep_prob=None):
        traces.append(None)  # runs once per trace, not per call
        if schedule is not None:
            keep_prob = schedule(optax.tree_utils.tree_get(opt_state, "count"))

        def loss_fn(model):
            keys = jax.random.split(key, images.shape[0])
            logits = jax.vmap(lambda x, k: model(x, key=k, keep_prob=keep_prob))(images, keys)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, filter_spec))
        probe = model.drop(jnp.ones((8, 8, 8)), key=key, keep_prob=keep_prob)
        return eqx.apply_updates(model, updates), opt_state, loss, probe

    return step, traces


IMAGES = jax.random.normal(jax.random.key(1), (4, 3, 8, 8))
LABELS = jnp.array([0, 1, 2, 3])
OPTIMIZERS = {
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.5),
    "lion": lambda: optax.lion(1e-2, weight_decay=0.5),
    "sgd_decayed": lambda: optax.chain(optax.add_decayed_weights(0.5), optax.sgd(0.1)),
}


@pytest.mark.parametrize("filter_spec", [eqx.is_array, eqx.is_inexact_array], ids=["is_array", "is_inexact_array"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_no_optimizer_or_filter_changes_keep_prob_and_the_step_compiles_once(optimizer, filter_spec):
    model = _CNN(jax.random.key(0), keep_prob=0.9)
    tx = OPTIMIZERS[optimizer]()
    opt_state = tx.init(eqx.filter(model, filter_spec))
    step, traces = _tutorial_step(tx, filter_spec)
    for i in range(3):
        model, opt_state, loss, _ = step(model, opt_state, IMAGES, LABELS, jax.random.key(i))
    assert len(traces) == 1
    assert np.isfinite(float(loss))
    assert type(model.drop.keep_prob) is float and model.drop.keep_prob == 0.9
    assert all(leaf is None for leaf in jax.tree.leaves(eqx.filter(model.drop, filter_spec), is_leaf=_is_none))


def _is_none(x):
    return x is None


def test_300_adamw_steps_leave_the_layer_equal_to_drop_block():
    model = _CNN(jax.random.key(0), keep_prob=0.9)
    tx = optax.adamw(1e-3, weight_decay=0.05)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    step, traces = _tutorial_step(tx, eqx.is_array)
    for i in range(300):
        model, opt_state, _, _ = step(model, opt_state, IMAGES, LABELS, jax.random.key(i))
    assert len(traces) == 1
    assert model.drop.keep_prob == 0.9
    key = jax.random.key(1234)
    np.testing.assert_array_equal(model.drop(X_CHW, key=key), drop_block(key, X_CHW, 0.9, 3, spatial_axes=(1, 2)))


SCHEDULE = optax.linear_schedule(init_value=1.0, end_value=0.6, transition_steps=4)


def _check_probes(probes):
    """Each step's layer dropped at that step's scheduled keep_prob, from keep_prob 1 (nothing) down."""
    ones = jnp.ones((8, 8, 8))
    for i, probe in enumerate(probes):
        expected = drop_block(jax.random.key(i), ones, SCHEDULE(i), 3, spatial_axes=(1, 2))
        np.testing.assert_allclose(probe, expected, rtol=1e-6)
    assert (probes[0] == 1).all() and (probes[-1] == 0).any()


def test_a_schedule_of_the_optimizer_count_compiles_the_tutorial_step_once():
    model = _CNN(jax.random.key(0), keep_prob=0.9)
    tx = optax.adamw(1e-2, weight_decay=0.05)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    step, traces = _tutorial_step(tx, eqx.is_array, schedule=SCHEDULE)
    probes = []
    for i in range(5):
        model, opt_state, _, probe = step(model, opt_state, IMAGES, LABELS, jax.random.key(i))
        probes.append(probe)
    assert len(traces) == 1
    _check_probes(probes)
    assert model.drop.keep_prob == 0.9


@pytest.mark.parametrize(
    "source",
    [
        lambda i: SCHEDULE(i),  # a Python int step: weakly typed float32
        lambda i: SCHEDULE(jnp.int32(i)),  # an int32 count: strong float32
        lambda i: np.float32(SCHEDULE(i)),
    ],
    ids=["python_int_step", "int32_step", "np_float32"],
)
def test_a_schedule_passed_to_the_tutorial_step_compiles_it_once(source, tmp_path):
    model = _CNN(jax.random.key(0), keep_prob=0.9)
    tx = optax.adamw(1e-2, weight_decay=0.05)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    step, traces = _tutorial_step(tx, eqx.is_array)
    probes = []
    for i in range(3):
        model, opt_state, _, probe = step(model, opt_state, IMAGES, LABELS, jax.random.key(i), source(i))
        probes.append(probe)
    # A restored checkpoint continues in the same compiled step.
    path = tmp_path / "checkpoint.eqx"
    eqx.tree_serialise_leaves(path, (model, opt_state))
    template = (_CNN(jax.random.key(9), keep_prob=0.9), tx.init(eqx.filter(model, eqx.is_array)))
    model, opt_state = eqx.tree_deserialise_leaves(path, template)
    for i in range(3, 5):
        model, opt_state, _, probe = step(model, opt_state, IMAGES, LABELS, jax.random.key(i), source(i))
        probes.append(probe)
    assert len(traces) == 1
    _check_probes(probes)
    assert model.drop.keep_prob == 0.9


def test_tree_at_with_a_float_gives_a_new_fixed_keep_prob():
    layer = DropBlock(keep_prob=0.9, block_size=3)
    call = eqx.filter_jit(lambda layer, x, key: layer(x, key=key))
    key = jax.random.key(3)
    np.testing.assert_array_equal(call(layer, X_HWC, key), drop_block(key, X_HWC, 0.9, 3))
    layer = eqx.tree_at(lambda m: m.keep_prob, layer, 0.5)
    np.testing.assert_array_equal(call(layer, X_HWC, key), drop_block(key, X_HWC, 0.5, 3))
    np.testing.assert_array_equal(eqx.filter_jit(lambda x: layer(x, key=key, keep_prob=1.0))(X_HWC), X_HWC)


def test_a_traced_keep_prob_at_construction_is_refused():
    with pytest.raises(TypeError, match="keep_prob must be a concrete number"):
        jax.jit(lambda p: DropBlock(keep_prob=p, block_size=3))(0.9)


def test_equals_drop_block_for_the_same_key():
    key = jax.random.key(7)
    np.testing.assert_array_equal(
        DropBlock(keep_prob=0.7, block_size=3)(X_HWC, key=key), drop_block(key, X_HWC, 0.7, 3)
    )
    options = dict(
        spatial_axes=(1, 2), broadcast_dims=(0,), seed_region="everywhere", gamma="calibrated", normalize="expected"
    )
    np.testing.assert_array_equal(
        DropBlock(keep_prob=0.7, block_size=(3, 2), **options)(X_CHW, key=key),
        drop_block(key, X_CHW, 0.7, (3, 2), **options),
    )
    legacy = jax.random.PRNGKey(7)
    np.testing.assert_array_equal(
        DropBlock(keep_prob=0.7, block_size=3)(X_HWC, key=legacy), drop_block(legacy, X_HWC, 0.7, 3)
    )


def test_inference_returns_the_input_and_needs_no_key():
    training = DropBlock(keep_prob=0.5, block_size=3)
    assert DropBlock(keep_prob=0.5, block_size=3, inference=True)(X_HWC) is X_HWC
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
        DropBlock(keep_prob=0.9, block_size=3)(X_HWC)
    message = str(info.value)
    assert "key=" in message and "inference_mode" in message and "inference=True" in message


def test_vmap_over_keys_gives_each_sample_its_own_mask():
    layer = DropBlock(keep_prob=0.5, block_size=3)
    keys = jax.random.split(jax.random.key(5), 4)
    batch = jnp.stack([X_HWC] * 4)
    ys = jax.vmap(lambda x, k: layer(x, key=k))(batch, keys)
    for y, key in zip(ys, keys):
        np.testing.assert_array_equal(y, drop_block(key, X_HWC, 0.5, 3))
    assert not np.array_equal(ys[0] == 0, ys[1] == 0)


def test_vmap_over_unbatched_channels_first_inputs():
    layer = DropBlock(keep_prob=0.5, block_size=3, spatial_axes=(1, 2))
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
    layer = DropBlock(keep_prob=0.5, block_size=3, axis_name="batch")
    keys = jax.random.split(jax.random.key(8), 4)
    ones = jnp.ones((4, 8, 8, 3))
    ys = jax.vmap(lambda x, k: layer(x, key=k), axis_name="batch")(ones, keys)
    np.testing.assert_allclose(float(ys.sum()), float(ones.sum()), rtol=1e-5)


def test_options_are_static_and_keep_prob_is_a_float_leaf():
    layer = DropBlock(keep_prob=0.9, block_size=3, spatial_axes=[1, 2], broadcast_dims=[0])
    # keep_prob and the inference flag, neither of them an array an optimizer would see.
    assert jax.tree_util.tree_leaves(layer) == [0.9, False]
    assert type(layer.keep_prob) is float
    assert DropBlock(keep_prob=np.float32(0.5)).keep_prob == 0.5
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
        (dict(axis_name=3), TypeError, "axis_name"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        DropBlock(**kwargs)


def test_rank_dependent_arguments_fail_at_the_call_naming_the_argument():
    with pytest.raises(ValueError, match="broadcast_dims"):
        DropBlock(keep_prob=0.9, block_size=3, broadcast_dims=(0,))(X_HWC, key=jax.random.key(0))
    with pytest.raises(ValueError, match="spatial_axes"):
        DropBlock(keep_prob=0.9, block_size=3, spatial_axes=(1, 5))(X_CHW, key=jax.random.key(0))
    with pytest.raises(TypeError, match="key"):
        DropBlock(keep_prob=0.9, block_size=3)(X_HWC, key=0)


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
