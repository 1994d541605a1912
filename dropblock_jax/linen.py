"""Flax Linen DropBlock layer."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import linen as nn
from jax.typing import ArrayLike

from dropblock_jax._functional import drop_block
from dropblock_jax._layer_options import (
    check_layer_arguments,
    check_layer_input,
    layer_options,
    rejects_ported_arguments,
)

__all__ = ["DropBlock"]


class DropBlock(nn.Module, kw_only=True):
    """DropBlock as a Linen layer, used like ``flax.linen.Dropout``.

    ``deterministic`` is merged like ``nn.Dropout``'s (given to the constructor or the
    call, not both); deterministic calls return ``inputs`` unchanged. The key is ``rng``
    when given, else ``self.make_rng(rng_collection)``, so each ``apply`` with
    ``rngs={"dropout": key}`` draws its own masks. The attributes are checked when the
    module is constructed and at every ``clone``, also through Flax's lifted
    transforms (``nn.remat(DropBlock)``) and in subclasses; an NNX-style ``rngs``
    argument is a TypeError that names the NNX layer.

    What the four layers share (keyword-only ``keep_prob``, the checks when the layer is
    built, ``drop_block``'s result for the layer's key, a traced ``keep_prob``, keys per
    device) is on the :ref:`layers page <layer-contract>`.

    Attributes:
      keep_prob: probability of keeping a unit; a ``keep_prob`` given at call time
        (which may be traced, e.g. from a schedule) overrides it.
      block_size: int or tuple of ints, one per spatial axis. The input is
        batched: with the default ``spatial_axes`` an int needs an ``(N, H, W, C)``
        input (a square over H and W) and a tuple's axes must not reach axis 0;
        ``(k,)`` for ``(N, T, C)``, ``(k, k, k)`` for ``(N, D, H, W, C)``.
      spatial_axes, broadcast_dims, seed_region, gamma, normalize, axis_name: as in
        :func:`dropblock_jax.drop_block`; channels-first ``(N, C, H, W)`` input needs
        ``spatial_axes=(2, 3)``, which the layer cannot infer.
      deterministic: if True, the layer is the identity.
      rng_collection: the rng collection the key comes from.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dropblock_jax import DropBlock
      >>> layer = DropBlock(keep_prob=0.9, block_size=3)
      >>> x = jnp.ones((2, 8, 8, 4))
      >>> y = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
      >>> y.shape
      (2, 8, 8, 4)
      >>> bool((layer.apply({}, x, deterministic=True) == x).all())
      True
    """

    keep_prob: float = 0.9
    block_size: int | tuple[int, ...] = 7
    spatial_axes: Sequence[int] | None = None
    broadcast_dims: Sequence[int] = ()
    seed_region: str = "valid"
    gamma: str = "paper"
    normalize: str = "batch"
    axis_name: str | None = None
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Gives every subclass, Flax's lifted ones (``nn.remat(DropBlock)``) included, the constructor's checks."""
        super().__init_subclass__(**kwargs)
        cls.__init__ = _checked_init(cls.__init__)  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        """Checks the attributes when the module is constructed (and cloned)."""
        check_layer_arguments(keep_prob=self.keep_prob, block_size=self.block_size, **layer_options(self))
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        deterministic: bool | None = None,
        rng: jax.Array | None = None,
        keep_prob: ArrayLike | None = None,
    ) -> jax.Array:
        """Applies DropBlock to ``inputs``.

        Args:
          inputs: floating feature map.
          deterministic: overrides nothing: exactly one of the attribute and this
            argument must be given (``nn.merge_param``).
          rng: a PRNG key to use instead of ``make_rng(rng_collection)``.
          keep_prob: overrides the attribute; may be traced.

        Returns:
          ``inputs`` with blocks dropped, or ``inputs`` itself when deterministic.
        """
        check_layer_input(inputs, self.block_size, self.spatial_axes)
        if nn.merge_param("deterministic", self.deterministic, deterministic):
            return inputs
        if rng is None:
            rng = self.make_rng(self.rng_collection)
        keep = self.keep_prob if keep_prob is None else keep_prob
        return drop_block(rng, inputs, keep, self.block_size, **layer_options(self))


def _checked_init(init: Callable[..., None]) -> Callable[..., None]:
    """Wraps a dataclass ``__init__`` so that the likely slips of a port get errors saying what to write.

    A positional or dropout-style argument gets the keep_prob conversion, an NNX-style
    ``rngs`` the name of the NNX layer. Keyword calls, as ``clone()`` and Flax's
    transforms make them, pass through.
    """

    @functools.wraps(init)
    def checked_init(self: DropBlock, *args: Any, **kwargs: Any) -> None:
        if "rngs" in kwargs:
            raise TypeError(
                "dropblock_jax.DropBlock is the Flax Linen layer: it takes no rngs, its key comes from "
                "apply(..., rngs={'dropout': key}). The Flax NNX layer, which takes rngs, is "
                "dropblock_jax.nnx.DropBlock (from dropblock_jax.nnx import DropBlock)."
            )
        init(self, *args, **kwargs)

    return rejects_ported_arguments(checked_init)


# Flax makes the dataclass __init__ when the class is created, so it is wrapped after.
DropBlock.__init__ = _checked_init(DropBlock.__init__)  # type: ignore[method-assign]
