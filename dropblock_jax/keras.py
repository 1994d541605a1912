"""Keras 3 DropBlock layer for the JAX backend (optional dependency: ``pip install 'keras>=3.10'``)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from dropblock_jax._checks import (
    axes_tuple,
    check_choice,
    check_int,
    check_layout_arguments,
    checked_probability,
    is_int,
    static_block_size,
)
from dropblock_jax._functional import drop_block
from dropblock_jax._layer_options import check_layer_arguments, reject_ported_arguments


def _keras_import_error(error: ImportError) -> ImportError:
    """What to tell a user whose ``import keras`` failed: install it, or choose the JAX backend."""
    try:
        installed = importlib.util.find_spec("keras") is not None
    except ValueError:  # a keras module without a spec: something stands in for Keras
        installed = False
    if not installed:
        return ImportError("dropblock_jax.keras needs Keras 3, which is not installed: pip install 'keras>=3.10'")
    # Keras imports its backend when it is imported, TensorFlow unless told otherwise;
    # an installed Keras fails here because that backend is not installed.
    return ImportError(
        f"dropblock_jax.keras runs on Keras's JAX backend, but `import keras` failed: {error}. Keras is installed "
        "and loads the backend KERAS_BACKEND names, else the one in ~/.keras/keras.json, else TensorFlow. "
        "Set the environment variable KERAS_BACKEND=jax before keras is first imported: in the shell "
        '(KERAS_BACKEND=jax python ...) or first thing in the program (os.environ["KERAS_BACKEND"] = "jax").'
    )


try:
    import keras
except ImportError as error:
    raise _keras_import_error(error) from error

__all__ = ["DropBlock", "KeepProbScheduler", "set_keep_prob"]

DATA_FORMATS = ("channels_last", "channels_first")

# Keras draws its seeds as uint32[2] pairs; they are threefry2x32 key data whatever
# jax_default_prng_impl says, which is what keras.random's own ops assume.
_SEED_KEY_IMPL = "threefry2x32"

# Where save_own_variables puts the generator's state, beside the layer's own variables.
_SEED_STATE_KEY = "seed_generator_state"


def _check_jax_backend() -> None:
    backend = keras.backend.backend()
    if backend != "jax":
        raise RuntimeError(
            f"dropblock_jax.keras.DropBlock runs on Keras's JAX backend only, but Keras uses the {backend!r} "
            "backend. Set the environment variable KERAS_BACKEND=jax before keras is first imported."
        )


def _first_spatial_axis(data_format: str) -> int:
    """The first spatial axis of a batched input in ``data_format``: after the batch, and the channels if first."""
    return 1 if data_format == "channels_last" else 2


def _stand_in_spatial_axes(block_size: int | Sequence[int], data_format: str) -> tuple[int, ...]:
    """Spatial axes of ``data_format`` that every input ``block_size`` fits has.

    A tuple ``block_size`` fits inputs with exactly that many spatial axes, so its axes
    are exact; an int fits inputs with any number, of which the first is in all.
    """
    first = _first_spatial_axis(data_format)
    count = len(block_size) if isinstance(block_size, (tuple, list)) else 1
    return tuple(range(first, first + count))


def _python_keep_prob(name: str, value: ArrayLike) -> float:
    """A checked keep_prob as a Python float: a Python number as given, an array as its float32 value."""
    checked = float(checked_probability(name, value))
    return float(value) if isinstance(value, (int, float)) else checked


def _held_by_a_trainer(variable: keras.Variable) -> bool:
    """True while ``model.fit`` holds the variable's value in its own state, unsynced.

    Keras's JAX trainer takes the values out of the model's variables for the epoch
    (``_purge_model_variables`` sets them to None) and puts them back in
    ``jax_state_sync``; until then an assignment to the variable is overwritten.
    """
    return getattr(variable, "_value", 0) is None


@keras.saving.register_keras_serializable(package="dropblock_jax")
class DropBlock(keras.layers.Layer):
    """DropBlock as a Keras 3 layer (JAX backend), used like ``keras.layers.Dropout``.

    In training (``training=True``, which ``model.fit`` passes) the layer draws a key
    from its ``keras.random.SeedGenerator``; otherwise it returns the inputs unchanged.
    The key is the generator's state before the draw, a uint32
    pair, as threefry2x32 key data
    (``jax.random.wrap_key_data(state, impl="threefry2x32")``), whatever
    ``jax_default_prng_impl`` says. The state is a non-trainable variable, so every
    step of ``model.fit``'s stateless JAX train function draws a new mask.

    Blocks extend over the spatial axes of ``data_format``: the axes between the batch
    and the channels for ``"channels_last"`` (``(N, H, W, C)``, ``(N, T, C)``,
    ``(N, D, H, W, C)``), the axes after the channels for ``"channels_first"``. An int
    ``block_size`` is a cube over all spatial axes of the input (a square for images),
    a tuple has one entry per spatial axis. ``broadcast_dims`` are axes of the input
    as the layer sees it, batch axis included, that share one mask: ``(-1,)`` in
    ``"channels_last"`` or ``(1,)`` in ``"channels_first"`` shares it across the
    channels (the seed code's and timm's DropBlock), ``(0,)`` across the batch.

    ``keep_prob`` is a non-trainable float32 ``keras.Variable``. The train function
    reads it as data, so a schedule does not recompile it: pass a
    :class:`KeepProbScheduler` to ``fit``, or call :func:`set_keep_prob` from a
    callback. During ``fit`` Keras's JAX trainer keeps the model's variables in its own
    state and writes them back only at the end of each epoch or when a callback reads
    ``Callback.model``; :func:`set_keep_prob` writes that state back first, where a
    bare ``layer.keep_prob.assign(v)`` through a layer kept from before ``fit`` would
    be overwritten. A value assigned outside [0, 1] is clipped inside a compiled
    function and raises in an eager call.

    ``layer.keep_prob = v`` assigns the variable as :func:`set_keep_prob` does (during
    ``fit`` it raises at once, naming :func:`set_keep_prob`: the trainer would overwrite it).

    ``get_config`` reports the current ``keep_prob``, as the Python number given while
    the variable holds it (``0.9``, not its float32 ``0.8999999761581421``); ``.keras``
    files hold it and the generator's state as weights, so a loaded model continues the
    saved schedule and random stream. Being a weight, ``keep_prob`` counts as one
    non-trainable parameter per layer in ``model.summary()``, as a batch norm's moving
    statistics do. Loading a ``.keras`` file in a new process needs
    ``import dropblock_jax.keras`` first: the import registers the layer with Keras.

    What depends on the input's rank (an axis out of range, a negative axis of
    ``broadcast_dims`` that is spatial in it, a tuple ``block_size`` of another length)
    is checked when the layer is built on its input shape.

    What the four layers share (keyword-only ``keep_prob``, the checks when the layer is
    built, ``drop_block``'s result for the layer's key, a traced ``keep_prob``, keys per
    device) is on the :ref:`layers page <layer-contract>`.

    Args:
      keep_prob: probability of keeping a unit, in [0, 1].
      block_size: int (a cube over the spatial axes) or tuple of ints, one per spatial axis.
      data_format: ``"channels_last"`` or ``"channels_first"``; None means
        ``keras.config.image_data_format()`` at construction.
      broadcast_dims: axes of the input that share one mask; none may be spatial.
      seed_region, gamma, normalize: as in :func:`dropblock_jax.drop_block`.
      seed: int seed of the layer's ``keras.random.SeedGenerator``; None picks a random one.
      **kwargs: ``keras.layers.Layer`` arguments (``name``, ``dtype``, ...).

    Raises:
      RuntimeError: if Keras does not run on the JAX backend.
      TypeError, ValueError: for bad arguments, naming the argument.

    Examples:
      >>> import numpy as np
      >>> import keras
      >>> from dropblock_jax.keras import DropBlock
      >>> layer = DropBlock(keep_prob=0.9, block_size=3, seed=0)
      >>> x = np.ones((2, 8, 8, 4), "float32")
      >>> layer(x, training=True).shape
      (2, 8, 8, 4)
      >>> bool((layer(x, training=False) == x).all())
      True
      >>> shared = DropBlock(keep_prob=0.5, block_size=3, broadcast_dims=(-1,), seed=0)
      >>> y = np.asarray(shared(x, training=True))
      >>> bool(((y == 0) == (y[..., :1] == 0)).all())  # one mask for all channels
      True
      >>> model = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.Conv2D(4, 3), DropBlock(block_size=3)])
      >>> model.output_shape
      (None, 6, 6, 4)

    References:
      Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional networks",
      NeurIPS 2018 (arXiv 1810.12890).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> DropBlock:
        """Refuses a dropout-style rate, by position or by name, with ``keep_prob = 1 - rate``."""
        # Keras's __new__ binds the constructor's arguments before __init__ runs, so a
        # dropout-style call is answered here, before Keras's generic errors.
        reject_ported_arguments(cls.__name__, args, kwargs)
        instance: DropBlock = super().__new__(cls, *args, **kwargs)
        return instance

    def __init__(
        self,
        *,
        keep_prob: ArrayLike = 0.9,
        block_size: int | Sequence[int] = 7,
        data_format: str | None = None,
        broadcast_dims: int | Sequence[int] = (),
        seed_region: str = "valid",
        gamma: str = "paper",
        normalize: str = "batch",
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        _check_jax_backend()
        if data_format is None:
            data_format = keras.config.image_data_format()
        check_choice("data_format", data_format, DATA_FORMATS)
        checked_keep_prob = _python_keep_prob("keep_prob", keep_prob)
        check_layer_arguments(
            keep_prob=checked_keep_prob,
            block_size=block_size,
            spatial_axes=_stand_in_spatial_axes(block_size, data_format),
            broadcast_dims=broadcast_dims,
            seed_region=seed_region,
            gamma=gamma,
            normalize=normalize,
        )
        if seed is not None and not is_int(seed):
            raise TypeError(f"seed must be an int or None, got {seed!r}.")
        super().__init__(**kwargs)
        self.block_size = static_block_size(block_size)
        self.data_format = data_format
        self.broadcast_dims = axes_tuple("broadcast_dims", broadcast_dims)
        self.seed_region = seed_region
        self.gamma = gamma
        self.normalize = normalize
        self.seed = None if seed is None else int(seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        # autocast=False: under a mixed-precision policy the rate stays float32.
        self.keep_prob = self.add_weight(
            name="keep_prob",
            shape=(),
            dtype="float32",
            initializer=keras.initializers.Constant(checked_keep_prob),
            trainable=False,
            autocast=False,
        )
        # The number as given, which get_config reports while the float32 variable holds it.
        self._given_keep_prob = checked_keep_prob
        self.supports_masking = True

    def __setattr__(self, name: str, value: Any) -> None:
        """Writes ``layer.keep_prob = v`` into the variable, as :func:`set_keep_prob` does.

        During ``model.fit`` the trainer holds the variable's value and would overwrite
        the assignment: that is a ``RuntimeError`` naming :func:`set_keep_prob`, raised at
        the assignment. Any other attribute, and a ``keras.Variable``, is set as usual.
        """
        held = vars(self).get(name)
        if name == "keep_prob" and isinstance(held, keras.Variable) and not isinstance(value, keras.Variable):
            self._assign_keep_prob(_python_keep_prob("keep_prob", value))
            return
        super().__setattr__(name, value)

    def _assign_keep_prob(self, value: float) -> None:
        """Assigns a checked ``value`` to the variable, unless ``model.fit`` holds it."""
        if _held_by_a_trainer(self.keep_prob):
            raise RuntimeError(
                f"keep_prob of {self.name!r} cannot be assigned while model.fit holds the model's variables (the "
                "trainer would overwrite it): call dropblock_jax.keras.set_keep_prob(self.model, value) in a "
                "keras.callbacks.Callback, or use dropblock_jax.keras.KeepProbScheduler."
            )
        self.keep_prob.assign(value)
        self._given_keep_prob = value

    def _spatial_axes(self, ndim: int) -> tuple[int, ...]:
        """The spatial axes of an input of rank ``ndim`` in this layer's data format."""
        if ndim < 3:
            raise ValueError(f"DropBlock needs inputs of rank >= 3 (batch, spatial axes, channels), got rank {ndim}.")
        num_spatial = ndim - 2
        if isinstance(self.block_size, tuple) and len(self.block_size) != num_spatial:
            raise ValueError(
                f"block_size must have one entry per spatial axis: an input of rank {ndim} in "
                f"{self.data_format} format has {num_spatial}, got block_size={self.block_size!r}."
            )
        first = _first_spatial_axis(self.data_format)
        return tuple(range(first, first + num_spatial))

    def call(self, inputs: jax.Array, training: bool | None = None) -> jax.Array:
        """Applies DropBlock to ``inputs`` when ``training`` is true, else returns them.

        Args:
          inputs: floating feature maps of rank >= 3 in the layer's ``data_format``.
          training: whether to drop blocks; Keras passes it in ``fit``, ``evaluate``
            and ``predict``.

        Returns:
          An array of the inputs' shape and dtype.
        """
        if not training:
            return inputs
        spatial_axes = self._spatial_axes(inputs.ndim)
        seed = jnp.asarray(self.seed_generator.next(), jnp.uint32)
        key = jax.random.wrap_key_data(seed, impl=_SEED_KEY_IMPL)
        return drop_block(
            key,
            inputs,
            self.keep_prob.value,
            self.block_size,
            spatial_axes=spatial_axes,
            broadcast_dims=self.broadcast_dims,
            seed_region=self.seed_region,
            gamma=self.gamma,
            normalize=self.normalize,
        )

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        """Checks the arguments that depend on the input's rank, as ``drop_block`` would."""
        rank = len(input_shape)
        # The smallest input of this rank: drop_block's own checks and messages.
        check_layout_arguments((1,) * rank, self.block_size, self._spatial_axes(rank), self.broadcast_dims)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        """The output shape: the input shape (checked against ``block_size``)."""
        self._spatial_axes(len(input_shape))
        return tuple(input_shape)

    def save_own_variables(self, store: Any) -> None:
        """Saves ``keep_prob`` and the random generator's state (``model.save``, ``save_weights``)."""
        super().save_own_variables(store)
        # Keras saves no SeedGenerator state; with it a loaded model continues the
        # random stream where it was saved instead of restarting it from the seed.
        store[_SEED_STATE_KEY] = np.asarray(self.seed_generator.state.value)

    def load_own_variables(self, store: Any) -> None:
        """Loads what :meth:`save_own_variables` saved; a file without the generator's state keeps the current one."""
        # Keras's stores are not iterable; they list their entries with keys().
        names = list(store.keys())
        super().load_own_variables({name: store[name] for name in names if name != _SEED_STATE_KEY})
        if _SEED_STATE_KEY in names:
            self.seed_generator.state.assign(store[_SEED_STATE_KEY])

    def get_config(self) -> dict[str, Any]:
        """The layer's arguments, ``keep_prob`` at its current value."""
        config: dict[str, Any] = super().get_config()
        current = float(self.keep_prob.value)
        given = self._given_keep_prob
        config.update(
            # The number given, not its float32 rounding (0.9, not 0.8999999761581421), while
            # the variable still holds it.
            keep_prob=given if np.float32(given) == np.float32(current) else current,
            block_size=self.block_size,
            data_format=self.data_format,
            broadcast_dims=self.broadcast_dims,
            seed_region=self.seed_region,
            gamma=self.gamma,
            normalize=self.normalize,
            seed=self.seed,
        )
        return config


def _drop_block_layers(model: keras.layers.Layer) -> list[DropBlock]:
    """Every DropBlock in ``model``, itself included."""
    return [layer for layer in model._flatten_layers(include_self=True, recursive=True) if isinstance(layer, DropBlock)]


def set_keep_prob(model: keras.layers.Layer, value: ArrayLike) -> int:
    """Sets ``keep_prob`` of every :class:`DropBlock` in ``model`` (itself included).

    Safe inside ``model.fit``, through ``Callback.model`` or any other reference to the
    model being fit (one kept from before ``fit`` too): Keras's JAX trainer holds the
    variables in its own state during an epoch, so this first writes that state back
    to the model (``model.jax_state_sync()``), after which the next step reads the new
    value. The value is data to the train function, which is not recompiled. A layer
    or sub-model of the model being fit cannot reach the trainer's state: passing one
    mid-epoch is a ``RuntimeError`` instead of an assignment the trainer would
    overwrite.

    Args:
      model: a Keras model or layer.
      value: the new keep_prob, in [0, 1].

    Returns:
      The number of DropBlock layers set.

    Raises:
      ValueError: if ``model`` holds no DropBlock layer, or ``value`` is outside [0, 1].
      RuntimeError: if ``model.fit`` of a model that contains ``model`` holds the values.

    Examples:
      >>> import keras
      >>> from dropblock_jax.keras import DropBlock, set_keep_prob
      >>> class Schedule(keras.callbacks.Callback):
      ...     def on_train_batch_begin(self, batch, logs=None):
      ...         set_keep_prob(self.model, 0.9)
      >>> model = keras.Sequential([keras.Input((8, 8, 4)), DropBlock(keep_prob=0.95, block_size=3)])
      >>> set_keep_prob(model, 0.8)
      1
      >>> round(float(model.layers[0].keep_prob.value), 2)
      0.8
    """
    checked = _python_keep_prob("value", value)
    layers = _drop_block_layers(model)
    if not layers:
        raise ValueError(f"set_keep_prob found no dropblock_jax.keras.DropBlock layer in {model!r}.")
    # Inside fit the trainer's state, not the variables, is what the next step reads,
    # unless the state was written back; the assignment would otherwise be overwritten.
    sync = getattr(model, "jax_state_sync", None)
    if callable(sync):
        sync()
    held = [layer.name for layer in layers if _held_by_a_trainer(layer.keep_prob)]
    if held:
        raise RuntimeError(
            f"set_keep_prob got {model.name!r}, which is part of a model that model.fit is training: the trainer "
            f"holds the values of {held} and would overwrite the assignment. Pass the model fit was called on "
            "(self.model in a keras.callbacks.Callback), or use dropblock_jax.keras.KeepProbScheduler."
        )
    for layer in layers:
        layer._assign_keep_prob(checked)
    return len(layers)


class KeepProbScheduler(keras.callbacks.Callback):
    """Sets every :class:`DropBlock`'s ``keep_prob`` from a schedule at each training step.

    Used like ``keras.callbacks.LearningRateScheduler``, per step instead of per epoch:
    before each training step it sets every DropBlock of the model being fit to
    ``schedule(step)`` (through :func:`set_keep_prob`, so the train function is not
    recompiled), and it logs the value as ``logs["keep_prob"]``, per batch and per
    epoch (so ``model.fit(...).history["keep_prob"]`` holds each epoch's last value).

    ``step`` is the global training step, the number of batches the model has been
    trained on, from 0: the optimizer's ``iterations`` when ``fit`` starts, plus the
    batches of this ``fit``. A second ``fit``, or one that resumes a saved model,
    continues the schedule where it stopped. With ``steps_per_execution=k`` the value
    is set once for each ``k`` steps, from the first of them.

    Args:
      schedule: a function of the step (an int) that returns a keep_prob in [0, 1],
        e.g. ``optax.linear_schedule(1.0, 0.9, total_steps - 1)``, whose last step
        uses the target.
      verbose: 0 is quiet, 1 prints each value set.

    Raises:
      TypeError: if ``schedule`` is not callable or ``verbose`` not an int.

    Examples:
      >>> import keras
      >>> import numpy as np
      >>> from dropblock_jax.keras import DropBlock, KeepProbScheduler
      >>> model = keras.Sequential([keras.Input((8, 8, 2)), DropBlock(block_size=3), keras.layers.Flatten()])
      >>> model.compile("sgd", "mse")
      >>> scheduler = KeepProbScheduler(lambda step: 1.0 - 0.05 * step)  # 4 steps: 1.0 .. 0.85
      >>> history = model.fit(np.ones((8, 8, 8, 2)), np.ones((8, 128)), batch_size=2, verbose=0,
      ...                     callbacks=[scheduler])
      >>> round(history.history["keep_prob"][-1], 2)
      0.85
    """

    def __init__(self, schedule: Callable[[int], ArrayLike], verbose: int = 0) -> None:
        if not callable(schedule):
            raise TypeError(f"schedule must be a function of the step that returns a keep_prob, got {schedule!r}.")
        verbose = check_int("verbose", verbose, detail=" (0: quiet, 1: print each value)")
        super().__init__()
        self.schedule = schedule
        self.verbose = verbose
        self._epoch_start = 0
        self._next_step = 0
        self._keep_prob: float | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Starts the step count at the batches the model was trained on before."""
        optimizer = getattr(self.model, "optimizer", None)
        self._next_step = int(optimizer.iterations.value) if optimizer is not None else 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Notes the global step of the epoch's first batch."""
        self._epoch_start = self._next_step

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Sets keep_prob to ``schedule(step)`` before the step runs."""
        step = self._epoch_start + batch
        self._keep_prob = _python_keep_prob(f"schedule({step})", self.schedule(step))
        set_keep_prob(self.model, self._keep_prob)
        if self.verbose > 0:
            print(f"\nStep {step}: KeepProbScheduler setting keep_prob to {self._keep_prob}.")

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Logs the step's keep_prob."""
        self._next_step = self._epoch_start + batch + 1
        if logs is not None and self._keep_prob is not None:
            logs["keep_prob"] = self._keep_prob

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Logs the last keep_prob of the epoch."""
        if logs is not None and self._keep_prob is not None:
            logs["keep_prob"] = self._keep_prob
