"""Tests of the Keras 3 layer ``dropblock_jax.keras.DropBlock`` (JAX backend)."""

import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from conftest import assert_mean_matches
from dropblock_jax import drop_block
from dropblock_jax.keras import DropBlock, set_keep_prob

X_NHWC = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")


def _key_of_next_draw(layer):
    """The key the layer's next training call draws: its generator state as threefry key data."""
    return jax.random.wrap_key_data(jnp.asarray(layer.seed_generator.state.value), impl="threefry2x32")


def _channels_first(x):
    return np.moveaxis(x, -1, 1)


class _ProbedDropBlock(DropBlock):
    """Counts the traces of ``call`` in training and reports each drawn mask with the rate it used."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.training_traces = 0
        self.draws = []

    def call(self, inputs, training=None):
        outputs = super().call(inputs, training=training)
        if training:
            self.training_traces += 1
            # Inputs are conv outputs, never exactly zero: a zero output is a dropped unit.
            kept = (outputs != 0) | (inputs == 0)
            jax.debug.callback(
                lambda keep_prob, mask: self.draws.append((float(keep_prob), np.asarray(mask))),
                self.keep_prob.value,
                kept,
                ordered=True,
            )
        return outputs


# The rate each of the 4 steps (2 epochs of 2 batches) is set to; the last two are equal,
# so their masks differ only because the generator advanced.
SCHEDULE = (0.8, 0.6, 0.4, 0.4)


def test_fit_follows_a_schedule_with_one_trace_and_new_masks_every_step():
    keras.utils.set_random_seed(0)
    drop = _ProbedDropBlock(keep_prob=0.9, block_size=3, gamma="calibrated", seed=3, name="drop")
    model = keras.Sequential(
        [
            keras.Input((8, 8, 4)),
            keras.layers.Conv2D(8, 3, padding="same"),
            drop,
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 8, 8, 4)).astype("float32")
    y = rng.integers(0, 2, 64)

    class Schedule(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.step = 0

        def on_train_batch_begin(self, batch, logs=None):
            assert set_keep_prob(self.model, SCHEDULE[self.step]) == 1
            self.step += 1

    state_before = np.asarray(drop.seed_generator.state.value)
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0, callbacks=[Schedule()])
    jax.effects_barrier()

    assert drop.training_traces == 1
    assert [keep for keep, _ in drop.draws] == pytest.approx(SCHEDULE)
    for keep_prob, mask in drop.draws:
        assert mask.shape == (32, 8, 8, 8)
        # Masks of different samples and channels are independent; with the calibrated
        # gamma each one's expected kept fraction is keep_prob.
        assert_mean_matches(mask.mean(axis=(1, 2)), keep_prob)
    masks = [mask for _, mask in drop.draws]
    for i in range(len(masks)):
        for j in range(i):
            assert (masks[i] != masks[j]).any(), (i, j)
    # One draw per step, written back to the layer after fit.
    np.testing.assert_array_equal(
        np.asarray(drop.seed_generator.state.value), [state_before[0], state_before[1] + len(SCHEDULE)]
    )
    assert float(drop.keep_prob.value) == pytest.approx(SCHEDULE[-1])


def test_an_assignment_through_callback_model_reaches_every_step():
    # The plain Keras way: Callback.model writes the trainer's state back first.
    drop = _ProbedDropBlock(keep_prob=0.9, block_size=3, seed=0, name="drop")
    model = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(2, 1), drop, keras.layers.Flatten()])
    model.compile("sgd", "mse")

    class Schedule(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.model.get_layer("drop").keep_prob.assign(0.5 + 0.1 * batch)

    x = np.random.default_rng(2).normal(size=(12, 8, 8, 2)).astype("float32")
    model.fit(x, np.zeros((12, 128), "float32"), batch_size=4, verbose=0, callbacks=[Schedule()])
    jax.effects_barrier()
    assert [keep for keep, _ in drop.draws] == pytest.approx([0.5, 0.6, 0.7])
    assert drop.training_traces == 1


@pytest.mark.parametrize("training", [False, None])
def test_not_training_is_the_identity(training):
    layer = DropBlock(keep_prob=0.5, block_size=3)
    np.testing.assert_array_equal(layer(X_NHWC, training=training), X_NHWC)


def test_predict_and_evaluate_are_the_identity():
    model = keras.Sequential([keras.Input((8, 8, 3)), DropBlock(keep_prob=0.3, block_size=3)])
    model.compile(loss="mse")
    np.testing.assert_array_equal(model.predict(X_NHWC, verbose=0), X_NHWC)
    assert model.evaluate(X_NHWC, X_NHWC, verbose=0) == 0.0
    # ... while training drops units.
    assert (np.asarray(model(X_NHWC, training=True)) == 0).any()


@pytest.mark.parametrize(
    ("data_format", "shape", "block_size", "spatial_axes"),
    [
        ("channels_last", (4, 8, 8, 3), 3, (1, 2)),
        ("channels_first", (4, 3, 8, 8), 3, (2, 3)),
        ("channels_first", (4, 3, 8, 8), (2, 4), (2, 3)),
        ("channels_last", (4, 16, 3), (5,), (1,)),
        ("channels_first", (4, 3, 16), 5, (2,)),
        ("channels_first", (2, 3, 6, 6, 6), (2, 3, 2), (2, 3, 4)),
    ],
)
def test_result_is_drop_blocks_over_the_axes_of_the_data_format(data_format, shape, block_size, spatial_axes):
    x = np.random.default_rng(3).normal(size=shape).astype("float32")
    layer = DropBlock(keep_prob=0.7, block_size=block_size, data_format=data_format, seed=11)
    key = _key_of_next_draw(layer)
    result = np.asarray(layer(x, training=True))
    expected = drop_block(key, x, 0.7, block_size, spatial_axes=spatial_axes)
    np.testing.assert_array_equal(result, expected)
    # The axes matter: the other layout's axes give other blocks for the same key.
    shift = -1 if data_format == "channels_first" else 1
    other_axes = tuple(axis + shift for axis in spatial_axes)
    assert not np.array_equal(result, drop_block(key, x, 0.7, block_size, spatial_axes=other_axes))
    # The generator advanced: the next call draws another mask.
    assert not np.array_equal(result, np.asarray(layer(x, training=True)))


def test_data_format_defaults_to_keras_image_data_format():
    assert DropBlock().data_format == keras.config.image_data_format()
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        assert DropBlock().data_format == "channels_first"
    finally:
        keras.config.set_image_data_format(previous)


def test_options_reach_drop_block():
    options = {"seed_region": "everywhere", "gamma": "calibrated", "normalize": "expected"}
    layer = DropBlock(keep_prob=0.6, block_size=(3, 2), seed=5, **options)
    key = _key_of_next_draw(layer)
    np.testing.assert_array_equal(
        layer(X_NHWC, training=True), drop_block(key, X_NHWC, 0.6, (3, 2), spatial_axes=(1, 2), **options)
    )


def test_mixed_precision_keeps_a_float32_rate():
    layer = DropBlock(keep_prob=0.7, block_size=3, dtype="mixed_float16", seed=2)
    key = _key_of_next_draw(layer)
    result = layer(X_NHWC, training=True)
    assert result.dtype == jnp.float16
    assert layer.keep_prob.dtype == "float32"
    np.testing.assert_array_equal(result, drop_block(key, X_NHWC.astype(np.float16), 0.7, 3))


def test_get_config_and_from_config_round_trip():
    layer = DropBlock(
        keep_prob=0.8,
        block_size=(3, 5),
        data_format="channels_first",
        seed_region="everywhere",
        gamma="calibrated",
        normalize="none",
        seed=7,
        name="blocks",
    )
    config = layer.get_config()
    assert {key: config[key] for key in ("keep_prob", "block_size", "data_format", "seed", "name")} == {
        "keep_prob": pytest.approx(0.8),
        "block_size": (3, 5),
        "data_format": "channels_first",
        "seed": 7,
        "name": "blocks",
    }
    assert (config["seed_region"], config["gamma"], config["normalize"]) == ("everywhere", "calibrated", "none")
    clone = DropBlock.from_config(config)
    assert clone.get_config() == config
    # The config holds the current rate.
    layer.keep_prob.assign(0.55)
    assert DropBlock.from_config(layer.get_config()).get_config()["keep_prob"] == pytest.approx(0.55)


# Keras's Variable.__array__ takes no copy keyword, which NumPy 2 warns about when
# model.save converts the variables; that warning is Keras's, not this layer's.
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_keras_file_round_trip_keeps_config_rate_and_random_state(tmp_path):
    model = keras.Sequential(
        [keras.Input((8, 8, 3)), DropBlock(keep_prob=0.9, block_size=(3, 3), gamma="calibrated", seed=4, name="drop")]
    )
    assert set_keep_prob(model, 0.6) == 1
    model(X_NHWC, training=True)  # advance the generator
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    layer, original = loaded.get_layer("drop"), model.get_layer("drop")
    assert type(layer) is DropBlock
    assert layer.get_config() == original.get_config()
    assert float(layer.keep_prob.value) == pytest.approx(0.6)
    np.testing.assert_array_equal(layer.seed_generator.state.value, original.seed_generator.state.value)
    np.testing.assert_array_equal(loaded(X_NHWC, training=True), model(X_NHWC, training=True))


def test_set_keep_prob_counts_layers_and_refuses_a_model_without_any():
    inner = keras.Sequential([keras.Input((8, 8, 3)), DropBlock(keep_prob=0.9, block_size=3)])
    outer = keras.Sequential([keras.Input((8, 8, 3)), inner, DropBlock(keep_prob=0.9, block_size=3)])
    assert set_keep_prob(outer, 0.75) == 2
    assert float(inner.layers[0].keep_prob.value) == pytest.approx(0.75)
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"no dropblock_jax\.keras\.DropBlock"):
        set_keep_prob(plain, 0.5)
    with pytest.raises(ValueError, match=r"value must be in \[0, 1\], got 1.5"):
        set_keep_prob(outer, 1.5)


def test_keep_prob_and_block_size_are_keyword_only():
    with pytest.raises(TypeError, match="positional"):
        DropBlock(0.1)
    with pytest.raises(TypeError, match="positional"):
        DropBlock(0.9, 3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"keep_prob": 1.5}, ValueError, r"keep_prob must be in \[0, 1\], got 1.5"),
        ({"keep_prob": "0.9"}, TypeError, "keep_prob must be a real number"),
        ({"keep_prob": np.ones(2)}, ValueError, "keep_prob must be a scalar"),
        ({"block_size": 0}, ValueError, "block_size entries must be >= 1"),
        ({"block_size": "3"}, TypeError, "block_size must be an int or a non-empty tuple"),
        ({"data_format": "NHWC"}, ValueError, "data_format must be one of .*got 'NHWC'"),
        ({"seed_region": "same"}, ValueError, "seed_region must be one of"),
        ({"gamma": "exact"}, ValueError, "gamma must be one of"),
        ({"normalize": "mean"}, ValueError, "normalize must be one of"),
        ({"seed": 1.5}, TypeError, "seed must be an int or None, got 1.5"),
        ({"seed": True}, TypeError, "seed must be an int or None, got True"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        DropBlock(**kwargs)


def test_inputs_that_do_not_fit_the_block_size_or_rank_are_refused():
    with pytest.raises(ValueError, match=r"block_size must have one entry per spatial axis.*has 2.*\(3,\)"):
        keras.Sequential([keras.Input((8, 8, 3)), DropBlock(block_size=(3,))])
    with pytest.raises(ValueError, match="rank >= 3"):
        DropBlock(block_size=3)(np.ones((4, 8), "float32"), training=True)
    with pytest.raises(TypeError, match="x must be a floating array"):
        DropBlock(block_size=3)(np.ones((4, 8, 8, 3), "int32"), training=True)


def test_other_backends_are_refused_at_construction():
    # Keras's numpy backend needs no other package.
    code = "from dropblock_jax.keras import DropBlock\nDropBlock()\n"
    env = {**os.environ, "KERAS_BACKEND": "numpy"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr
    assert "KERAS_BACKEND=jax" in result.stderr
    assert "'numpy' backend" in result.stderr


def test_import_without_keras_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras", None)
    monkeypatch.delitem(sys.modules, "dropblock_jax.keras")
    with pytest.raises(ImportError, match=r"pip install dropblock-jax\[keras\]"):
        importlib.import_module("dropblock_jax.keras")
