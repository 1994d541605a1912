"""Tests of the Equinox layer ``dropblock_jax.equinox.DropBlock``."""

import importlib
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dropblock_jax import drop_block
from dropblock_jax.equinox import DropBlock
from helpers import PYPROJECT, is_union_of_blocks

X_HWC = jax.random.normal(jax.random.key(42), (8, 8, 3))
X_CHW = jnp.moveaxis(X_HWC, -1, 0)


class _CNN(eqx.Module):
    conv: eqx.nn.Conv2d
    drop: DropBlock
    head: eqx.nn.Linear

    def __init__(self, key, keep_prob=1.0):
        conv_key, head_key = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(3, 8, 3, padding=1, key=conv_key)
        self.drop = DropBlock(keep_prob=keep_prob, block_size=3)
        self.head = eqx.nn.Linear(8, 4, key=head_key)

    def __call__(self, x, *, key=None, keep_prob=None):
        x = self.drop(jax.nn.relu(self.conv(x)), key=key, keep_prob=keep_prob)
        return self.head(x.mean(axis=(1, 2)))


def _tutorial_step(tx, filter_spec, schedule=None):
    """The train step of Equinox's tutorials: optax over eqx.filter(model, filter_spec), under filter_jit.

    Besides the loss it returns what the DropBlock layer does to ones at the step's
    keep_prob, and the next step number. With ``schedule`` the keep_prob is ``schedule``
    of the step number, an array the training loop carries; without, the argument.
    """
    traces = []

    @eqx.filter_jit
    def step(model, opt_state, images, labels, key, keep_prob=None, step_number=None):
        traces.append(None)  # runs once per trace, not per call
        if schedule is not None:
            keep_prob = schedule(step_number)

        def loss_fn(model):
            keys = jax.random.split(key, images.shape[0])
            logits = jax.vmap(lambda x, k: model(x, key=k, keep_prob=keep_prob))(images, keys)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, filter_spec))
        probe = model.drop(jnp.ones((8, 8, 8)), key=key, keep_prob=keep_prob)
        next_step = None if step_number is None else step_number + 1
        return eqx.apply_updates(model, updates), opt_state, loss, probe, next_step

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
        model, opt_state, loss, _, _ = step(model, opt_state, IMAGES, LABELS, jax.random.key(i))
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
        model, opt_state, _, _, _ = step(model, opt_state, IMAGES, LABELS, jax.random.key(i))
    assert len(traces) == 1
    assert model.drop.keep_prob == 0.9
    key = jax.random.key(1234)
    np.testing.assert_array_equal(model.drop(X_CHW, key=key), drop_block(key, X_CHW, 0.9, 3, spatial_axes=(1, 2)))


# Five steps, 0 .. 4: the last one uses the target.
STEPS = 5
FINAL_KEEP_PROB = 0.6
SCHEDULE = optax.linear_schedule(init_value=1.0, end_value=FINAL_KEEP_PROB, transition_steps=STEPS - 1)


def _check_probes(probes):
    """Each step's layer dropped at that step's keep_prob: from 1 (nothing) at the first, down to the target."""
    ones = jnp.ones((8, 8, 8))
    assert len(probes) == STEPS
    for i, probe in enumerate(probes):
        # The schedule by hand: 1 at step 0, FINAL_KEEP_PROB at step STEPS - 1.
        keep_prob = 1.0 - (1.0 - FINAL_KEEP_PROB) * i / (STEPS - 1)
        expected = drop_block(jax.random.key(i), ones, keep_prob, 3, spatial_axes=(1, 2))
        np.testing.assert_allclose(probe, expected, rtol=1e-6)
    assert (probes[0] == 1).all() and (probes[-1] == 0).any()


def test_a_schedule_of_a_step_the_loop_carries_works_with_any_optax_chain_and_compiles_once():
    # A learning-rate schedule puts a second "count" in AdamW's state, so the optimizer's
    # state cannot be asked for the step; the loop's own carry can.
    model = _CNN(jax.random.key(0), keep_prob=0.9)
    tx = optax.adamw(optax.cosine_decay_schedule(1e-2, decay_steps=STEPS), weight_decay=0.05)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    step, traces = _tutorial_step(tx, eqx.is_array, schedule=SCHEDULE)
    step_number = jnp.asarray(0)
    probes = []
    for i in range(STEPS):
        model, opt_state, _, probe, step_number = step(
            model, opt_state, IMAGES, LABELS, jax.random.key(i), step_number=step_number
        )
        probes.append(probe)
    assert len(traces) == 1
    assert int(step_number) == STEPS
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
        model, opt_state, _, probe, _ = step(model, opt_state, IMAGES, LABELS, jax.random.key(i), source(i))
        probes.append(probe)
    # A restored checkpoint continues in the same compiled step.
    path = tmp_path / "checkpoint.eqx"
    eqx.tree_serialise_leaves(path, (model, opt_state))
    template = (_CNN(jax.random.key(9), keep_prob=0.9), tx.init(eqx.filter(model, eqx.is_array)))
    model, opt_state = eqx.tree_deserialise_leaves(path, template)
    for i in range(3, STEPS):
        model, opt_state, _, probe, _ = step(model, opt_state, IMAGES, LABELS, jax.random.key(i), source(i))
        probes.append(probe)
    assert len(traces) == 1
    _check_probes(probes)
    assert model.drop.keep_prob == 0.9


def test_tree_at_with_a_float_gives_a_new_fixed_keep_prob():
    layer = DropBlock(keep_prob=0.9, block_size=3)
    call = eqx.filter_jit(lambda layer, x, key: layer(x, key=key))
    key = jax.random.key(3)
    np.testing.assert_array_equal(call(layer, X_CHW, key), drop_block(key, X_CHW, 0.9, 3, spatial_axes=(1, 2)))
    layer = eqx.tree_at(lambda m: m.keep_prob, layer, 0.5)
    np.testing.assert_array_equal(call(layer, X_CHW, key), drop_block(key, X_CHW, 0.5, 3, spatial_axes=(1, 2)))
    np.testing.assert_array_equal(eqx.filter_jit(lambda x: layer(x, key=key, keep_prob=1.0))(X_CHW), X_CHW)


def test_a_traced_keep_prob_at_construction_is_refused():
    with pytest.raises(TypeError, match="keep_prob must be a concrete number"):
        jax.jit(lambda p: DropBlock(keep_prob=p, block_size=3))(0.9)


@pytest.mark.parametrize(
    ("shape", "block_size", "spatial_axes"),
    [
        ((3, 8, 8), 3, (1, 2)),  # (C, H, W), as eqx.nn.Conv2d gives it
        ((3, 8, 8), (3, 2), (1, 2)),
        ((3, 16), 5, (1,)),  # (C, T): an int is a cube over the one spatial axis
        ((2, 6, 6, 6), 3, (1, 2, 3)),  # (C, D, H, W)
        ((2, 6, 6, 6), (2, 3, 2), (1, 2, 3)),
    ],
)
def test_the_default_axes_are_those_after_the_channels_and_the_result_is_drop_blocks(shape, block_size, spatial_axes):
    x = jax.random.normal(jax.random.key(11), shape)
    key = jax.random.key(7)
    result = DropBlock(keep_prob=0.7, block_size=block_size)(x, key=key)
    np.testing.assert_array_equal(result, drop_block(key, x, 0.7, block_size, spatial_axes=spatial_axes))
    assert (result == 0).any()


def test_equals_drop_block_for_a_channels_last_sample_and_a_legacy_key():
    key = jax.random.key(7)
    # A channels-last sample names its axes; they are drop_block's default.
    np.testing.assert_array_equal(
        DropBlock(keep_prob=0.7, block_size=3, spatial_axes=(0, 1))(X_HWC, key=key),
        drop_block(key, X_HWC, 0.7, (3, 3)),
    )
    legacy = jax.random.PRNGKey(7)
    np.testing.assert_array_equal(
        DropBlock(keep_prob=0.7, block_size=3)(X_CHW, key=legacy),
        drop_block(legacy, X_CHW, 0.7, 3, spatial_axes=(1, 2)),
    )


def test_on_a_conv2d_output_blocks_lie_over_h_and_w_not_over_c_and_h():
    conv = eqx.nn.Conv2d(3, 8, 3, padding=1, key=jax.random.key(0))
    x = conv(jax.random.normal(jax.random.key(1), (3, 12, 12)))  # (C, H, W) = (8, 12, 12)
    y = DropBlock(keep_prob=0.8, block_size=3)(x, key=jax.random.key(2))
    dropped = np.asarray((y == 0) & (x != 0))
    assert dropped.any()
    # Every channel's (H, W) map has holes made of whole 3x3 blocks, its own holes.
    for channel in dropped:
        assert is_union_of_blocks(channel, (3, 3), "valid")
    assert not (dropped == dropped[:1]).all()
    # Blocks over (C, H), with W taken for channels, would give those holes in the
    # (C, H) slices instead.
    assert not all(is_union_of_blocks(dropped[:, :, w], (3, 3), "valid") for w in range(dropped.shape[2]))


def test_inference_returns_the_input_and_needs_no_key():
    training = DropBlock(keep_prob=0.5, block_size=3)
    assert DropBlock(keep_prob=0.5, block_size=3, inference=True)(X_CHW) is X_CHW
    assert training(X_CHW, inference=True) is X_CHW
    frozen = eqx.nn.inference_mode(training)
    assert frozen.inference is True
    assert frozen(X_CHW) is X_CHW
    # inference_mode reaches a DropBlock nested in a model, and back.
    model = eqx.nn.inference_mode(_CNN(jax.random.key(0)))
    assert model.drop.inference is True
    assert eqx.nn.inference_mode(model, value=False).drop.inference is False
    # A call-time flag overrides the field both ways.
    key = jax.random.key(1)
    np.testing.assert_array_equal(frozen(X_CHW, key=key, inference=False), training(X_CHW, key=key))


def test_training_without_a_key_is_a_runtime_error_that_says_how_to_fix_it():
    # RuntimeError, as eqx.nn.Dropout raises.
    with pytest.raises(RuntimeError, match="no key") as info:
        DropBlock(keep_prob=0.9, block_size=3)(X_CHW)
    message = str(info.value)
    assert "key=" in message and "inference_mode" in message and "inference=True" in message


def test_vmap_over_unbatched_channels_last_inputs_that_name_their_axes():
    layer = DropBlock(keep_prob=0.5, block_size=3, spatial_axes=(0, 1))
    keys = jax.random.split(jax.random.key(5), 4)
    batch = jnp.stack([X_HWC] * 4)
    ys = jax.vmap(lambda x, k: layer(x, key=k))(batch, keys)
    for y, key in zip(ys, keys):
        np.testing.assert_array_equal(y, drop_block(key, X_HWC, 0.5, (3, 3)))
    assert not np.array_equal(ys[0] == 0, ys[1] == 0)


def test_vmap_over_unbatched_channels_first_inputs_gives_each_sample_its_own_mask():
    layer = DropBlock(keep_prob=0.5, block_size=3)
    keys = jax.random.split(jax.random.key(6), 3)
    batch = jnp.stack([X_CHW] * 3)
    ys = jax.vmap(lambda x, k: layer(x, key=k))(batch, keys)
    assert ys.shape == batch.shape
    for y, key in zip(ys, keys):
        np.testing.assert_array_equal(y, drop_block(key, X_CHW, 0.5, 3, spatial_axes=(1, 2)))
        # Blocks extend over H and W, not over channels: each channel has its own holes.
        dropped = np.asarray(y == 0)
        assert dropped.any() and not (dropped == dropped[:1]).all()
    assert not np.array_equal(ys[0] == 0, ys[1] == 0)


def test_vmap_with_axis_name_normalizes_over_the_whole_batch():
    layer = DropBlock(keep_prob=0.5, block_size=3, axis_name="batch")
    keys = jax.random.split(jax.random.key(8), 4)
    ones = jnp.ones((4, 3, 8, 8))
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
    # Without spatial_axes an int stays an int: a cube over however many axes the sample has.
    assert DropBlock(block_size=3).block_size == 3 and DropBlock(block_size=[3, 2]).block_size == (3, 2)


# Arguments that fail at construction for Equinox's layout (tests/test_layers.py checks those
# that fail for every layer).
@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(block_size=(3, 3, 3), spatial_axes=(1, 2)), ValueError, "block_size"),
        # Axis 1 is spatial in every sample under the default axes.
        (dict(broadcast_dims=(1,)), ValueError, "broadcast_dims"),
        (dict(axis_name=3), TypeError, "axis_name"),
    ],
)
def test_bad_arguments_fail_at_construction_with_drop_blocks_message(kwargs, error, name):
    with pytest.raises(error, match=name) as at_construction:
        DropBlock(**kwargs)
    # What drop_block says for a (C, H, W) sample with the same arguments.
    arguments = {"keep_prob": 0.9, "block_size": (3, 3), "spatial_axes": (1, 2), **kwargs}
    with pytest.raises(error) as from_drop_block:
        drop_block(jax.random.key(0), X_CHW, **arguments)
    assert str(at_construction.value) == str(from_drop_block.value)


def test_a_bad_inference_flag_fails_at_construction():
    with pytest.raises(TypeError, match="inference must be a bool, got 'yes'"):
        DropBlock(inference="yes")


def test_rank_dependent_arguments_fail_at_the_call_naming_the_argument():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"broadcast_dims must not contain a spatial axis.*\(1,\)"):
        DropBlock(keep_prob=0.9, block_size=3, broadcast_dims=(1,))(X_CHW, key=key)
    with pytest.raises(ValueError, match="spatial_axes entry 5 is out of range"):
        DropBlock(keep_prob=0.9, block_size=3, spatial_axes=(1, 5))(X_CHW, key=key)
    with pytest.raises(ValueError, match=r"block_size must have one entry per spatial axis \(1\), got \(3, 3\)"):
        DropBlock(keep_prob=0.9, block_size=(3, 3))(jnp.ones((4, 16)), key=key)
    with pytest.raises(ValueError, match=r"default spatial_axes .* shape \(4,\); pass spatial_axes"):
        DropBlock(keep_prob=0.9, block_size=3)(jnp.ones(4), key=key)
    with pytest.raises(TypeError, match="key"):
        DropBlock(keep_prob=0.9, block_size=3)(X_CHW, key=0)


def test_without_equinox_the_import_error_gives_the_line_that_installs_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "equinox", None)
    monkeypatch.delitem(sys.modules, "dropblock_jax.equinox")
    (requirement,) = PYPROJECT["project"]["optional-dependencies"]["equinox"]
    with pytest.raises(ImportError, match="needs Equinox, which is not installed") as info:
        importlib.import_module("dropblock_jax.equinox")
    # Quoted, so that zsh does not read the >= as a redirection.
    assert str(info.value).endswith(f"pip install '{requirement}'")
