"""ResNets in Flax NNX with DropBlock placed as the paper's authors place it.

:func:`resnet` builds the authors' ImageNet networks (``tensorflow/tpu``
``models/official/resnet/resnet_model.py``): ResNet-18 to ResNet-200, a 7x7/2 stem and a
3x3/2 max pool, bottleneck blocks from depth 50 with the stride on the 3x3 convolution
(v1.5), bfloat16 compute if asked. :class:`ResNet` is the one implementation behind it,
and with a small 3x3 stem and basic blocks it is also the small network of the demo.

The authors apply DropBlock in groups 3 and 4 only: after every batch norm of the
residual branch and on the shortcut of every block, identity shortcuts included (36
places in ResNet-50). The last group uses ``keep_prob``; the group before it drops
four times less, ``1 - (1 - keep_prob) / 4``. :class:`ResNet` can put plain dropout or
SpatialDropout at the very same places, so the regularizers can be compared on equal
terms.

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
from jax.typing import ArrayLike, DTypeLike

from dropblock_jax import drop_block
from dropblock_jax._checks import checked_probability
from dropblock_jax.nnx import DropBlock, set_keep_prob

__all__ = [
    "BLOCKS",
    "DEPTHS",
    "REGULARIZED_SHORTCUTS",
    "REGULARIZERS",
    "STEMS",
    "BottleneckBlock",
    "InferenceDropBlock",
    "ResNet",
    "ResidualBlock",
    "resnet",
    "stage_keep_prob",
]

#: The values of :class:`ResNet`'s ``regularizer``, the regularizers it can place (none, plain
#: dropout, SpatialDropout with one draw per channel map, or DropBlock).
REGULARIZERS = ("none", "dropout", "spatial_dropout", "dropblock")

#: The values of ``regularized_shortcuts``: every shortcut of a regularized group (the
#: authors' code, identity shortcuts included), or only the projection shortcuts.
REGULARIZED_SHORTCUTS = ("all", "projection")

#: The values of :class:`ResNet`'s ``block``: two 3x3 convolutions, or 1x1-3x3-1x1 with a
#: fourfold expansion.
BLOCKS = ("basic", "bottleneck")

#: The values of :class:`ResNet`'s ``stem``: the ImageNet stem (7x7/2 convolution, 3x3/2
#: max pool), or one 3x3 stride-1 convolution for small images.
STEMS = ("imagenet", "small")

#: :func:`resnet`'s depths, as in the authors' ``resnet_model.py``: the block kind and the
#: number of blocks of each of the four groups.
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}

# Later stages see coarser, more semantic features; the authors drop 4x less in
# the stage before the last one, and so on down the network.
_STAGE_DROP_DECAY = 4.0
# The authors' batch norm constants (resnet_model.py: BATCH_NORM_DECAY, BATCH_NORM_EPSILON).
_BN_MOMENTUM, _BN_EPSILON = 0.9, 1e-5
_BOTTLENECK_EXPANSION = 4


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


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}.")


def _check_args(
    widths: Sequence[int],
    blocks: Sequence[int],
    regularized_stages: int,
    block_size: int | Sequence[int],
) -> None:
    if len(widths) == 0 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"widths must be a non-empty sequence of positive ints, got {tuple(widths)!r}.")
    if len(blocks) != len(widths) or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks):
        raise ValueError(f"blocks must give a positive int per stage ({len(widths)} stages), got {tuple(blocks)!r}.")
    if isinstance(regularized_stages, bool) or not isinstance(regularized_stages, int):
        raise ValueError(f"regularized_stages must be an int, got {regularized_stages!r}.")
    if not 0 <= regularized_stages <= len(widths):
        raise ValueError(
            f"regularized_stages must be an int in [0, {len(widths)}] (the number of stages), "
            f"got {regularized_stages!r}."
        )
    _check_block_size(block_size)


def _check_block_size(block_size: int | Sequence[int]) -> None:
    try:
        sizes = (block_size,) if isinstance(block_size, int) else tuple(block_size)
    except TypeError:
        sizes = ()
    if not sizes or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in sizes):
        raise ValueError(f"block_size must be a positive int or a tuple of them, got {block_size!r}.")


@dataclasses.dataclass(frozen=True)
class _Regularization:
    """What a block puts at its regularizer places (static, shared by the blocks of a stage)."""

    regularizer: str = "none"
    keep_prob: float = 1.0
    block_size: int | Sequence[int] = 3
    regularized_shortcuts: str = "all"

    def make(self, rngs: nnx.Rngs) -> DropBlock | nnx.Dropout | None:
        """The regularizing layer of one place, or None."""
        if self.regularizer == "none":
            return None
        if self.regularizer == "dropblock":
            block_size = self.block_size if isinstance(self.block_size, int) else tuple(self.block_size)
            return DropBlock(keep_prob=float(self.keep_prob), block_size=block_size, rngs=rngs)
        # nnx.Dropout branches in Python on its rate, so it gets a concrete float.
        rate = 1.0 - float(self.keep_prob)
        if self.regularizer == "dropout":
            return nnx.Dropout(rate, rngs=rngs)
        # SpatialDropout: one draw per (sample, channel), shared over H and W.
        return nnx.Dropout(rate, broadcast_dims=(1, 2), rngs=rngs)

    def make_shortcut(self, projected: bool, rngs: nnx.Rngs) -> DropBlock | nnx.Dropout | None:
        """The shortcut's layer: on every shortcut, or on projections only."""
        return self.make(rngs) if projected or self.regularized_shortcuts == "all" else None


# A place hook: ``perturb(y, place_index)`` after each regularizer place of a block.
_BlockHook = Callable[[jax.Array, int], jax.Array] | None


def _build_shortcut(
    block: ResidualBlock | BottleneckBlock,
    in_features: int,
    out_features: int,
    strides: int,
    regularization: _Regularization,
    conv: Callable[..., nnx.Conv],
    norm: Callable[..., nnx.BatchNorm],
    rngs: nnx.Rngs,
) -> None:
    """Gives ``block`` its shortcut: a ``conv1x1-bn`` projection when the shape changes, then its place."""
    projected = strides != 1 or in_features != out_features
    if projected:
        block.proj = conv(in_features, out_features, (1, 1), strides=strides)
        block.proj_bn = norm(out_features)
    else:
        block.proj = block.proj_bn = None
    block.shortcut_drop = regularization.make_shortcut(projected, rngs)


def _at_place(block: ResidualBlock | BottleneckBlock, name: str, y: jax.Array, perturb: _BlockHook) -> jax.Array:
    """``y`` through the block's regularizer ``name``, then through ``perturb`` (with the place's index)."""
    drop = getattr(block, name)
    y = y if drop is None else drop(y)
    return y if perturb is None else perturb(y, block.PLACES.index(name))


def _merge(block: ResidualBlock | BottleneckBlock, x: jax.Array, branch: jax.Array, perturb: _BlockHook) -> jax.Array:
    """``relu(branch + shortcut)``, the shortcut regularized at its place."""
    shortcut = x
    if block.proj is not None and block.proj_bn is not None:
        shortcut = block.proj_bn(block.proj(x))
    return nnx.relu(branch + _at_place(block, "shortcut_drop", shortcut, perturb))


def _layer_factories(
    dtype: DTypeLike | None, param_dtype: DTypeLike, bn_momentum: float, rngs: nnx.Rngs
) -> tuple[Callable[..., nnx.Conv], Callable[..., nnx.BatchNorm]]:
    """Convolutions (no bias: a batch norm follows) and batch norms of one dtype policy."""

    def conv(in_features: int, out_features: int, kernel: tuple[int, int], strides: int = 1) -> nnx.Conv:
        # The authors' fixed padding, (k - 1) // 2 before and k // 2 after, whatever the stride;
        # "SAME" would pad a strided 3x3 convolution on one side only.
        padding = tuple(((k - 1) // 2, k // 2) for k in kernel)
        return nnx.Conv(
            in_features,
            out_features,
            kernel,
            strides=strides,
            padding=padding,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def norm(features: int, zero_scale: bool = False) -> nnx.BatchNorm:
        return nnx.BatchNorm(
            features,
            momentum=bn_momentum,
            epsilon=_BN_EPSILON,
            dtype=dtype,
            param_dtype=param_dtype,
            scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
            rngs=rngs,
        )

    return conv, norm


class ResidualBlock(nnx.Module):
    """A basic residual block (two 3x3 convolutions) with optional regularization.

    Layout: ``conv3x3-bn-relu-drop1``, ``conv3x3-bn-drop2``, the shortcut (a
    ``conv1x1-bn`` projection when the shape changes) followed by ``shortcut_drop``,
    then ``relu(branch + shortcut)``. The second batch norm starts at zero scale, so
    each block starts as the identity.

    The authors' ResNet-18/34 (``residual_block``) applies no DropBlock; this block
    puts the regularizer where their bottleneck block does, after every batch norm of
    the branch and on the shortcut, so that both block kinds are regularized alike.

    Args:
      in_features: input channels.
      out_features: output channels.
      strides: stride of the first convolution and of the projection.
      regularizer: one of :data:`REGULARIZERS`.
      keep_prob: keep probability of the regularizer.
      block_size: DropBlock's block size (ignored by the other regularizers).
      regularized_shortcuts: ``"all"`` or ``"projection"`` (:data:`REGULARIZED_SHORTCUTS`).
      bn_momentum: momentum of the batch norms' running statistics.
      dtype: the computation dtype (``None``: the input's).
      param_dtype: the dtype of the parameters and batch statistics.
      rngs: ``nnx.Rngs`` with ``params`` and, when regularized, ``dropout`` streams.

    Attributes:
      PLACES: the names of the regularizer places, in the order a ``perturb`` hook and
        :class:`InferenceDropBlock` number them.
    """

    PLACES = ("drop1", "drop2", "shortcut_drop")
    proj: nnx.Conv | None
    proj_bn: nnx.BatchNorm | None
    shortcut_drop: DropBlock | nnx.Dropout | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        strides: int = 1,
        regularizer: str = "none",
        keep_prob: float = 1.0,
        block_size: int | Sequence[int] = 3,
        regularized_shortcuts: str = "all",
        bn_momentum: float = _BN_MOMENTUM,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        regularization = _Regularization(regularizer, keep_prob, block_size, regularized_shortcuts)
        conv, norm = _layer_factories(dtype, param_dtype, bn_momentum, rngs)
        self.conv1 = conv(in_features, out_features, (3, 3), strides=strides)
        self.bn1 = norm(out_features)
        self.drop1 = regularization.make(rngs)
        self.conv2 = conv(out_features, out_features, (3, 3))
        self.bn2 = norm(out_features, zero_scale=True)
        self.drop2 = regularization.make(rngs)
        _build_shortcut(self, in_features, out_features, strides, regularization, conv, norm, rngs)

    def __call__(self, x: jax.Array, perturb: _BlockHook = None) -> jax.Array:
        """Applies the block; ``perturb(y, place)`` follows each regularizer place if given.

        ``place`` is the index of the place in ``PLACES``.
        """
        y = _at_place(self, "drop1", nnx.relu(self.bn1(self.conv1(x))), perturb)
        y = _at_place(self, "drop2", self.bn2(self.conv2(y)), perturb)
        return _merge(self, x, y, perturb)


class BottleneckBlock(nnx.Module):
    """The bottleneck block of the authors' ResNet-50 and deeper, with optional regularization.

    Layout, as ``bottleneck_block`` in ``resnet_model.py`` (v1.5: the stride on the 3x3
    convolution): ``conv1x1-bn-relu-drop1``, ``conv3x3-bn-relu-drop2``,
    ``conv1x1-bn-drop3`` to ``4 * features`` channels, the shortcut (a ``conv1x1-bn``
    projection when the shape changes) followed by ``shortcut_drop``, then
    ``relu(branch + shortcut)``. The third batch norm starts at zero scale.

    Args:
      in_features: input channels.
      features: the bottleneck's width; the block outputs ``4 * features`` channels.
      strides: stride of the 3x3 convolution and of the projection.
      regularizer, keep_prob, block_size, regularized_shortcuts, bn_momentum, dtype, param_dtype, rngs: as
        in :class:`ResidualBlock`.

    Attributes:
      PLACES: the names of the regularizer places, in the order a ``perturb`` hook and
        :class:`InferenceDropBlock` number them.
    """

    PLACES = ("drop1", "drop2", "drop3", "shortcut_drop")
    proj: nnx.Conv | None
    proj_bn: nnx.BatchNorm | None
    shortcut_drop: DropBlock | nnx.Dropout | None

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        strides: int = 1,
        regularizer: str = "none",
        keep_prob: float = 1.0,
        block_size: int | Sequence[int] = 3,
        regularized_shortcuts: str = "all",
        bn_momentum: float = _BN_MOMENTUM,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        regularization = _Regularization(regularizer, keep_prob, block_size, regularized_shortcuts)
        conv, norm = _layer_factories(dtype, param_dtype, bn_momentum, rngs)
        out_features = _BOTTLENECK_EXPANSION * features
        self.conv1 = conv(in_features, features, (1, 1))
        self.bn1 = norm(features)
        self.drop1 = regularization.make(rngs)
        self.conv2 = conv(features, features, (3, 3), strides=strides)
        self.bn2 = norm(features)
        self.drop2 = regularization.make(rngs)
        self.conv3 = conv(features, out_features, (1, 1))
        self.bn3 = norm(out_features, zero_scale=True)
        self.drop3 = regularization.make(rngs)
        _build_shortcut(self, in_features, out_features, strides, regularization, conv, norm, rngs)

    def __call__(self, x: jax.Array, perturb: _BlockHook = None) -> jax.Array:
        """Applies the block; ``perturb(y, place)`` follows each regularizer place if given.

        ``place`` is the index of the place in ``PLACES``.
        """
        y = _at_place(self, "drop1", nnx.relu(self.bn1(self.conv1(x))), perturb)
        y = _at_place(self, "drop2", nnx.relu(self.bn2(self.conv2(y))), perturb)
        y = _at_place(self, "drop3", self.bn3(self.conv3(y)), perturb)
        return _merge(self, x, y, perturb)


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
    block_size: int | Sequence[int] = 1
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


class ResNet(nnx.Module):
    """A ResNet for NHWC images, regularized where the DropBlock authors do it.

    A stem, then ``len(widths)`` stages of residual blocks (every stage after the
    first halves the resolution, on its first block), global average pooling and a
    linear classifier. The last ``regularized_stages`` stages get the regularizer
    after each batch norm of the residual branch and on the shortcut of every block
    (or, with ``regularized_shortcuts="projection"``, of the projection blocks only):
    the last stage with ``keep_prob``, the one before it with
    ``1 - (1 - keep_prob) / 4`` (see :func:`stage_keep_prob`). With four stages and
    the defaults this is the placement of the paper's ResNet-50 experiments
    (DropBlock in groups 3 and 4). :func:`resnet` builds the ImageNet networks; this
    class with its defaults is a small network for small images.

    ``model.train()`` / ``model.eval()`` switch batch norm and the regularizer
    together. A keep_prob schedule goes through :meth:`set_stage_keep_probs`, which keeps
    the per-stage ratio and never retraces an ``nnx.jit`` function.

    With ``dtype=jnp.bfloat16`` the convolutions, the batch norms' outputs, the
    regularizers' inputs and the classifier compute in bfloat16 while the parameters
    and batch statistics stay in ``param_dtype``; the logits are returned in float32
    (for the loss), as TPU ResNet recipes do.

    Args:
      num_classes: number of output logits.
      in_features: input channels.
      widths: channels of each stage (for bottleneck blocks, the bottleneck width; the
        stage outputs four times as many).
      blocks: residual blocks in each stage.
      block: ``"basic"`` (:class:`ResidualBlock`) or ``"bottleneck"``
        (:class:`BottleneckBlock`).
      stem: ``"small"`` (one 3x3 stride-1 convolution, for small images) or
        ``"imagenet"`` (7x7/2 convolution and 3x3/2 max pool).
      regularizer: ``"none"``, ``"dropout"``, ``"spatial_dropout"`` (dropout with
        one draw per channel, shared over H and W) or ``"dropblock"``.
      keep_prob: keep probability of the last stage.
      block_size: DropBlock's block size; clipped to each feature map.
      regularized_stages: how many of the last stages are regularized.
      regularized_shortcuts: ``"all"`` (the authors' code) or ``"projection"``.
      bn_momentum: momentum of the batch norms' running statistics (the authors' 0.9).
      dtype: the computation dtype; ``None`` computes in the input's dtype.
      param_dtype: the dtype of the parameters and batch statistics.
      head_stddev: the classifier's weights are drawn from N(0, head_stddev**2); ``None``
        keeps Flax's default (LeCun normal).
      rngs: ``nnx.Rngs`` with ``params`` and ``dropout`` streams.

    Raises:
      ValueError: for an unknown regularizer, block, stem or shortcut choice, or
        inconsistent stage arguments.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from dropblock_jax.models import ResNet
      >>> model = ResNet(10, widths=(8, 16), blocks=(1, 1), block_size=3,
      ...                rngs=nnx.Rngs(params=0, dropout=1))
      >>> model.set_stage_keep_probs(0.8)  # e.g. each step, from optax.linear_schedule
      6
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
        block: str = "basic",
        stem: str = "small",
        regularizer: str = "dropblock",
        keep_prob: float = 0.9,
        block_size: int | Sequence[int] = 3,
        regularized_stages: int = 2,
        regularized_shortcuts: str = "all",
        bn_momentum: float = _BN_MOMENTUM,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        head_stddev: float | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        widths, blocks = tuple(widths), tuple(blocks)
        _check_choice("regularizer", regularizer, REGULARIZERS)
        _check_choice("block", block, BLOCKS)
        _check_choice("stem", stem, STEMS)
        _check_choice("regularized_shortcuts", regularized_shortcuts, REGULARIZED_SHORTCUTS)
        _check_args(widths, blocks, regularized_stages, block_size)
        checked_probability("keep_prob", keep_prob)
        self.regularizer = regularizer
        self.regularized_stages = regularized_stages
        self.dtype = dtype
        self.stem_kind = stem
        conv, norm = _layer_factories(dtype, param_dtype, bn_momentum, rngs)
        if stem == "imagenet":
            self.stem = conv(in_features, widths[0], (7, 7), strides=2)
        else:
            self.stem = conv(in_features, widths[0], (3, 3))
        self.stem_bn = norm(widths[0])
        block_type: type[ResidualBlock | BottleneckBlock] = ResidualBlock if block == "basic" else BottleneckBlock
        expansion = _BOTTLENECK_EXPANSION if block == "bottleneck" else 1
        stages = []
        features = widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks)):
            from_last = len(widths) - 1 - index
            regularized = from_last < regularized_stages
            # Python floats, so that the model can be built under jit or nnx.eval_shape.
            stage_keep = _stage_keep(float(keep_prob), from_last) if regularized else 1.0
            stage = []
            for position in range(count):
                stage.append(
                    block_type(
                        features,
                        width,
                        strides=2 if index > 0 and position == 0 else 1,
                        regularizer=regularizer if regularized else "none",
                        keep_prob=stage_keep,
                        block_size=block_size,
                        regularized_shortcuts=regularized_shortcuts,
                        bn_momentum=bn_momentum,
                        dtype=dtype,
                        param_dtype=param_dtype,
                        rngs=rngs,
                    )
                )
                features = width * expansion
            stages.append(nnx.List(stage))
        self.stages = nnx.List(stages)
        head_init = nnx.initializers.lecun_normal() if head_stddev is None else nnx.initializers.normal(head_stddev)
        self.head = nnx.Linear(
            features, num_classes, kernel_init=head_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(
        self, x: jax.Array, *, perturb: Callable[[jax.Array, tuple[int, int, int], int], jax.Array] | None = None
    ) -> jax.Array:
        """The logits of ``x``, NHWC, in float32 when the model computes in a narrower dtype.

        Args:
          x: images, ``(N, H, W, in_features)``.
          perturb: an :class:`InferenceDropBlock` (or any callable
            ``perturb(y, place, stages_from_last)``, ``place`` = (stage, block, index in
            the block's ``PLACES``)) applied after every regularizer place of the
            regularized stages, on top of the regularizer itself. Meant for a model in
            eval mode, where it is the only thing dropped.
        """
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = nnx.relu(self.stem_bn(self.stem(x)))
        if self.stem_kind == "imagenet":
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        count = len(self.stages)
        for s, stage in enumerate(self.stages):
            from_last = count - 1 - s
            for b, block in enumerate(stage):
                hook = None
                if perturb is not None and from_last < self.regularized_stages:

                    def hook(y: jax.Array, place: int, s: int = s, b: int = b, from_last: int = from_last) -> jax.Array:
                        return perturb(y, (s, b, place), from_last)

                x = block(x, hook)
        logits = self.head(jnp.mean(x, axis=(1, 2)))
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))

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


def resnet(
    depth: int,
    num_classes: int = 1000,
    *,
    regularizer: str = "dropblock",
    keep_prob: float = 0.9,
    block_size: int | Sequence[int] = 7,
    regularized_shortcuts: str = "all",
    dtype: DTypeLike | None = None,
    param_dtype: DTypeLike = jnp.float32,
    base_width: int = 64,
    in_features: int = 3,
    rngs: nnx.Rngs,
) -> ResNet:
    """The authors' ImageNet ResNet of ``depth`` layers, with DropBlock in groups 3 and 4.

    As ``resnet_model.py`` of ``tensorflow/tpu`` (``models/official/resnet``): a 7x7/2
    convolution, batch norm, ReLU and a 3x3/2 max pool; four groups of basic blocks
    (depths 18, 34) or bottleneck blocks with the stride on the 3x3 convolution (50 and
    deeper; see :data:`DEPTHS`); the last batch norm of each block at zero scale; batch
    norm momentum 0.9 and epsilon 1e-5; global average pooling and a dense head
    initialized from N(0, 0.01). ``resnet(50)`` has 25,557,032 parameters, like Flax's
    and torchvision's ResNet-50.

    ``regularizer="dropblock"`` puts :class:`dropblock_jax.nnx.DropBlock` where the
    authors do: groups 3 and 4, after every batch norm of the residual branch and on
    every shortcut (36 places at depth 50), group 3 at ``1 - (1 - keep_prob) / 4``.
    ``regularized_shortcuts="projection"`` keeps only the projection shortcuts (29
    places at depth 50), for comparison. At depths 18 and 34, where the authors put
    none, the basic blocks are regularized at the same places (see
    :class:`ResidualBlock`).

    Args:
      depth: one of 18, 34, 50, 101, 152, 200.
      num_classes: number of output logits.
      regularizer: one of :data:`REGULARIZERS`.
      keep_prob: keep probability of group 4 (the paper: scheduled from 1 to 0.9).
      block_size: DropBlock's block size (the paper: 7).
      regularized_shortcuts: ``"all"`` (the authors) or ``"projection"``.
      dtype: the computation dtype, e.g. ``jnp.bfloat16`` (logits still come back in
        float32); ``None`` computes in the input's dtype.
      param_dtype: the dtype of the parameters and batch statistics.
      base_width: channels of the stem and width of group 1 (the groups double it); 64
        is the authors' network, smaller values keep its structure at less cost.
      in_features: input channels.
      rngs: ``nnx.Rngs`` with ``params`` and ``dropout`` streams.

    Returns:
      The :class:`ResNet`.

    Raises:
      ValueError: for a depth not in :data:`DEPTHS` or another bad argument.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from dropblock_jax.models import resnet
      >>> model = resnet(50, 10, base_width=8, dtype=jnp.bfloat16, rngs=nnx.Rngs(params=0, dropout=1))
      >>> model.set_stage_keep_probs(0.9)  # groups 3 and 4: 24 + 12 places
      36
      >>> logits = model(jnp.ones((2, 64, 64, 3)))
      >>> logits.shape, logits.dtype
      ((2, 10), dtype('float32'))

    References:
      Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional networks",
      NeurIPS 2018 (arXiv 1810.12890), Section 4.1. He, Zhang, Ren, Sun, "Deep residual
      learning for image recognition", CVPR 2016.
    """
    if isinstance(depth, bool) or depth not in DEPTHS:
        raise ValueError(f"depth must be one of {tuple(DEPTHS)}, got {depth!r}.")
    if isinstance(base_width, bool) or not isinstance(base_width, int) or base_width < 1:
        raise ValueError(f"base_width must be a positive int, got {base_width!r}.")
    block, blocks = DEPTHS[depth]
    return ResNet(
        num_classes,
        in_features=in_features,
        widths=tuple(base_width * 2**group for group in range(4)),
        blocks=blocks,
        block=block,
        stem="imagenet",
        regularizer=regularizer,
        keep_prob=keep_prob,
        block_size=block_size,
        regularized_stages=2,
        regularized_shortcuts=regularized_shortcuts,
        dtype=dtype,
        param_dtype=param_dtype,
        # The authors' final dense layer: N(0, 0.01) weights.
        head_stddev=0.01,
        rngs=rngs,
    )
