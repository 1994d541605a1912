"""The contract every layer keeps (Linen, NNX, Equinox, Keras), each test run on the four.

What is particular to one framework (its flags, its keys, its training loop) is tested in
that layer's own module.
"""

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dropblock_jax
import dropblock_jax.equinox
import dropblock_jax.keras
import dropblock_jax.nnx
from dropblock_jax import drop_block
from helpers import (
    BAD_LAYER_ARGUMENTS,
    DROP_BLOCK_OPTION_DEFAULTS,
    PORTED_CALLS,
    assert_keep_prob_conversion_error,
    bits,
    drop_block_error,
)

X_NHWC = jax.random.normal(jax.random.key(42), (2, 8, 8, 3))
X_CHW = jnp.moveaxis(X_NHWC[0], -1, 0)
KEY = jax.random.key(5)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One framework's DropBlock, and how a test builds it, trains it and switches it off.

    Attributes:
      name: the test id.
      cls: the layer's class.
      x: an input laid out as the framework's convolutions lay it out.
      spatial_axes: the axes of ``x`` the layer drops blocks over.
      parameters: the constructor's keyword parameters besides ``keep_prob``,
        ``block_size`` and drop_block's options, with their defaults.
      options: the drop_block options the constructor takes.
      call: the parameters of the call that applies the layer.
      build: ``build(**arguments)``, the layer.
      train: ``train(layer, x, keep_prob)``, the output of a training call and the key it used.
      off: ``off(layer, x)``, the output of a call with the layer switched off.
    """

    name: str
    cls: type
    x: Any
    spatial_axes: tuple[int, ...]
    parameters: dict[str, Any]
    options: tuple[str, ...]
    call: tuple[str, ...]
    build: Callable[..., Any]
    train: Callable[[Any, Any, Any], tuple[Any, jax.Array]] | None
    off: Callable[[Any, Any], Any]


def _linen_train(layer, x, keep_prob):
    return layer.apply({}, x, deterministic=False, rng=KEY, keep_prob=keep_prob), KEY


def _nnx_train(layer, x, keep_prob):
    return layer(x, rngs=KEY, keep_prob=keep_prob), KEY


def _equinox_train(layer, x, keep_prob):
    return layer(x, key=KEY, keep_prob=keep_prob), KEY


def _keras_train(layer, x, keep_prob):
    assert keep_prob is None, "the Keras layer takes its keep_prob from its variable"
    # The key of the next draw: the generator's state, as threefry key data.
    key = jax.random.wrap_key_data(jnp.asarray(layer.seed_generator.state.value), impl="threefry2x32")
    return layer(x, training=True), key


ALL_OPTIONS = tuple(DROP_BLOCK_OPTION_DEFAULTS)
LAYERS = [
    Layer(
        name="linen",
        cls=dropblock_jax.DropBlock,
        x=X_NHWC,
        spatial_axes=(1, 2),
        parameters={"deterministic": None, "rng_collection": "dropout"},
        options=ALL_OPTIONS,
        call=("inputs", "deterministic", "rng", "keep_prob"),
        build=dropblock_jax.DropBlock,
        train=_linen_train,
        off=lambda layer, x: layer.apply({}, x, deterministic=True),
    ),
    Layer(
        name="nnx",
        cls=dropblock_jax.nnx.DropBlock,
        x=X_NHWC,
        spatial_axes=(1, 2),
        parameters={"deterministic": False, "rng_collection": "dropout", "rngs": None},
        options=ALL_OPTIONS,
        call=("inputs", "deterministic", "rngs", "keep_prob"),
        build=lambda *args, **arguments: dropblock_jax.nnx.DropBlock(*args, **arguments, rngs=nnx.Rngs(dropout=0)),
        train=_nnx_train,
        off=lambda layer, x: layer(x, deterministic=True),
    ),
    Layer(
        name="equinox",
        cls=dropblock_jax.equinox.DropBlock,
        x=X_CHW,
        spatial_axes=(1, 2),
        parameters={"inference": False},
        options=ALL_OPTIONS,
        call=("x", "key", "inference", "keep_prob"),
        build=dropblock_jax.equinox.DropBlock,
        train=_equinox_train,
        off=lambda layer, x: layer(x, inference=True),
    ),
    Layer(
        name="keras",
        cls=dropblock_jax.keras.DropBlock,
        x=np.asarray(X_NHWC),
        spatial_axes=(1, 2),
        parameters={"data_format": None, "seed": None},
        options=("broadcast_dims", "seed_region", "gamma", "normalize"),
        call=("inputs", "training"),
        build=lambda *args, **arguments: dropblock_jax.keras.DropBlock(*args, **arguments, seed=5),
        train=_keras_train,
        off=lambda layer, x: layer(x, training=False),
    ),
]
CALL_TIME_KEEP_PROB = [layer for layer in LAYERS if "keep_prob" in layer.call]


def _ids(layers):
    return [layer.name for layer in layers]


@pytest.mark.parametrize("layer", LAYERS, ids=_ids(LAYERS))
def test_the_constructor_takes_keyword_arguments_only_with_the_contracts_defaults(layer):
    parameters = dict(inspect.signature(layer.cls.__init__).parameters)
    del parameters["self"]
    parameters.pop("kwargs", None)  # Keras's layer arguments (name, dtype, ...)
    assert all(p.kind is p.KEYWORD_ONLY for p in parameters.values()), parameters
    defaults = {name: p.default for name, p in parameters.items()}
    expected = {"keep_prob": 0.9, "block_size": 7, **{n: DROP_BLOCK_OPTION_DEFAULTS[n] for n in layer.options}}
    expected.update(layer.parameters)
    # Linen's dataclass also takes Flax's own parent and name.
    assert {name: defaults[name] for name in expected} == expected
    assert not set(defaults) - set(expected) - {"parent", "name"}, defaults


@pytest.mark.parametrize("layer", LAYERS, ids=_ids(LAYERS))
def test_the_call_takes_the_contracts_arguments(layer):
    parameters = inspect.signature(layer.cls.__call__ if layer.name != "keras" else layer.cls.call).parameters
    assert list(parameters) == ["self", *layer.call]
    for name in layer.call[1:]:
        assert parameters[name].default is None, name


@pytest.mark.parametrize(("args", "kwargs", "received"), PORTED_CALLS)
@pytest.mark.parametrize("layer", LAYERS, ids=_ids(LAYERS))
def test_a_ported_drop_rate_gets_the_keep_prob_conversion(layer, args, kwargs, received):
    # DropBlock(0.1) would keep 10% where Dropout(0.1) drops 10%.
    assert_keep_prob_conversion_error(lambda: layer.build(*args, **kwargs), "DropBlock", received)


BAD_ARGUMENTS = [
    pytest.param(layer, arguments, id=f"{layer.name}-{arguments}")
    for layer in LAYERS
    for arguments in BAD_LAYER_ARGUMENTS
    if set(arguments) <= {"keep_prob", "block_size", *layer.options}
]


@pytest.mark.parametrize(("layer", "arguments"), BAD_ARGUMENTS)
def test_bad_arguments_fail_at_construction_with_drop_blocks_message(layer, arguments):
    # What drop_block says on the layer's input over the layer's axes.
    reference = {"spatial_axes": layer.spatial_axes, **arguments}
    error, message = drop_block_error(layer.x, reference)
    with pytest.raises(error) as info:
        layer.build(**{"keep_prob": 0.9, "block_size": 3, **arguments})
    assert str(info.value) == message


@pytest.mark.parametrize("layer", LAYERS, ids=_ids(LAYERS))
def test_switched_off_it_returns_the_input_bit_for_bit(layer):
    x = np.array(layer.x)
    x.flat[[0, 7, 12]] = np.nan, -np.inf, -0.0
    y = layer.off(layer.build(keep_prob=0.1, block_size=3), x)
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(bits(y), bits(x))


@pytest.mark.parametrize("layer", LAYERS, ids=_ids(LAYERS))
def test_training_is_drop_block_with_the_layers_options_for_its_key(layer):
    options = {"broadcast_dims": (0,), "seed_region": "everywhere", "gamma": "calibrated", "normalize": "expected"}
    y, key = layer.train(layer.build(keep_prob=0.7, block_size=(3, 2), **options), layer.x, None)
    expected = drop_block(key, layer.x, 0.7, (3, 2), spatial_axes=layer.spatial_axes, **options)
    np.testing.assert_array_equal(y, expected)
    assert (np.asarray(y) == 0).any() and not (np.asarray(y) == 0).all()


@pytest.mark.parametrize("layer", CALL_TIME_KEEP_PROB, ids=_ids(CALL_TIME_KEEP_PROB))
def test_a_keep_prob_at_the_call_overrides_the_layers(layer):
    built = layer.build(keep_prob=0.5, block_size=3)
    np.testing.assert_array_equal(bits(layer.train(built, layer.x, 1.0)[0]), bits(layer.x))
    np.testing.assert_array_equal(layer.train(built, layer.x, 0.0)[0], jnp.zeros_like(layer.x))
    y, key = layer.train(built, layer.x, 0.8)
    np.testing.assert_array_equal(y, drop_block(key, layer.x, 0.8, 3, spatial_axes=layer.spatial_axes))


@pytest.mark.parametrize("layer", CALL_TIME_KEEP_PROB, ids=_ids(CALL_TIME_KEEP_PROB))
@pytest.mark.parametrize("bad", [1.5, -0.1])
def test_a_bad_keep_prob_at_the_call_names_the_argument(layer, bad):
    with pytest.raises(ValueError, match=r"keep_prob must be in \[0, 1\]"):
        layer.train(layer.build(keep_prob=0.5, block_size=3), layer.x, bad)
