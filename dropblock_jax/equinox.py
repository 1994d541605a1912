"""Equinox DropBlock layer (optional dependency: ``pip install 'equinox>=0.13.1'``)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

try:
    import equinox as eqx
except ImportError as error:
    raise ImportError(
        "dropblock_jax.equinox needs Equinox, which is not installed: pip install 'equinox>=0.13.1'"
    ) from error

from dropblock_jax._checks import (
    DEFAULT_SPATIAL_RANK,
    axes_tuple,
    check_bool,
    concrete_value,
    parse_block_size,
    static_block_size,
)
from dropblock_jax._functional import drop_block
from dropblock_jax._layer_options import check_layer_arguments, layer_options, rejects_ported_arguments

__all__ = ["DropBlock"]


def _stand_in_spatial_axes(block_size: int | Sequence[int]) -> tuple[int, ...]:
    """Axes that stand for the default spatial axes (every axis after the first) at construction.

    A tuple ``block_size`` fits a sample of one more dimension only, so its axes are
    exact. An int fits any rank; the axes of a ``(C, H, W)`` sample stand in, so that
    messages name what an image's call would. A positive axis among them fails at every
    call (it is spatial, or out of range), so no argument that some input fits is refused.
    """
    count = len(block_size) if isinstance(block_size, (tuple, list)) else DEFAULT_SPATIAL_RANK
    return tuple(range(1, 1 + count))


class DropBlock(eqx.Module):
    """DropBlock as an Equinox layer, used like ``equinox.nn.Dropout``.

    ``inference=True`` (at construction, at the call, or through
    ``eqx.nn.inference_mode``) returns ``x`` unchanged and needs no key; training
    without a key is a ``RuntimeError``, as in ``eqx.nn.Dropout``.

    Equinox models call their layers on one unbatched sample under ``jax.vmap``, laid
    out as ``eqx.nn.Conv`` lays it out, channels first: ``(C, H, W)``, ``(C, T)``,
    ``(C, D, H, W)``. So the default ``spatial_axes=None`` means every axis after the
    first (``(1, 2)`` for ``(C, H, W)``, ``(1,)`` for ``(C, T)``), and an int
    ``block_size`` is a cube over them. A channels-last sample ``(H, W, C)`` takes
    ``spatial_axes=(0, 1)``. (``drop_block``'s own default is channels-last, Flax's
    layout; the layer follows its framework instead.) A batch passed without ``vmap``
    is one sample to the layer, which cannot tell them apart: ``(N, C, H, W)`` is read
    as a ``(C, D, H, W)`` volume, with blocks across samples, so ``vmap`` over the
    batch. Under ``vmap`` the ``"batch"`` normalization counts over the one sample it
    sees, unless ``axis_name`` names the vmapped axis (``jax.vmap(..., axis_name="batch")``).

    ``keep_prob`` is a plain Python float, like ``eqx.nn.Dropout.p``: ``eqx.filter_jit``
    treats it as static and optimizers never see it, whatever the filter
    (``eqx.is_array``, ``eqx.is_inexact_array``) and with weight decay, so training
    never changes it. A schedule reaches the layer at the call,
    ``layer(x, key=key, keep_prob=keep)``, where ``keep`` may be traced: the model
    threads it like it threads ``key``, and the train step compiles once.
    ``eqx.tree_at(lambda m: m.keep_prob, layer, 0.95)`` with a Python float gives a
    layer with a new fixed keep_prob; an ``eqx.filter_jit`` function retraces once for
    it, as for any changed static field. Putting an array there instead makes it a leaf
    that optimizers update (weight decay would shrink it): pass schedules at the call.

    With the default axes, what depends on the sample's rank (an axis out of range, a
    negative axis of ``broadcast_dims`` that is spatial in it, a tuple ``block_size`` of
    another length) is checked at the call.

    What the four layers share (keyword-only ``keep_prob``, the checks when the layer is
    built, ``drop_block``'s result for the layer's key, a traced ``keep_prob``, keys per
    device) is on the :ref:`layers page <layer-contract>`.

    Args:
      keep_prob: probability of keeping a unit, a concrete number in [0, 1].
      block_size: int (a cube over the spatial axes) or tuple of ints, one per spatial axis.
      spatial_axes: the axes blocks extend over; None means every axis after the first.
      broadcast_dims, seed_region, gamma, normalize, axis_name: as in
        :func:`dropblock_jax.drop_block`.
      inference: if True, the layer is the identity.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import equinox as eqx
      >>> from dropblock_jax.equinox import DropBlock
      >>> conv = eqx.nn.Conv2d(3, 4, 3, padding=1, key=jax.random.key(0))
      >>> layer = DropBlock(keep_prob=0.9, block_size=3)  # blocks over H and W of (C, H, W)
      >>> x = conv(jnp.ones((3, 8, 8)))
      >>> layer(x, key=jax.random.key(1)).shape
      (4, 8, 8)
      >>> keys = jax.random.split(jax.random.key(2), 2)
      >>> jax.vmap(lambda x, k: layer(x, key=k, keep_prob=0.95))(jnp.ones((2, 4, 8, 8)), keys).shape
      (2, 4, 8, 8)
      >>> bool((eqx.nn.inference_mode(layer)(x) == x).all())
      True
    """

    keep_prob: float
    inference: bool
    # An int while spatial_axes is None: a cube over however many axes follow the first.
    block_size: int | tuple[int, ...] = eqx.field(static=True)
    spatial_axes: tuple[int, ...] | None = eqx.field(static=True)
    broadcast_dims: tuple[int, ...] = eqx.field(static=True)
    seed_region: str = eqx.field(static=True)
    gamma: str = eqx.field(static=True)
    normalize: str = eqx.field(static=True)
    axis_name: Hashable | None = eqx.field(static=True)

    @rejects_ported_arguments
    def __init__(
        self,
        *,
        keep_prob: float = 0.9,
        block_size: int | Sequence[int] = 7,
        spatial_axes: Sequence[int] | None = None,
        broadcast_dims: Sequence[int] = (),
        seed_region: str = "valid",
        gamma: str = "paper",
        normalize: str = "batch",
        axis_name: Hashable | None = None,
        inference: bool = False,
    ) -> None:
        # The default axes depend on the input's rank; checked against axes they
        # contain for every input, the arguments fail here exactly when they fail at
        # every call, with drop_block's messages.
        check_layer_arguments(
            keep_prob=keep_prob,
            block_size=block_size,
            spatial_axes=_stand_in_spatial_axes(block_size) if spatial_axes is None else spatial_axes,
            broadcast_dims=broadcast_dims,
            seed_region=seed_region,
            gamma=gamma,
            normalize=normalize,
            axis_name=axis_name,
        )
        concrete = concrete_value(keep_prob)
        if concrete is None:
            raise TypeError(
                "keep_prob must be a concrete number at construction, got a traced value; "
                "pass a traced keep_prob (a schedule) at the call: layer(x, key=key, keep_prob=keep)."
            )
        self.keep_prob = concrete
        if spatial_axes is None:
            self.spatial_axes = None
            self.block_size = static_block_size(block_size)
        else:
            self.spatial_axes = axes_tuple("spatial_axes", spatial_axes)
            # Parsed once here; as a tuple it means the same to drop_block as the int did.
            self.block_size = parse_block_size(block_size, len(self.spatial_axes))
        self.broadcast_dims = axes_tuple("broadcast_dims", broadcast_dims)
        self.seed_region = seed_region
        self.gamma = gamma
        self.normalize = normalize
        self.axis_name = axis_name
        self.inference = check_bool("inference", inference)

    def _spatial_axes_of(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The axes blocks extend over in an input of ``shape``: the given ones, else every axis after the first."""
        if self.spatial_axes is not None:
            return self.spatial_axes
        if len(shape) < 2:
            raise ValueError(
                "DropBlock's default spatial_axes are the axes after the first (channel) axis of one "
                f"(C, *spatial) sample, but x has shape {tuple(shape)}; pass spatial_axes explicitly."
            )
        return tuple(range(1, len(shape)))

    def __call__(
        self,
        x: jax.Array,
        *,
        key: jax.Array | None = None,
        inference: bool | None = None,
        keep_prob: ArrayLike | None = None,
    ) -> jax.Array:
        """Applies DropBlock to ``x``.

        Args:
          x: floating feature map, usually one unbatched ``(C, *spatial)`` sample.
          key: a PRNG key; required unless in inference mode.
          inference: overrides the ``inference`` field for this call.
          keep_prob: overrides the ``keep_prob`` field for this call; may be traced
            (a schedule), so one compiled step serves every value.

        Returns:
          ``x`` with blocks dropped, or ``x`` itself in inference mode.

        Raises:
          RuntimeError: in training mode without a key.
          ValueError: if ``x`` does not fit the layer's axes or ``block_size``.
        """
        if self.inference if inference is None else inference:
            return x
        if key is None:
            raise RuntimeError(
                "DropBlock is in training mode (inference=False) but got no key. Either:\n"
                "  1. pass a key: layer(x, key=jax.random.key(0)), one per call (split it),\n"
                "  2. switch it off: eqx.nn.inference_mode(model), DropBlock(..., inference=True) "
                "or layer(x, inference=True)."
            )
        keep = self.keep_prob if keep_prob is None else keep_prob
        options = {**layer_options(self), "spatial_axes": self._spatial_axes_of(jnp.shape(x))}
        return drop_block(key, x, keep, self.block_size, **options)
