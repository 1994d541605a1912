"""Tests of the Keras 3 layer ``dropblock_jax.keras.DropBlock`` (JAX backend)."""

import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest

from dropblock_jax import drop_block
from dropblock_jax.keras import DropBlock, KeepProbScheduler, set_keep_prob
from helpers import PYPROJECT, assert_mean_matches

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


def _conv_model(drop, shape=(8, 8, 4), nested=False):
    """Conv2D, then ``drop``, then a head; with ``nested`` the first two form an inner Sequential."""
    body = [keras.layers.Conv2D(8, 3, padding="same"), drop]
    if nested:
        body = [keras.Sequential([keras.Input(shape), *body], name="inner")]
    head = [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)]
    model = keras.Sequential([keras.Input(shape), *body, *head])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _data(n, shape=(8, 8, 4)):
    rng = np.random.default_rng(1)
    return rng.normal(size=(n, *shape)).astype("float32"), rng.integers(0, 2, n)


class _LogsReader(keras.callbacks.Callback):
    """Keeps what the callbacks before it logged for each training batch."""

    def __init__(self):
        super().__init__()
        self.batch_logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.batch_logs.append(dict(logs))


# Six steps over two fits (2 epochs of 2 batches, then 1 of 2), 0.8 down to 0.4 at the last.
TOTAL_STEPS = 6
KEEP_PROB_SCHEDULE = optax.linear_schedule(init_value=0.8, end_value=0.4, transition_steps=TOTAL_STEPS - 1)
# The same schedule by hand.
EXPECTED_KEEP_PROBS = [0.8 - 0.4 * step / (TOTAL_STEPS - 1) for step in range(TOTAL_STEPS)]


def test_keep_prob_scheduler_sets_every_step_from_the_global_step_with_one_trace(capsys):
    keras.utils.set_random_seed(0)
    drop = _ProbedDropBlock(keep_prob=0.9, block_size=3, gamma="calibrated", seed=3, name="drop")
    model = _conv_model(drop)
    x, y = _data(64)
    reader = _LogsReader()
    state_before = np.asarray(drop.seed_generator.state.value)
    history = model.fit(
        x,
        y,
        batch_size=32,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[KeepProbScheduler(KEEP_PROB_SCHEDULE), reader],
    )
    # A new fit, and a new scheduler, continue from the batches the model was trained on.
    model.fit(
        x,
        y,
        batch_size=32,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[KeepProbScheduler(KEEP_PROB_SCHEDULE, verbose=1), reader],
    )
    jax.effects_barrier()

    assert drop.training_traces == 1
    assert [keep for keep, _ in drop.draws] == pytest.approx(EXPECTED_KEEP_PROBS)
    assert drop.draws[-1][0] == pytest.approx(0.4)  # the last step uses the target
    assert [logs["keep_prob"] for logs in reader.batch_logs] == pytest.approx(EXPECTED_KEEP_PROBS)
    assert history.history["keep_prob"] == pytest.approx([EXPECTED_KEEP_PROBS[1], EXPECTED_KEEP_PROBS[3]])
    printed = capsys.readouterr().out
    assert "Step 4: KeepProbScheduler setting keep_prob to 0.48" in printed
    assert "Step 5: KeepProbScheduler setting keep_prob to 0.4" in printed and "Step 3:" not in printed
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
        np.asarray(drop.seed_generator.state.value), [state_before[0], state_before[1] + TOTAL_STEPS]
    )
    assert float(drop.keep_prob.value) == pytest.approx(0.4)


def test_keep_prob_scheduler_refuses_bad_arguments_and_bad_values_of_the_schedule():
    with pytest.raises(TypeError, match=r"schedule must be a function of the step .*got 0\.9"):
        KeepProbScheduler(0.9)
    with pytest.raises(TypeError, match=r"verbose must be an int .*got '1'"):
        KeepProbScheduler(lambda step: 0.9, verbose="1")
    model = _conv_model(DropBlock(block_size=3))
    scheduler = KeepProbScheduler(lambda step: 1.0 + 0.5 * step)
    scheduler.set_model(model)
    scheduler.on_train_begin()
    scheduler.on_epoch_begin(0)
    scheduler.on_train_batch_begin(0)
    with pytest.raises(ValueError, match=r"schedule\(1\) must be in \[0, 1\], got 1.5"):
        scheduler.on_train_batch_end(0)
        scheduler.on_train_batch_begin(1)


def test_set_keep_prob_through_a_model_kept_from_before_fit_reaches_the_next_steps():
    drop = _ProbedDropBlock(keep_prob=0.9, block_size=3, seed=0, name="drop")
    model = _conv_model(drop, nested=True)
    inner = model.get_layer("inner")
    refused = []

    class Schedule(keras.callbacks.Callback):
        # Reads neither self.model nor logs, which would write the trainer's state back.
        def on_train_batch_begin(self, batch, logs=None):
            for part in (drop, inner):
                try:
                    set_keep_prob(part, 0.1)
                except RuntimeError as error:
                    refused.append(str(error))
            assert set_keep_prob(model, 0.5 + 0.1 * batch) == 1

    x, y = _data(12)
    model.fit(x, y, batch_size=4, shuffle=False, verbose=0, callbacks=[Schedule()])
    jax.effects_barrier()
    assert [keep for keep, _ in drop.draws] == pytest.approx([0.5, 0.6, 0.7])
    assert drop.training_traces == 1
    # Before the first step the trainer holds nothing; from then on a part of the model
    # cannot reach its state, and says so instead of losing the value.
    assert len(refused) == 4
    assert "set_keep_prob got 'drop', which is part of a model that model.fit is training" in refused[0]
    assert "set_keep_prob got 'inner'" in refused[1]
    assert all("Pass the model fit was called on (self.model" in message for message in refused)


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


@pytest.mark.parametrize(
    ("data_format", "broadcast_dims", "channel_axis"),
    [("channels_last", (-1,), 3), ("channels_last", (3,), 3), ("channels_first", (1,), 1)],
)
def test_broadcast_dims_share_one_mask_across_the_channels_of_the_data_format(
    data_format, broadcast_dims, channel_axis
):
    x = X_NHWC if data_format == "channels_last" else _channels_first(X_NHWC)
    spatial_axes = (1, 2) if data_format == "channels_last" else (2, 3)
    layer = DropBlock(keep_prob=0.6, block_size=3, data_format=data_format, broadcast_dims=broadcast_dims, seed=9)
    key = _key_of_next_draw(layer)
    result = np.asarray(layer(x, training=True))
    np.testing.assert_array_equal(
        result, drop_block(key, x, 0.6, 3, spatial_axes=spatial_axes, broadcast_dims=broadcast_dims)
    )
    # Every channel of a sample has the same holes, and the samples have different ones.
    dropped = result == 0
    first_channel = np.take(dropped, [0], axis=channel_axis)
    assert dropped.any() and (dropped == first_channel).all()
    assert not (first_channel == first_channel[:1]).all()
    config = layer.get_config()
    assert config["broadcast_dims"] == broadcast_dims
    assert DropBlock.from_config(config).broadcast_dims == broadcast_dims


def test_broadcast_dims_that_do_not_fit_the_input_fail_when_the_model_is_built():
    with pytest.raises(ValueError, match=r"broadcast_dims entry 4 is out of range for an array with 4 dimensions"):
        keras.Sequential([keras.Input((8, 8, 3)), DropBlock(block_size=3, broadcast_dims=(4,))])
    # -2 is W in (N, H, W, C): a spatial axis once the rank is known.
    with pytest.raises(ValueError, match=r"broadcast_dims must not contain a spatial axis: got .*\(-2,\)"):
        keras.Sequential([keras.Input((8, 8, 3)), DropBlock(block_size=3, broadcast_dims=(-2,))])


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
        broadcast_dims=(1,),
        seed_region="everywhere",
        gamma="calibrated",
        normalize="none",
        seed=7,
        name="blocks",
    )
    config = layer.get_config()
    keys = ("keep_prob", "block_size", "data_format", "broadcast_dims", "seed", "name")
    assert {key: config[key] for key in keys} == {
        "keep_prob": pytest.approx(0.8),
        "block_size": (3, 5),
        "data_format": "channels_first",
        "broadcast_dims": (1,),
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
        [
            keras.Input((8, 8, 3)),
            DropBlock(keep_prob=0.9, block_size=(3, 3), broadcast_dims=(-1,), gamma="calibrated", seed=4, name="drop"),
        ]
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
        ({"broadcast_dims": "c"}, TypeError, "broadcast_dims must be a tuple of ints, got 'c'"),
        # With an int block_size the number of spatial axes is the input's; axis 1 is
        # spatial in every channels-last input, axis 2 in every channels-first one.
        ({"broadcast_dims": (1,)}, ValueError, r"broadcast_dims must not contain a spatial axis: got .*\(1,\)"),
        (
            {"broadcast_dims": (0, 2), "data_format": "channels_first"},
            ValueError,
            r"broadcast_dims must not contain a spatial axis: got .*\(0, 2\)",
        ),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        DropBlock(**kwargs)


# Arguments that fail at construction for Keras's data formats (tests/test_layers.py checks
# those that fail for every layer).
@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"broadcast_dims": (3, 3)}, ValueError),
        ({"broadcast_dims": (1,), "block_size": (3, 3)}, ValueError),
        ({"broadcast_dims": (2,), "block_size": (3, 3)}, ValueError),
        ({"broadcast_dims": (0, 3), "block_size": (3, 3), "data_format": "channels_first"}, ValueError),
    ],
)
def test_arguments_fail_at_construction_with_drop_blocks_message(kwargs, error):
    with pytest.raises(error) as at_construction:
        DropBlock(**kwargs)
    # What drop_block says for an image batch in the layer's format.
    data_format = kwargs.pop("data_format", "channels_last")
    x, spatial_axes = (X_NHWC, (1, 2)) if data_format == "channels_last" else (_channels_first(X_NHWC), (2, 3))
    arguments = {"keep_prob": 0.9, "block_size": 3, "spatial_axes": spatial_axes, **kwargs}
    with pytest.raises(error) as from_drop_block:
        drop_block(jax.random.key(0), x, **arguments)
    assert str(at_construction.value) == str(from_drop_block.value)


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


def test_import_without_keras_gives_the_line_that_installs_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras", None)
    monkeypatch.delitem(sys.modules, "dropblock_jax.keras")
    (requirement,) = PYPROJECT["project"]["optional-dependencies"]["keras"]
    with pytest.raises(ImportError, match="needs Keras 3, which is not installed") as info:
        importlib.import_module("dropblock_jax.keras")
    # Quoted, so that zsh does not read the >= as a redirection.
    assert str(info.value).endswith(f"pip install '{requirement}'")


def test_import_with_keras_on_its_default_backend_says_to_set_keras_backend(tmp_path):
    # No KERAS_BACKEND and no keras.json: Keras loads TensorFlow, blocked here as if not installed.
    code = "import sys\nsys.modules['tensorflow'] = None\nimport dropblock_jax.keras\n"
    env = {name: value for name, value in os.environ.items() if name != "KERAS_BACKEND"}
    env["KERAS_HOME"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("ImportError:")]
    assert "runs on Keras's JAX backend, but `import keras` failed" in message
    assert "tensorflow" in message and "Set the environment variable KERAS_BACKEND=jax" in message
    assert "not installed: pip install" not in message


class _KeepProbReader(keras.callbacks.Callback):
    """Reads a DropBlock's keep_prob before and after every training batch, with its epoch and batch."""

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.epoch = None
        self.begins, self.ends, self.logged = [], [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def _read(self, batch):
        # Callback.model writes the trainer's state back first: this is the value the step reads.
        return self.epoch, batch, float(self.model.get_layer(self.name).keep_prob.value)

    def on_train_batch_begin(self, batch, logs=None):
        self.begins.append(self._read(batch))

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(self._read(batch))
        self.logged.append(logs["keep_prob"])


def test_keep_prob_scheduler_counts_the_batches_of_the_earlier_epochs_of_one_fit():
    # Three epochs of three batches in one fit: the step of batch b of epoch e is 3 e + b.
    drop = _ProbedDropBlock(keep_prob=0.9, block_size=3, seed=0, name="drop")
    model = _conv_model(drop)
    x, y = _data(48)
    reader = _KeepProbReader("drop")
    scheduler = KeepProbScheduler(lambda step: 1.0 - 0.05 * step)
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=[scheduler, reader])
    jax.effects_barrier()
    batches = [(epoch, batch) for epoch in range(3) for batch in range(3)]
    expected = [1.0 - 0.05 * (3 * epoch + batch) for epoch, batch in batches]
    for reads in (reader.begins, reader.ends):
        assert [read[:2] for read in reads] == batches
        assert [read[2] for read in reads] == pytest.approx(expected)
    assert reader.logged == pytest.approx(expected)
    # ... and what each step drew its mask with.
    assert [keep for keep, _ in drop.draws] == pytest.approx(expected)
