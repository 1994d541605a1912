"""Flax NNX DropBlock layer and ``set_keep_prob``."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from dropblock_jax._checks import axes_tuple, check_key, checked_probability, static_block_size
from dropblock_jax._functional import drop_block
from dropblock_jax._layer_options import (
    check_layer_arguments,
    check_layer_input,
    layer_options,
    rejects_ported_arguments,
)

__all__ = ["DropBlock", "set_keep_prob"]


class DropBlock(nnx.Module):
    """DropBlock as an NNX layer, used like ``flax.nnx.Dropout``.

    ``model.train()`` / ``model.eval()`` and ``nnx.view(model, deterministic=...)``
    switch it; every call draws a new mask from the rng stream it forked at
    construction (or from ``rngs`` given at the call: an ``nnx.Rngs``, an
    ``nnx.RngStream`` or a key). ``keep_prob`` is held as data (an ``nnx.Variable``, not
    an ``nnx.Param``), so :func:`set_keep_prob` changes it without retracing an
    ``nnx.jit`` function and optimizers leave it alone; ``layer.keep_prob = v`` writes
    ``v`` there too. Training without rngs is a ValueError that lists the fixes.

    What the four layers share (keyword-only ``keep_prob``, the checks when the layer is
    built, ``drop_block``'s result for the layer's key, a traced ``keep_prob``, keys per
    device) is on the :ref:`layers page <layer-contract>`.

    Args:
      keep_prob: probability of keeping a unit.
      block_size: int or tuple of ints, one per spatial axis. The input is
        batched: with the default ``spatial_axes`` an int needs an ``(N, H, W, C)``
        input (a square over H and W) and a tuple's axes must not reach axis 0;
        ``(k,)`` for ``(N, T, C)``, ``(k, k, k)`` for ``(N, D, H, W, C)``.
      spatial_axes, broadcast_dims, seed_region, gamma, normalize, axis_name: as in
        :func:`dropblock_jax.drop_block`; channels-first ``(N, C, H, W)`` input needs
        ``spatial_axes=(2, 3)``, which the layer cannot infer.
      deterministic: if True, the layer is the identity.
      rng_collection: the rng stream the keys come from.
      rngs: an ``nnx.Rngs`` or ``nnx.RngStream``; forked at construction.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from dropblock_jax.nnx import DropBlock
      >>> layer = DropBlock(keep_prob=0.9, block_size=3, rngs=nnx.Rngs(dropout=0))
      >>> x = jnp.ones((2, 8, 8, 4))
      >>> layer(x).shape
      (2, 8, 8, 4)
      >>> layer.eval()
      >>> bool((layer(x) == x).all())
      True
    """

    @rejects_ported_arguments
    def __init__(
        self,
        *,
        keep_prob: float = 0.9,
        block_size: int | tuple[int, ...] = 7,
        spatial_axes: Sequence[int] | None = None,
        broadcast_dims: Sequence[int] = (),
        seed_region: str = "valid",
        gamma: str = "paper",
        normalize: str = "batch",
        axis_name: str | None = None,
        deterministic: bool = False,
        rng_collection: str = "dropout",
        rngs: nnx.Rngs | nnx.RngStream | None = None,
    ) -> None:
        check_layer_arguments(
            keep_prob=keep_prob,
            block_size=block_size,
            spatial_axes=spatial_axes,
            broadcast_dims=broadcast_dims,
            seed_region=seed_region,
            gamma=gamma,
            normalize=normalize,
            axis_name=axis_name,
        )
        self.keep_prob = nnx.Variable(jnp.asarray(keep_prob, jnp.float32))
        # Held as tuples, so that changing the caller's list later leaves the layer alone.
        self.block_size = static_block_size(block_size)
        self.spatial_axes = None if spatial_axes is None else axes_tuple("spatial_axes", spatial_axes)
        self.broadcast_dims = axes_tuple("broadcast_dims", broadcast_dims)
        self.seed_region = seed_region
        self.gamma = gamma
        self.normalize = normalize
        self.axis_name = axis_name
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        if isinstance(rngs, nnx.Rngs):
            self.rngs = _stream(rngs, rng_collection).fork()
        elif isinstance(rngs, nnx.RngStream):
            self.rngs = rngs.fork()
        elif rngs is None:
            self.rngs = nnx.data(None)
        else:
            raise TypeError(
                f"rngs must be an nnx.Rngs, an nnx.RngStream or None, got {rngs!r} ({type(rngs).__name__}); "
                "e.g. DropBlock(..., rngs=nnx.Rngs(dropout=0)). A PRNG key can be passed at the call."
            )

    def __call__(
        self,
        inputs: jax.Array,
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
        keep_prob: ArrayLike | None = None,
    ) -> jax.Array:
        """Applies DropBlock to ``inputs``.

        Args:
          inputs: floating feature map.
          deterministic: overrides the attribute for this call.
          rngs: an ``nnx.Rngs``, ``nnx.RngStream`` or key to use instead of the
            layer's own stream.
          keep_prob: overrides the stored keep_prob for this call; may be traced.

        Returns:
          ``inputs`` with blocks dropped, or ``inputs`` itself when deterministic.
        """
        check_layer_input(inputs, self.block_size, self.spatial_axes)
        if self.deterministic if deterministic is None else deterministic:
            return inputs
        key = self._key(rngs)
        keep = self.keep_prob[...] if keep_prob is None else keep_prob
        return drop_block(key, inputs, keep, self.block_size, **layer_options(self))

    def _key(self, rngs: nnx.Rngs | nnx.RngStream | jax.Array | None) -> jax.Array:
        if rngs is None and self.rngs is None:
            raise ValueError(
                "DropBlock is in training mode (deterministic=False) but has no rngs. Either:\n"
                "  1. pass rngs to the constructor: DropBlock(..., rngs=nnx.Rngs(dropout=0)),\n"
                "  2. pass rngs to the call: layer(x, rngs=nnx.Rngs(dropout=0)) or a key,\n"
                "  3. switch it off: model.eval(), nnx.view(model, deterministic=True) or "
                "layer(x, deterministic=True)."
            )
        rngs = self.rngs if rngs is None else rngs
        if isinstance(rngs, nnx.Rngs):
            return _stream(rngs, self.rng_collection)()
        if isinstance(rngs, nnx.RngStream):
            return rngs()
        try:
            return check_key(rngs)
        except TypeError:
            raise TypeError(
                "rngs must be an nnx.Rngs, an nnx.RngStream or a PRNG key (jax.random.key of any impl, "
                f"or a legacy jax.random.PRNGKey, also as a NumPy array), got {rngs!r} ({type(rngs).__name__})."
            ) from None

    def __setattr__(self, name: str, value: object) -> None:
        """Writes ``layer.keep_prob = v`` into the stored variable, as :func:`set_keep_prob` does.

        An ``nnx.jit`` function that takes the layer then sees new data, not a new
        structure, and does not retrace; a value outside [0, 1] is refused here. Any other
        attribute, and an ``nnx.Variable`` put in place of the stored one, is set as usual.
        """
        if (
            name == "keep_prob"
            and isinstance(vars(self).get(name), nnx.Variable)
            and not isinstance(value, nnx.Variable)
        ):
            _store_keep_prob(self, checked_probability("keep_prob", value))  # type: ignore[arg-type]
            return
        super().__setattr__(name, value)

    def set_view(self, deterministic: bool | None = None) -> None:
        """Used by ``nnx.view``: ``deterministic=True`` disables DropBlock."""
        if deterministic is not None:
            self.deterministic = deterministic


def set_keep_prob(module_tree: object, value: ArrayLike) -> int:
    """Sets ``keep_prob`` of every :class:`DropBlock` inside ``module_tree`` to ``value``.

    Every layer gets the same value; a model whose stages use different keep_probs
    (e.g. :meth:`dropblock_jax.models.ResNet.set_stage_keep_probs`) sets them itself.
    The value is stored in each layer's ``keep_prob`` variable, so an ``nnx.jit``
    function that takes the model sees new data, not a new structure, and does not
    retrace. The variable keeps its dtype, shape and sharding, also on a mesh (Explicit
    or Auto, inside ``jax.set_mesh`` or not), and a stack of layers made with
    ``nnx.vmap`` gets the value in every layer.

    Args:
      module_tree: an NNX module (or any node ``nnx.iter_graph`` walks).
      value: the new keep_prob, in [0, 1]; may be traced.

    Returns:
      The number of layers set.

    Raises:
      ValueError: if ``module_tree`` holds no :class:`DropBlock` (e.g. an
        ``nnx.Optimizer`` passed instead of the model), or for a ``value`` outside [0, 1].

    Examples:
      >>> from flax import nnx
      >>> from dropblock_jax.nnx import DropBlock, set_keep_prob
      >>> model = nnx.Sequential(DropBlock(keep_prob=0.9, block_size=3, rngs=nnx.Rngs(0)))
      >>> set_keep_prob(model, 0.95)
      1
      >>> round(float(model.layers[0].keep_prob[...]), 2)
      0.95
    """
    value = checked_probability("value", value)
    layers = [node for _, node in nnx.iter_graph(module_tree) if isinstance(node, DropBlock)]
    if not layers:
        raise ValueError(
            f"set_keep_prob found no dropblock_jax.nnx.DropBlock inside the {type(module_tree).__name__} it was "
            "given; pass the model that holds the layers (an nnx.Optimizer does not hold the model)."
        )
    for layer in layers:
        _store_keep_prob(layer, value)
    return len(layers)


def _store_keep_prob(layer: DropBlock, value: jax.Array) -> None:
    """Writes a checked ``value`` into ``layer``'s keep_prob variable."""
    stored = layer.keep_prob[...]
    # An array like the stored one (its dtype, shape and sharding, the sharding type when
    # traced), so that no single-device array meets a mesh's, which an Explicit mesh
    # refuses outside jax.set_mesh; written into the stored array, so that under jit an
    # Auto mesh keeps its layout too and the next call compiles nothing new.
    layer.keep_prob[...] = stored.at[...].set(jax.lax.full_like(stored, value))


def _stream(rngs: nnx.Rngs, name: str) -> nnx.RngStream:
    """The stream ``name`` of ``rngs`` (Flax falls back to ``default``), or an error naming DropBlock's fix."""
    try:
        return rngs[name]
    except KeyError:
        raise ValueError(
            f"DropBlock draws its masks from the {name!r} rng stream, but the nnx.Rngs it got has neither a "
            f"{name!r} nor a 'default' stream; pass nnx.Rngs({name}=0) (or nnx.Rngs(params=0, {name}=1) for a "
            "whole model), or choose another stream with DropBlock(..., rng_collection=...)."
        ) from None
