"""A small ResNet in Flax NNX with DropBlock placed as the paper's authors place it.

The authors' ResNet (the TensorFlow TPU reference implementation that accompanies
the paper) applies DropBlock in the last two block groups only, after every batch norm
of the residual branch and after the batch norm of the projection shortcut. The last
group uses ``keep_prob``; the group before it drops four times less,
``1 - (1 - keep_prob) / 4``. :class:`ResNet` reproduces that placement for any number
of stages, and can put plain dropout or SpatialDropout at the very same places, so
the regularizers can be compared on equal terms.

:class:`InferenceDropBlock` applies DropBlock at those same places to a trained model
in eval mode, whatever its regularizer (``"none"`` included): the paper's test of how
spatially spread a network's representation is (Section 4.1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from dropblock_jax import drop_block
from dropblock_jax._rates import checked_probability
from dropblock_jax.nnx import DropBlock, set_keep_prob

__all__ = ["REGULARIZERS", "InferenceDropBlock", "ResNet", "ResidualBlock", "stage_keep_prob"]

#: The values of :class:`ResNet`'s ``regularizer``, the regularizers it can place (none, plain
#: dropout, SpatialDropout with one draw per channel map, or DropBlock).
REGULARIZERS = ("none", "dropout", "spatial_dropout", "dropblock")

# Later stages see coarser, more semantic features; the authors drop 4x less in
# the stage before the last one, and so on down the network.
_STAGE_DROP_DECAY = 4.0


def stage_keep_prob(keep_prob: ArrayLike, stages_from_last: int) -> jax.Array:
    """The keep probability of a stage ``stages_from_last`` stages before the last.

    ``1 - (1 - keep_prob) / 4 ** stages_from_last``: the last stage (0) uses
    ``keep_prob`` itself, the one before it (1) drops a quarter as much.

    Args:
      keep_prob: keep probability of the last stage, in [0, 1]; may be traced.
      stages_from_last: 0 for the last stage, 1 for the one before it, ...

    Returns:
      A float scalar in [0, 1].

    Examples:
      >>> from dropblock_jax.models import stage_keep_prob
      >>> round(float(stage_keep_prob(0.9, 1)), 3)
      0.975
    """
    return _stage_keep(checked_probability("keep_prob", keep_prob), stages_from_last)


def _stage_keep(keep: Any, stages_from_last: int) -> Any:
    """The 1/4 rule on a Python float (static, for constructors) or an array (a schedule)."""
    return 1.0 - (1.0 - keep) / _STAGE_DROP_DECAY**stages_from_last


def _check_args(
    regularizer: str,
    widths: Sequence[int],
    blocks: Sequence[int],
    regularized_stages: int,
    block_size: int | Sequence[int],
) -> None:
    if regularizer not in REGULARIZERS:
        raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {regularizer!r}.")
    if len(widths) == 0 or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"widths must be a non-empty sequence of positive ints, got {tuple(widths)!r}.")
    if len(blocks) != len(widths) or any(not isinstance(b, int) or b < 1 for b in blocks):
        raise ValueError(f"blocks must give a positive int per stage ({len(widths)} stages), got {tuple(blocks)!r}.")
    if not isinstance(regularized_stages, int) or not 0 <= regularized_stages <= len(widths):
        raise ValueError(
            f"regularized_stages must be an int in [0, {len(widths)}] (the number of stages), "
            f"got {regularized_stages!r}."
        )
    _check_block_size(block_size)


def _make_drop(
    regularizer: str, keep_prob: float, block_size: int | tuple[int, ...], rngs: nnx.Rngs
) -> DropBlock | nnx.Dropout | None:
    """The regularizing layer placed after a batch norm, or None."""
    if regularizer == "none":
        return None
    if regularizer == "dropblock":
        return DropBlock(keep_prob=float(keep_prob), block_size=block_size, rngs=rngs)
    # nnx.Dropout branches in Python on its rate, so it gets a concrete float.
    rate = 1.0 - float(keep_prob)
    if regularizer == "dropout":
        return nnx.Dropout(rate, rngs=rngs)
    # SpatialDropout: one draw per (sample, channel), shared over H and W.
    return nnx.Dropout(rate, broadcast_dims=(1, 2), rngs=rngs)


def _apply(drop: DropBlock | nnx.Dropout | None, x: jax.Array) -> jax.Array:
    return x if drop is None else drop(x)


# The regularizer places of a residual block, numbered for InferenceDropBlock's keys.
_PLACES = ("drop1", "drop2", "proj_drop")


def _check_block_size(block_size: int | Sequence[int]) -> None:
    try:
        sizes = (block_size,) if isinstance(block_size, int) else tuple(block_size)
    except TypeError:
        sizes = ()
    if not sizes or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in sizes):
        raise ValueError(f"block_size must be a positive int or a tuple of them, got {block_size!r}.")


@dataclasses.dataclass(frozen=True)
class InferenceDropBlock:
    """:func:`dropblock_jax.drop_block` at every regularizer place of a :class:`ResNet`.

    Pass it as ``model(x, perturb=InferenceDropBlock(key, keep_prob, block_size))``.
    It acts whatever the model's regularizer, ``"none"`` included (whose places hold
    no layer), and whatever its mode: on a model in eval mode (batch norm on running
    averages, the trained regularizer off) it is the only thing dropped. This is how
    the paper tests that DropBlock spreads a network's representation: units or
    blocks removed at inference cost a DropBlock-trained network less accuracy.

    Every place gets its own key, ``fold_in`` of ``key`` with the stage, block and
    place index, so two models of the same architecture see the same masks whatever
    their regularizer.

    Attributes:
      key: a JAX PRNG key.
      keep_prob: keep probability of the last stage; may be traced, so one compiled
        function serves every keep_prob.
      block_size: the block size; 1 is plain dropout.
      per_stage: if True (default), earlier regularized stages keep
        :func:`stage_keep_prob` of ``keep_prob``, as in training; if False every
        place uses ``keep_prob``.
      normalize: as in :func:`dropblock_jax.drop_block`; ``"batch"`` is the default
        of the trained DropBlock layers.

    Raises:
      ValueError: for a bad ``block_size`` or a concrete ``keep_prob`` outside [0, 1].

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from dropblock_jax.models import InferenceDropBlock, ResNet
      >>> model = ResNet(10, widths=(8, 16), blocks=(1, 1), regularizer="none",
      ...                rngs=nnx.Rngs(params=0))
      >>> model.eval()
      >>> x = jnp.ones((4, 16, 16, 1))
      >>> probe = InferenceDropBlock(jax.random.key(0), keep_prob=0.5, block_size=3)
      >>> bool((model(x, perturb=probe) == model(x)).all())
      False
    """

    key: jax.Array
    keep_prob: ArrayLike
    block_size: int | tuple[int, ...] = 1
    per_stage: bool = True
    normalize: str = "batch"

    def __post_init__(self) -> None:
        """Checks ``keep_prob``, ``block_size`` and ``per_stage``."""
        checked_probability("keep_prob", self.keep_prob)
        _check_block_size(self.block_size)
        if not isinstance(self.per_stage, bool):
            raise ValueError(f"per_stage must be True or False, got {self.per_stage!r}.")

    def __call__(self, x: jax.Array, place: Sequence[int], stages_from_last: int) -> jax.Array:
        """Drops blocks of ``x``, the output of the regularizer place ``place``."""
        key = self.key
        for index in place:
            key = jax.random.fold_in(key, index)
        keep = stage_keep_prob(self.keep_prob, stages_from_last) if self.per_stage else self.keep_prob
        return drop_block(key, x, keep, self.block_size, normalize=self.normalize)


class ResidualBlock(nnx.Module):
    """A basic (two 3x3 convolutions) residual block with optional regularization.

    Layout, as in the authors' ResNet: ``conv-bn-relu-drop``, ``conv-bn-drop``, a
    projection shortcut ``conv1x1-bn-drop`` when the shape changes, then
    ``relu(branch + shortcut)``. The second batch norm starts at zero scale, so each
    block starts as the identity.

    Args:
      in_features: input channels.
      out_features: output channels.
      strides: stride of the first convolution and of the shortcut.
      regularizer: one of ``"none"``, ``"dropout"``, ``"spatial_dropout"``,
        ``"dropblock"``.
      keep_prob: keep probability of the regularizer.
      block_size: DropBlock's block size (ignored by the other regularizers).
      bn_momentum: momentum of the batch norms' running statistics.
      rngs: ``nnx.Rngs`` with ``params`` and, when regularized, ``dropout`` streams.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        strides: int = 1,
        regularizer: str = "none",
        keep_prob: float = 1.0,
        block_size: int | tuple[int, ...] = 3,
        bn_momentum: float = 0.9,
        rngs: nnx.Rngs,
    ) -> None:
        conv: dict[str, Any] = dict(use_bias=False, rngs=rngs)
        self.conv1 = nnx.Conv(in_features, out_features, (3, 3), strides=strides, **conv)
        self.bn1 = nnx.BatchNorm(out_features, momentum=bn_momentum, rngs=rngs)
        self.drop1 = _make_drop(regularizer, keep_prob, block_size, rngs)
        self.conv2 = nnx.Conv(out_features, out_features, (3, 3), **conv)
        self.bn2 = nnx.BatchNorm(out_features, momentum=bn_momentum, scale_init=nnx.initializers.zeros, rngs=rngs)
        self.drop2 = _make_drop(regularizer, keep_prob, block_size, rngs)
        self.proj: nnx.Conv | None
        self.proj_bn: nnx.BatchNorm | None
        if strides != 1 or in_features != out_features:
            self.proj = nnx.Conv(in_features, out_features, (1, 1), strides=strides, **conv)
            self.proj_bn = nnx.BatchNorm(out_features, momentum=bn_momentum, rngs=rngs)
            self.proj_drop = _make_drop(regularizer, keep_prob, block_size, rngs)
        else:
            self.proj = self.proj_bn = self.proj_drop = None

    def __call__(self, x: jax.Array, perturb: Callable[[jax.Array, int], jax.Array] | None = None) -> jax.Array:
        """Applies the block; ``perturb(y, place)`` follows each regularizer place if given.

        ``place`` is the index of the place in ``("drop1", "drop2", "proj_drop")``.
        """

        def regularize(drop: DropBlock | nnx.Dropout | None, y: jax.Array, name: str) -> jax.Array:
            y = _apply(drop, y)
            return y if perturb is None else perturb(y, _PLACES.index(name))

        shortcut = x
        if self.proj is not None and self.proj_bn is not None:
            shortcut = regularize(self.proj_drop, self.proj_bn(self.proj(x)), "proj_drop")
        y = regularize(self.drop1, nnx.relu(self.bn1(self.conv1(x))), "drop1")
        y = regularize(self.drop2, self.bn2(self.conv2(y)), "drop2")
        return nnx.relu(y + shortcut)


class ResNet(nnx.Module):
    """A small ResNet for NHWC images, regularized where the DropBlock authors do it.

    A 3x3 stem, then ``len(widths)`` stages of basic residual blocks (every stage
    after the first halves the resolution), global average pooling and a linear
    classifier. The last ``regularized_stages`` stages get the regularizer after each
    batch norm and on the projection shortcut: the last stage with ``keep_prob``, the
    one before it with ``1 - (1 - keep_prob) / 4`` (see :func:`stage_keep_prob`).
    With the defaults this is the placement of the paper's ResNet-50 experiments
    (DropBlock in groups 3 and 4).

    ``model.train()`` / ``model.eval()`` switch batch norm and the regularizer
    together. A keep_prob schedule goes through :meth:`set_stage_keep_probs`, which keeps
    the per-stage ratio and never retraces an ``nnx.jit`` function.

    Args:
      num_classes: number of output logits.
      in_features: input channels.
      widths: channels of each stage.
      blocks: residual blocks in each stage.
      regularizer: ``"none"``, ``"dropout"``, ``"spatial_dropout"`` (dropout with
        one draw per channel, shared over H and W) or ``"dropblock"``.
      keep_prob: keep probability of the last stage.
      block_size: DropBlock's block size; clipped to each feature map.
      regularized_stages: how many of the last stages are regularized.
      bn_momentum: momentum of the batch norms' running statistics; the default
        0.9 suits short trainings.
      rngs: ``nnx.Rngs`` with ``params`` and ``dropout`` streams.

    Raises:
      ValueError: for an unknown regularizer or inconsistent stage arguments.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from dropblock_jax.models import ResNet
      >>> model = ResNet(10, widths=(8, 16), blocks=(1, 1), block_size=3,
      ...                rngs=nnx.Rngs(params=0, dropout=1))
      >>> model.set_stage_keep_probs(0.8)  # e.g. each step, from optax.linear_schedule
      5
      >>> [round(float(k), 2) for k in model.keep_probs()]
      [0.95, 0.8]
      >>> model.eval()  # batch norm uses running averages, DropBlock is off
      >>> model(jnp.ones((4, 16, 16, 1))).shape
      (4, 10)

    References:
      Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional networks",
      NeurIPS 2018 (arXiv 1810.12890), Section 4.1.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        in_features: int = 1,
        widths: Sequence[int] = (16, 32, 64),
        blocks: Sequence[int] = (1, 1, 1),
        regularizer: str = "dropblock",
        keep_prob: float = 0.9,
        block_size: int | tuple[int, ...] = 3,
        regularized_stages: int = 2,
        bn_momentum: float = 0.9,
        rngs: nnx.Rngs,
    ) -> None:
        widths, blocks = tuple(widths), tuple(blocks)
        _check_args(regularizer, widths, blocks, regularized_stages, block_size)
        checked_probability("keep_prob", keep_prob)
        self.regularizer = regularizer
        self.regularized_stages = regularized_stages
        self.stem = nnx.Conv(in_features, widths[0], (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(widths[0], momentum=bn_momentum, rngs=rngs)
        stages = []
        features = widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks)):
            from_last = len(widths) - 1 - index
            regularized = from_last < regularized_stages
            # Python floats, so that the model can be built under jit or nnx.eval_shape.
            stage_keep = _stage_keep(float(keep_prob), from_last) if regularized else 1.0
            stage = []
            for block in range(count):
                stage.append(
                    ResidualBlock(
                        features,
                        width,
                        strides=2 if index > 0 and block == 0 else 1,
                        regularizer=regularizer if regularized else "none",
                        keep_prob=stage_keep,
                        block_size=block_size,
                        bn_momentum=bn_momentum,
                        rngs=rngs,
                    )
                )
                features = width
            stages.append(nnx.List(stage))
        self.stages = nnx.List(stages)
        self.head = nnx.Linear(features, num_classes, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, perturb: Callable[[jax.Array, tuple[int, int, int], int], jax.Array] | None = None
    ) -> jax.Array:
        """The logits of ``x``, NHWC.

        Args:
          x: images, ``(N, H, W, in_features)``.
          perturb: an :class:`InferenceDropBlock` (or any callable
            ``perturb(y, place, stages_from_last)``) applied after every regularizer
            place of the regularized stages, on top of the regularizer itself. Meant
            for a model in eval mode, where it is the only thing dropped.
        """
        x = nnx.relu(self.stem_bn(self.stem(x)))
        count = len(self.stages)
        for s, stage in enumerate(self.stages):
            from_last = count - 1 - s
            for b, block in enumerate(stage):
                hook = None
                if perturb is not None and from_last < self.regularized_stages:

                    def hook(y: jax.Array, place: int, s: int = s, b: int = b, from_last: int = from_last) -> jax.Array:
                        return perturb(y, (s, b, place), from_last)

                x = block(x, hook)
        return self.head(jnp.mean(x, axis=(1, 2)))

    def _regularized(self) -> list[tuple[nnx.List, int]]:
        """(stage, stages_from_last) for every regularized stage."""
        count = len(self.stages)
        pairs = [(stage, count - 1 - i) for i, stage in enumerate(self.stages)]
        return [(stage, from_last) for stage, from_last in pairs if from_last < self.regularized_stages]

    def set_stage_keep_probs(self, keep_prob: ArrayLike) -> int:
        """Sets the last stage's DropBlock keep_prob to ``keep_prob``, earlier stages by the 1/4 rule.

        The stage ``n`` stages before the last gets :func:`stage_keep_prob` of
        ``keep_prob`` (the authors' ratio), unlike
        :func:`dropblock_jax.nnx.set_keep_prob`, which gives every layer one value.
        Only DropBlock's keep_prob is data; for ``"dropout"`` and
        ``"spatial_dropout"`` (whose rate ``nnx.Dropout`` keeps static) this raises.

        Args:
          keep_prob: the new keep probability of the last stage, in [0, 1]; may be traced.

        Returns:
          The number of DropBlock layers set.

        Raises:
          ValueError: when the model's regularizer is not ``"dropblock"``.
        """
        if self.regularizer != "dropblock":
            raise ValueError(
                f"set_stage_keep_probs needs regularizer='dropblock', this model has regularizer="
                f"{self.regularizer!r}; nnx.Dropout's rate is static and can only be set at construction."
            )
        return sum(
            set_keep_prob(stage, stage_keep_prob(keep_prob, from_last)) for stage, from_last in self._regularized()
        )

    def keep_probs(self) -> list[jax.Array]:
        """The DropBlock keep_prob of each regularized stage, earliest stage first.

        Returns an empty list when the regularizer is not ``"dropblock"``.
        """
        probs = []
        for stage, _ in self._regularized():
            layers = [node for _, node in nnx.iter_graph(stage) if isinstance(node, DropBlock)]
            if layers:
                probs.append(layers[0].keep_prob[...])
        return probs
