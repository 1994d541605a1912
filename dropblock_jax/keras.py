"""Keras 3 DropBlock layer for the JAX backend (optional extra: ``pip install dropblock-jax[keras]``)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

try:
    import keras
except ImportError as error:
    raise ImportError(
        "dropblock_jax.keras needs Keras 3, which is not installed: pip install dropblock-jax[keras]"
    ) from error

from dropblock_jax._functional import drop_block
from dropblock_jax._geometry import GAMMA_MODES, NORMALIZE_MODES, SEED_REGIONS, check_choice, parse_block_size
from dropblock_jax._rates import checked_probability

__all__ = ["DropBlock", "set_keep_prob"]

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


@keras.saving.register_keras_serializable(package="dropblock_jax")
class DropBlock(keras.layers.Layer):
    """DropBlock as a Keras 3 layer (JAX backend), used like ``keras.layers.Dropout``.

    In training (``training=True``, which ``model.fit`` passes) the layer draws a key
    from its ``keras.random.SeedGenerator`` and returns
    :func:`dropblock_jax.drop_block` of the inputs for that key; otherwise it returns
    the inputs unchanged. The key is the generator's state before the draw, a uint32
    pair, as threefry2x32 key data
    (``jax.random.wrap_key_data(state, impl="threefry2x32")``), whatever
    ``jax_default_prng_impl`` says. The state is a non-trainable variable, so every
    step of ``model.fit``'s stateless JAX train function draws a new mask.

    Blocks extend over the spatial axes of ``data_format``: the axes between the batch
    and the channels for ``"channels_last"`` (``(N, H, W, C)``, ``(N, T, C)``,
    ``(N, D, H, W, C)``), the axes after the channels for ``"channels_first"``. An int
    ``block_size`` is a cube over all spatial axes of the input (a square for images),
    a tuple has one entry per spatial axis.

    ``keep_prob`` is a non-trainable float32 ``keras.Variable``. The train function
    reads it as data, so assigning it (use :func:`set_keep_prob` in a
    ``keras.callbacks.Callback``) follows a schedule without recompiling. During
    ``fit`` Keras's JAX trainer keeps the model's variables in its own state and writes
    them back only at the end of each epoch or when a callback reads
    ``Callback.model``: assign through ``self.model`` (as :func:`set_keep_prob` does),
    not through a layer reference kept from before ``fit``, whose assignment the
    trainer would overwrite. A value assigned outside [0, 1] is clipped inside a
    compiled function and raises in an eager call.

    ``get_config`` reports the current ``keep_prob``; ``.keras`` files hold it and the
    generator's state as weights, so a loaded model continues the saved schedule and
    random stream.

    Args:
      keep_prob: probability of keeping a unit, in [0, 1].
      block_size: int (a cube over the spatial axes) or tuple of ints, one per spatial axis.
      data_format: ``"channels_last"`` or ``"channels_first"``; None means
        ``keras.config.image_data_format()`` at construction.
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
      >>> model = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.Conv2D(4, 3), DropBlock(block_size=3)])
      >>> model.output_shape
      (None, 6, 6, 4)

    References:
      Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional networks",
      NeurIPS 2018 (arXiv 1810.12890).
    """

    def __init__(
        self,
        *,
        keep_prob: ArrayLike = 0.9,
        block_size: int | Sequence[int] = 7,
        data_format: str | None = None,
        seed_region: str = "valid",
        gamma: str = "paper",
        normalize: str = "batch",
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        _check_jax_backend()
        checked_keep_prob = float(checked_probability("keep_prob", keep_prob))
        parse_block_size(block_size)
        if data_format is None:
            data_format = keras.config.image_data_format()
        if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)):
            raise TypeError(f"seed must be an int or None, got {seed!r}.")
        super().__init__(**kwargs)
        # Held as given (an int stays a cube over however many spatial axes the input has).
        self.block_size = tuple(int(b) for b in block_size) if isinstance(block_size, Sequence) else int(block_size)
        self.data_format = check_choice("data_format", data_format, DATA_FORMATS)
        self.seed_region = check_choice("seed_region", seed_region, SEED_REGIONS)
        self.gamma = check_choice("gamma", gamma, GAMMA_MODES)
        self.normalize = check_choice("normalize", normalize, NORMALIZE_MODES)
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
        self.supports_masking = True

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
        first = 1 if self.data_format == "channels_last" else 2
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
            seed_region=self.seed_region,
            gamma=self.gamma,
            normalize=self.normalize,
        )

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
        config.update(
            keep_prob=float(self.keep_prob.value),
            block_size=self.block_size,
            data_format=self.data_format,
            seed_region=self.seed_region,
            gamma=self.gamma,
            normalize=self.normalize,
            seed=self.seed,
        )
        return config


def set_keep_prob(model: keras.layers.Layer, value: ArrayLike) -> int:
    """Sets ``keep_prob`` of every :class:`DropBlock` in ``model`` (itself included).

    Safe inside ``model.fit``: Keras's JAX trainer holds the variables in its own state
    during an epoch, so this first writes that state back to the model
    (``model.jax_state_sync()``), after which the next step reads the new value. The
    value is data to the train function, which is not recompiled.

    Args:
      model: a Keras model or layer.
      value: the new keep_prob, in [0, 1].

    Returns:
      The number of DropBlock layers set.

    Raises:
      ValueError: if ``model`` holds no DropBlock layer, or ``value`` is outside [0, 1].

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
    checked = float(checked_probability("value", value))
    layers = [
        layer for layer in model._flatten_layers(include_self=True, recursive=True) if isinstance(layer, DropBlock)
    ]
    if not layers:
        raise ValueError(f"set_keep_prob found no dropblock_jax.keras.DropBlock layer in {model!r}.")
    # Inside fit the trainer's state, not the variables, is what the next step reads,
    # unless the state was written back; the assignment would otherwise be overwritten.
    sync = getattr(model, "jax_state_sync", None)
    if callable(sync):
        sync()
    for layer in layers:
        layer.keep_prob.assign(checked)
    return len(layers)
