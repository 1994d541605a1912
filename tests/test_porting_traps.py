"""What a user porting from another framework tries first: each fails at once, saying what to write.

Assigning ``keep_prob`` on the NNX and Keras layers, a drop rate given to the functions and
to ``models.resnet``, a traced ``block_size``, a seed for a key, an ``nnx.Rngs`` without a
dropout stream, an integer input in evaluation, and what Keras writes in a saved config.
"""

import collections
import json
import os
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx

import dropblock_jax as db
from dropblock_jax import keras as db_keras
from dropblock_jax import nnx as db_nnx
from dropblock_jax.models import resnet
from helpers import ROOT, is_union_of_blocks

X = jnp.ones((2, 12, 12, 3))


# ---- keep_prob assigned on a layer ----


def test_nnx_assigned_keep_prob_is_stored_as_set_keep_prob_stores_it():
    layer = db_nnx.DropBlock(keep_prob=0.9, block_size=3, rngs=nnx.Rngs(dropout=0))
    stored = layer.keep_prob
    layer.keep_prob = 0.6  # as one sets nnx.Dropout.rate
    # Written into the variable, which keeps its place in every state taken of the model.
    assert layer.keep_prob is stored
    assert layer.keep_prob[...].dtype == jnp.float32 and float(layer.keep_prob[...]) == np.float32(0.6)
    key = jax.random.key(1)
    np.testing.assert_array_equal(layer(X, rngs=key), db.drop_block(key, X, 0.6, 3))
    assert db_nnx.set_keep_prob(layer, 0.8) == 1  # still a variable set_keep_prob can write
    np.testing.assert_array_equal(layer(X, rngs=key), db.drop_block(key, X, 0.8, 3))


def test_nnx_assigned_keep_prob_does_not_retrace_and_set_keep_prob_works_after_it():
    layer = db_nnx.DropBlock(keep_prob=0.9, block_size=3, rngs=nnx.Rngs(dropout=0))
    traces = []

    @nnx.jit
    def step(layer, x, key):
        traces.append(None)
        return layer(x, rngs=key)

    key = jax.random.key(2)
    step(layer, X, key)
    layer.keep_prob = 0.5
    np.testing.assert_array_equal(step(layer, X, key), db.drop_block(key, X, 0.5, 3))
    db_nnx.set_keep_prob(layer, 0.7)
    np.testing.assert_array_equal(step(layer, X, key), db.drop_block(key, X, 0.7, 3))
    assert len(traces) == 1


def test_nnx_keep_prob_assigned_inside_a_jitted_function_reaches_the_layer():
    layer = db_nnx.DropBlock(keep_prob=0.9, block_size=3, rngs=nnx.Rngs(dropout=0))

    @nnx.jit
    def assign(layer, value):
        layer.keep_prob = value

    assign(layer, 0.75)
    assert float(layer.keep_prob[...]) == np.float32(0.75)
    db_nnx.set_keep_prob(layer, 0.7)  # once "JAX arrays are immutable"
    assert float(layer.keep_prob[...]) == np.float32(0.7)


@pytest.mark.parametrize("value", [1.5, -0.1, "0.8"])
def test_nnx_a_bad_assigned_keep_prob_fails_at_the_assignment(value):
    layer = db_nnx.DropBlock(keep_prob=0.9, block_size=3, rngs=nnx.Rngs(dropout=0))
    with pytest.raises((TypeError, ValueError), match="keep_prob"):
        layer.keep_prob = value
    assert float(layer.keep_prob[...]) == np.float32(0.9)


def _keras_model(layer, compile=True):
    model = keras.Sequential([keras.Input((8, 8, 2)), layer, keras.layers.Flatten(), keras.layers.Dense(1)])
    if compile:
        model.compile("sgd", "mse")
    return model


class _RecordsKeepProb(db_keras.DropBlock):
    """Reports the keep_prob every training step reads, and counts the traces of the training call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.read, self.traces = [], 0

    def call(self, inputs, training=None):
        if training:
            self.traces += 1
            jax.debug.callback(lambda k: self.read.append(float(k)), self.keep_prob.value, ordered=True)
        return super().call(inputs, training=training)


def test_keras_assigned_keep_prob_writes_the_variable_fit_reads_without_recompiling():
    layer = _RecordsKeepProb(keep_prob=0.9, block_size=3, seed=0)
    model = _keras_model(layer)
    data = np.ones((4, 8, 8, 2), "float32"), np.ones((4, 1), "float32")
    model.fit(*data, batch_size=4, epochs=1, verbose=0)
    layer.keep_prob = 0.6
    assert isinstance(layer.keep_prob, keras.Variable)
    model.fit(*data, batch_size=4, epochs=1, verbose=0)
    assert db_keras.set_keep_prob(model, 0.7) == 1  # once "'float' object has no attribute 'assign'"
    model.fit(*data, batch_size=4, epochs=1, verbose=0)
    np.testing.assert_allclose(layer.read, [0.9, 0.6, 0.7], rtol=1e-7)
    assert layer.traces == 1


def test_keras_keep_prob_assigned_during_fit_fails_at_once_naming_set_keep_prob():
    layer = db_keras.DropBlock(keep_prob=0.9, block_size=3, seed=0)
    model = _keras_model(layer)
    errors = []

    class Assign(keras.callbacks.Callback):
        # Reads neither self.model nor logs, which would write the trainer's state back.
        def on_train_batch_begin(self, batch, logs=None):
            try:
                layer.keep_prob = 0.5 + 0.1 * batch
            except RuntimeError as error:
                errors.append(str(error))

    model.fit(np.ones((12, 8, 8, 2)), np.ones((12, 1)), batch_size=4, verbose=0, callbacks=[Assign()])
    # Before the first step the trainer holds nothing; from then on the assignment would be lost.
    assert len(errors) == 2, errors
    assert all("set_keep_prob(self.model" in error for error in errors), errors
    assert float(layer.keep_prob.value) == np.float32(0.5)


def test_keras_config_holds_the_number_given_not_its_float32():
    layer = db_keras.DropBlock(keep_prob=0.9, block_size=3)
    assert repr(layer.get_config()["keep_prob"]) == "0.9"
    layer.keep_prob = 0.85
    assert repr(layer.get_config()["keep_prob"]) == "0.85"
    model = _keras_model(layer)
    db_keras.set_keep_prob(model, 0.8)
    assert repr(layer.get_config()["keep_prob"]) == "0.8"
    layer.keep_prob.assign(0.5)  # written around the layer: the variable's value is what holds
    assert layer.get_config()["keep_prob"] == 0.5


# Keras's own saving of a variable warns under NumPy 2; the file is written all the same.
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_keras_saved_file_stores_the_number_given(tmp_path):
    model = _keras_model(db_keras.DropBlock(keep_prob=0.9, block_size=3, name="dropblock"), compile=False)
    path = tmp_path / "model.keras"
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    (saved,) = [layer for layer in config["config"]["layers"] if layer["config"]["name"] == "dropblock"]
    assert repr(saved["config"]["keep_prob"]) == "0.9"


# ---- a drop rate where keep_prob belongs ----


@pytest.mark.parametrize("name", ["rate", "drop_prob", "drop_rate", "p"])
def test_the_functions_answer_a_drop_rate_with_keep_prob(name):
    key = jax.random.key(0)
    calls = {
        "drop_block": (lambda: db.drop_block(key, X, **{name: 0.1}), "drop_block(key, x, keep_prob=0.9)"),
        "block_mask": (lambda: db.block_mask(key, X.shape, **{name: 0.1}), "block_mask(key, shape, keep_prob=0.9)"),
        "resnet": (lambda: resnet(50, **{name: 0.1}, rngs=nnx.Rngs(0)), "resnet(50, keep_prob=0.9)"),
    }
    for function, (call, example) in calls.items():
        with pytest.raises(TypeError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"{function} got {name}=0.1, but it takes keep_prob"), message
        assert "keep_prob = 1 - r" in message and example in message, message


def test_a_positional_keep_prob_below_one_half_stays_legal_and_keeps_that_fraction():
    # drop_block(key, x, 0.1, ...) keeps about 10%: keep_prob is the fraction kept.
    x = jnp.ones((8, 32, 32, 4))
    y = db.drop_block(jax.random.key(0), x, 0.1, (3, 3), gamma="calibrated", normalize="none")
    kept = float((y != 0).mean())
    # Calibrated: the expected kept fraction is exactly keep_prob; 32768 units, many blocks.
    assert abs(kept - 0.1) < 0.03, kept


def test_the_wrapped_functions_keep_their_signatures_for_jit():
    key = jax.random.key(0)
    step = jax.jit(db.drop_block, static_argnames=("block_size",))
    np.testing.assert_array_equal(step(key, X, 0.7, block_size=3), db.drop_block(key, X, 0.7, 3))


# ---- errors that name the fix ----


def test_a_traced_block_size_says_it_must_be_static():
    with pytest.raises(TypeError) as info:
        jax.jit(lambda b: db.drop_block(jax.random.key(0), X, 0.9, b))(3)
    message = str(info.value)
    assert "block_size" in message and "static Python int" in message and "static_argnames" in message, message
    with pytest.raises(TypeError, match="static Python int"):
        jax.jit(lambda b: db.block_mask(jax.random.key(0), X.shape, 0.9, (b, 3)))(3)


@pytest.mark.parametrize("key", [0, 0.5, np.float32(1.0), "key"])
def test_a_seed_given_for_a_key_says_how_to_make_one(key):
    with pytest.raises(TypeError) as info:
        db.drop_block(key, X, 0.9, 3)
    assert "jax.random.key(0)" in str(info.value), str(info.value)


def test_an_nnx_rngs_without_a_dropout_stream_names_dropblock_and_the_fix():
    for build in [
        lambda: db_nnx.DropBlock(keep_prob=0.9, block_size=3, rngs=nnx.Rngs(params=0)),
        lambda: db_nnx.DropBlock(keep_prob=0.9, block_size=3)(X, rngs=nnx.Rngs(params=0)),
    ]:
        with pytest.raises(ValueError) as info:
            build()
        message = str(info.value)
        assert "DropBlock" in message and "'dropout'" in message and "nnx.Rngs(dropout=0)" in message, message


def test_an_integer_input_fails_in_evaluation_too():
    images = jnp.ones((2, 8, 8, 3), jnp.int32)
    linen = db.DropBlock(keep_prob=0.9, block_size=3)
    layer = db_nnx.DropBlock(keep_prob=0.9, block_size=3, rngs=nnx.Rngs(dropout=0))
    layer.eval()
    for evaluate in [lambda: linen.apply({}, images, deterministic=True), lambda: layer(images)]:
        with pytest.raises(TypeError, match=r"x must be a floating array .*got dtype int32"):
            evaluate()


# ---- what the docs say about layout and clipping is what the code does ----


def _regularized_map_sizes(image_size):
    """How many of resnet(50)'s places see each (H, W), for square images of ``image_size``, traced only."""
    model = resnet(50, 10, base_width=8, rngs=nnx.Rngs(params=0, dropout=1))
    sizes = collections.Counter()

    def record(y, place, stages_from_last):
        sizes[y.shape[1:3]] += 1
        return y

    graphdef, state = nnx.split(model)
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x, perturb=record), state, images)
    return sizes


def test_the_recipe_and_resnet_say_that_block_7_drops_whole_maps_at_64_pixels():
    # Groups 3 and 4 (6 and 3 blocks, 4 places a block) see the image divided by 16 and 32,
    # but the first place of each group, before the strided 3x3 convolution, the size before.
    for size in (64, 224):
        assert _regularized_map_sizes(size) == {
            (size // 8,) * 2: 1,
            (size // 16,) * 2: 6 * 4 - 1 + 1,
            (size // 32,) * 2: 3 * 4 - 1,
        }
    whole = sum(count for (h, w), count in _regularized_map_sizes(64).items() if h <= 7 and w <= 7)
    assert whole == 35
    recipe = (ROOT / "docs" / "recipe.md").read_text()
    for text in (recipe, resnet.__doc__):
        flat = " ".join(text.split())
        assert "4x4 and 2x2" in flat and "35 of the 36" in flat and "SpatialDropout" in flat, flat


def test_channels_first_input_to_a_flax_layer_needs_its_axes_as_the_docs_say():
    nchw = jnp.ones((2, 6, 12, 12))
    key = jax.random.key(0)
    layer = db.DropBlock(keep_prob=0.6, block_size=3)
    # The defaults read (N, C, H, W) as (N, H, W, C): blocks over C and H.
    read_as_nhwc = np.asarray(layer.apply({}, nchw, deterministic=False, rng=key)) == 0
    assert any(not is_union_of_blocks(m, (3, 3), "valid") for m in read_as_nhwc.reshape(-1, 12, 12))
    named = db.DropBlock(keep_prob=0.6, block_size=3, spatial_axes=(2, 3))
    dropped = np.asarray(named.apply({}, nchw, deterministic=False, rng=key)) == 0
    assert dropped.any() and all(is_union_of_blocks(m, (3, 3), "valid") for m in dropped.reshape(-1, 12, 12))
    layers_page = " ".join((ROOT / "docs" / "layers.md").read_text().split())
    assert "Channels-first input to a Flax layer needs `spatial_axes`" in layers_page
    assert "`spatial_axes=(2, 3)`" in layers_page


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_a_keras_file_loads_in_a_new_process_after_the_import_the_layers_page_names(tmp_path):
    path = tmp_path / "model.keras"
    _keras_model(db_keras.DropBlock(keep_prob=0.85, block_size=3, name="dropblock"), compile=False).save(path)
    load = f"import keras\nmodel = keras.saving.load_model({str(path)!r})\n"
    show = "print(model.get_layer('dropblock').get_config()['keep_prob'])"
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONWARNINGS": "ignore"}

    def run(code):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)

    without = run(load + show)
    assert without.returncode != 0 and "DropBlock" in without.stderr, without.stderr
    loaded = run("import dropblock_jax.keras\n" + load + show)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "0.85"
    layers_page = " ".join((ROOT / "docs" / "layers.md").read_text().split())
    assert "in a new process, `import dropblock_jax.keras` before `keras.saving.load_model(...)`" in layers_page


def test_keras_config_after_a_scheduled_fit_holds_the_schedules_number():
    layer = db_keras.DropBlock(keep_prob=0.9, block_size=3)
    model = _keras_model(layer)
    scheduler = db_keras.KeepProbScheduler(lambda step: 0.95)
    model.fit(np.ones((4, 8, 8, 2)), np.ones((4, 1)), batch_size=4, verbose=0, callbacks=[scheduler])
    assert repr(layer.get_config()["keep_prob"]) == "0.95"
