"""Equinox DropBlock layer (optional extra: ``pip install dropblock-jax[equinox]``)."""

from __future__ import annotations

import sys
from collections.abc import Hashable, Sequence

import jax
from jax.typing import ArrayLike

try:
    import equinox as eqx
except ImportError as error:
    raise ImportError(
        "dropblock_jax.equinox needs Equinox, which is not installed: pip install dropblock-jax[equinox]"
    ) from error

from dropblock_jax._functional import drop_block, layer_options
from dropblock_jax._geometry import (
    GAMMA_MODES,
    NORMALIZE_MODES,
    SEED_REGIONS,
    _normalize_axes,
    check_axis_name,
    check_choice,
    parse_block_size,
)
from dropblock_jax._rates import checked_probability, concrete_value

__all__ = ["DropBlock"]

# The rank of the input is known only at the call. At construction the axes are checked
# against an unbounded rank (type and repeats); their range is checked at the call.
_UNKNOWN_RANK = sys.maxsize


def _axes_tuple(name: str, axes: int | Sequence[int]) -> tuple[int, ...]:
    _normalize_axes(name, axes, _UNKNOWN_RANK)
    # _normalize_axes let through an int or a tuple or list of ints only.
    return tuple(int(a) for a in axes) if isinstance(axes, Sequence) else (int(axes),)


class DropBlock(eqx.Module):
    """DropBlock as an Equinox layer, used like ``equinox.nn.Dropout``.

    The layer only picks the flag and passes the key on; the work is
    :func:`dropblock_jax.drop_block`, and for the same key the result is
    ``drop_block``'s. ``inference=True`` (at construction, at the call, or through
    ``eqx.nn.inference_mode``) returns ``x`` unchanged and needs no key; training
    without a key is a ``RuntimeError``, as in ``eqx.nn.Dropout``.

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

    The other options are static fields. Equinox models see one unbatched sample under
    ``jax.vmap``: ``(H, W, C)`` inputs take the default ``spatial_axes``, ``(C, H, W)``
    inputs ``spatial_axes=(1, 2)``. Under ``vmap`` the ``"batch"`` normalization counts
    over the one sample it sees, unless ``axis_name`` names the vmapped axis
    (``jax.vmap(..., axis_name="batch")``).

    Arguments are keyword-only (``keep_prob`` is the probability of *keeping* a unit,
    not ``Dropout``'s rate) and checked at construction with the checks of
    ``drop_block``; those that depend on the input's rank (axes in range, no spatial
    axis in ``broadcast_dims``) at the first call.

    Args:
      keep_prob: probability of keeping a unit, a concrete number in [0, 1].
      block_size: int or tuple of ints, one per spatial axis.
      spatial_axes, broadcast_dims, seed_region, gamma, normalize, axis_name: as in
        :func:`dropblock_jax.drop_block`.
      inference: if True, the layer is the identity.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import equinox as eqx
      >>> from dropblock_jax.equinox import DropBlock
      >>> layer = DropBlock(keep_prob=0.9, block_size=3, spatial_axes=(1, 2))
      >>> x = jnp.ones((4, 8, 8))  # one (C, H, W) sample
      >>> layer(x, key=jax.random.key(0)).shape
      (4, 8, 8)
      >>> keys = jax.random.split(jax.random.key(1), 2)
      >>> jax.vmap(lambda x, k: layer(x, key=k, keep_prob=0.95))(jnp.ones((2, 4, 8, 8)), keys).shape
      (2, 4, 8, 8)
      >>> bool((eqx.nn.inference_mode(layer)(x) == x).all())
      True
    """

    keep_prob: float
    inference: bool
    block_size: tuple[int, ...] = eqx.field(static=True)
    spatial_axes: tuple[int, ...] | None = eqx.field(static=True)
    broadcast_dims: tuple[int, ...] = eqx.field(static=True)
    seed_region: str = eqx.field(static=True)
    gamma: str = eqx.field(static=True)
    normalize: str = eqx.field(static=True)
    axis_name: Hashable | None = eqx.field(static=True)

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
        checked_probability("keep_prob", keep_prob)
        concrete = concrete_value(keep_prob)
        if concrete is None:
            raise TypeError(
                "keep_prob must be a concrete number at construction, got a traced value; "
                "pass a traced keep_prob (a schedule) at the call: layer(x, key=key, keep_prob=keep)."
            )
        self.keep_prob = concrete
        self.spatial_axes = None if spatial_axes is None else _axes_tuple("spatial_axes", spatial_axes)
        rank = None if self.spatial_axes is None else len(self.spatial_axes)
        # Parsed once here; as a tuple it means the same to drop_block as the int did.
        self.block_size = parse_block_size(block_size, rank)
        self.broadcast_dims = _axes_tuple("broadcast_dims", broadcast_dims)
        self.seed_region = check_choice("seed_region", seed_region, SEED_REGIONS)
        self.gamma = check_choice("gamma", gamma, GAMMA_MODES)
        self.normalize = check_choice("normalize", normalize, NORMALIZE_MODES)
        self.axis_name = check_axis_name(axis_name)
        if not isinstance(inference, bool):
            raise TypeError(f"inference must be a bool, got {inference!r}.")
        self.inference = inference

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
          x: floating feature map, usually one unbatched sample.
          key: a PRNG key; required unless in inference mode.
          inference: overrides the ``inference`` field for this call.
          keep_prob: overrides the ``keep_prob`` field for this call; may be traced
            (a schedule), so one compiled step serves every value.

        Returns:
          ``x`` with blocks dropped, or ``x`` itself in inference mode.

        Raises:
          RuntimeError: in training mode without a key.
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
        return drop_block(key, x, keep, self.block_size, **layer_options(self))
