"""ResNets in Flax NNX with DropBlock placed as the paper's authors place it.

:func:`resnet` builds the authors' ImageNet networks (``tensorflow/tpu``
``models/official/resnet/resnet_model.py``); :class:`ResNet` is the one implementation
behind them, and with a small 3x3 stem also the small network of the demo.

The authors apply DropBlock in groups 3 and 4 only: after every batch norm of the
residual branch and on the shortcut of every block, identity shortcuts included (36
places in ResNet-50). The last group uses ``keep_prob``; the group before it drops four
times less, ``1 - (1 - keep_prob) / 4`` (:func:`stage_keep_prob`). A block kind is one
description of its places (:data:`BLOCKS`): a place after each layer of its branch, then
one on its shortcut. ``regularizer`` may put another layer there (plain dropout, to
compare), and a ``perturb`` hook (:data:`Perturb`) sees the activations of every place.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike, DTypeLike

from dropblock_jax._checks import (
    check_choice,
    check_int,
    check_ints,
    checked_probability,
    parse_block_size,
    rejects_rate_keywords,
    static_block_size,
)
from dropblock_jax.nnx import DropBlock, set_keep_prob

__all__ = [
    "BLOCKS",
    "DEPTHS",
    "REGULARIZED_SHORTCUTS",
    "REGULARIZERS",
    "STEMS",
    "BranchLayer",
    "Perturb",
    "ResNet",
    "ResidualBlock",
    "resnet",
    "stage_keep_prob",
]


@dataclasses.dataclass(frozen=True)
class BranchLayer:
    """A convolution of a residual branch; a batch norm, a ReLU but after the last, and a place follow it.

    The last layer's batch norm starts at zero scale, so that a block starts as the identity.

    Attributes:
      kernel: the convolution's (square) kernel size.
      expansion: its output channels, in multiples of the block's width.
      strided: whether it carries the block's stride.
    """

    kernel: int
    expansion: int = 1
    strided: bool = False


#: The residual branch of each block kind, its convolutions in order. A basic block has two
#: 3x3 convolutions (the authors' ``residual_block``), a bottleneck block 1x1-3x3-1x1 with a
#: fourfold expansion and the stride on the 3x3 convolution (``bottleneck_block``, v1.5). A
#: place follows each, and the shortcut has the last.
BLOCKS: dict[str, tuple[BranchLayer, ...]] = {
    "basic": (BranchLayer(3, strided=True), BranchLayer(3)),
    "bottleneck": (BranchLayer(1), BranchLayer(3, strided=True), BranchLayer(1, expansion=4)),
}

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

#: The names :class:`ResNet`'s ``regularizer`` takes besides a function: nothing, or DropBlock.
REGULARIZERS = ("none", "dropblock")

#: The values of ``regularized_shortcuts``: every shortcut of a regularized group (the
#: authors' code, identity shortcuts included), or only the projection shortcuts.
REGULARIZED_SHORTCUTS = ("all", "projection")

#: The values of :class:`ResNet`'s ``stem``: the ImageNet stem (7x7/2 convolution, 3x3/2
#: max pool), or one 3x3 stride-1 convolution for small images.
STEMS = ("imagenet", "small")

#: ``perturb(y, place, stages_from_last)``: called with the activations ``y`` of every place
#: of the regularized stages, after the place's layer; the network goes on with what it
#: returns. ``place`` is ``(stage, block, index)``, the index counting the block's branch
#: layers, then its shortcut; ``stages_from_last`` is 0 in the last stage.
Perturb = Callable[[jax.Array, tuple[int, int, int], int], jax.Array]

_Layer = Callable[[jax.Array], jax.Array]
_Keep = TypeVar("_Keep", float, jax.Array)

# Later stages see coarser, more semantic features; the authors drop 4x less in
# the stage before the last one, and so on down the network.
_STAGE_DROP_DECAY = 4.0
# The authors' batch norm constants (resnet_model.py: BATCH_NORM_DECAY, BATCH_NORM_EPSILON).
_BN_MOMENTUM, _BN_EPSILON = 0.9, 1e-5


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


def _stage_keep(keep: _Keep, stages_from_last: int) -> _Keep:
    """The 1/4 rule on a Python float (static, for constructors) or an array (a schedule)."""
    return 1.0 - (1.0 - keep) / _STAGE_DROP_DECAY**stages_from_last


def _conv_bn(
    in_features: int,
    out_features: int,
    kernel: int,
    strides: int = 1,
    zero_scale: bool = False,
    *,
    dtype: DTypeLike | None,
    param_dtype: DTypeLike,
    bn_momentum: float,
    rngs: nnx.Rngs,
) -> tuple[nnx.Conv, nnx.BatchNorm]:
    """A convolution without bias (the batch norm has one) and its batch norm."""
    # The authors' fixed padding, (k - 1) // 2 before and k // 2 after, whatever the stride;
    # "SAME" would pad a strided 3x3 convolution on one side only.
    padding = ((kernel - 1) // 2, kernel // 2)
    conv = nnx.Conv(
        in_features,
        out_features,
        (kernel, kernel),
        strides=strides,
        padding=(padding, padding),
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    norm = nnx.BatchNorm(
        out_features,
        momentum=bn_momentum,
        epsilon=_BN_EPSILON,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
        rngs=rngs,
    )
    return conv, norm


class ResidualBlock(nnx.Module):
    """A residual block: its branch, its shortcut, and a regularizer place after each of their layers.

    Each :class:`BranchLayer` of ``branch`` is a convolution and a batch norm; the
    shortcut is the input, or a ``conv1x1-bn`` projection where the block changes the
    shape; the output is ``relu(branch + shortcut)``. ``regularizers[i]`` is the layer at
    place ``i`` (the branch layers' places, then the shortcut's), or None. The authors'
    ResNet-18/34 (``residual_block``) applies no DropBlock; :class:`ResNet` regularizes a
    basic block at the same places as a bottleneck block.

    Built by :class:`ResNet`, which gives each block its branch and stride, what builds
    the layer of a place (``place_layer``, called once a place, in order, or never on an
    identity shortcut with ``regularized_shortcuts="projection"``), what builds a
    convolution and its batch norm (``conv_bn(in_features, out_features, kernel, strides,
    zero_scale)``, the network's dtype policy), and where the block sits.

    Attributes:
      convs: the branch's convolutions, in order.
      norms: their batch norms.
      projection: the shortcut's ``conv1x1-bn``, or None for an identity shortcut.
      regularizers: the layer at each place, or None.
      location: ``(stage, block)``, the first two entries of the block's places.
      stages_from_last: how many stages follow the block's stage.
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        branch: Sequence[BranchLayer],
        strides: int,
        place_layer: Callable[[], _Layer | None],
        regularized_shortcuts: str,
        conv_bn: Callable[..., tuple[nnx.Conv, nnx.BatchNorm]],
        location: tuple[int, int],
        stages_from_last: int,
    ) -> None:
        convs, norms, regularizers = [], [], []
        width = in_features
        for index, layer in enumerate(branch):
            out_features = features * layer.expansion
            last = index == len(branch) - 1
            conv, norm = conv_bn(width, out_features, layer.kernel, strides if layer.strided else 1, last)
            convs.append(conv)
            norms.append(norm)
            regularizers.append(place_layer())
            width = out_features
        projected = strides != 1 or in_features != width
        self.projection = nnx.Sequential(*conv_bn(in_features, width, 1, strides)) if projected else None
        regularizers.append(place_layer() if projected or regularized_shortcuts == "all" else None)
        self.convs, self.norms, self.regularizers = nnx.List(convs), nnx.List(norms), nnx.List(regularizers)
        self.location = location
        self.stages_from_last = stages_from_last

    def __call__(self, x: jax.Array, perturb: Perturb | None = None) -> jax.Array:
        """Applies the block; ``perturb`` follows each place if given (see :data:`Perturb`)."""
        y = x
        last = len(self.convs) - 1
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            y = norm(conv(y))
            y = self._place(index, y if index == last else nnx.relu(y), perturb)
        shortcut = x if self.projection is None else self.projection(x)
        return nnx.relu(y + self._place(last + 1, shortcut, perturb))

    def _place(self, index: int, y: jax.Array, perturb: Perturb | None) -> jax.Array:
        """``y`` through the layer at place ``index``, then through ``perturb``."""
        layer = self.regularizers[index]
        y = y if layer is None else layer(y)
        return y if perturb is None else perturb(y, (*self.location, index), self.stages_from_last)


class ResNet(nnx.Module):
    """A ResNet for NHWC images, regularized where the DropBlock authors do it.

    A stem, then ``len(widths)`` stages of residual blocks (every stage after the first
    halves the resolution, on its first block), global average pooling and a linear
    classifier. The last ``regularized_stages`` stages get the regularizer at every place
    of their blocks (the shortcuts of the projection blocks only, with
    ``regularized_shortcuts="projection"``), the last stage at ``keep_prob`` and each
    stage before it by :func:`stage_keep_prob`: with four stages and the defaults, the
    placement of the paper's ResNet-50 (groups 3 and 4). :func:`resnet` builds the
    ImageNet networks; this class with its defaults is a small network for small images.

    ``model.train()`` / ``model.eval()`` switch batch norm and the regularizer together;
    a keep_prob schedule goes through :meth:`set_stage_keep_probs`, without retracing an
    ``nnx.jit`` function. With ``dtype=jnp.bfloat16`` the convolutions, the batch norms'
    outputs, the regularizers' inputs and the classifier compute in bfloat16 while the
    parameters and batch statistics stay in ``param_dtype``; the logits are returned in
    float32 (for the loss), as TPU ResNet recipes do.

    Args:
      num_classes: number of output logits.
      in_features: input channels.
      widths: channels of each stage (for bottleneck blocks, the bottleneck width; the
        stage outputs four times as many).
      blocks: residual blocks in each stage.
      block: a key of :data:`BLOCKS`, ``"basic"`` or ``"bottleneck"``.
      stem: ``"small"`` (one 3x3 stride-1 convolution) or ``"imagenet"`` (7x7/2
        convolution and 3x3/2 max pool).
      regularizer: ``"dropblock"`` (:class:`dropblock_jax.nnx.DropBlock`), ``"none"``,
        or a function ``regularizer(keep_prob, rngs)`` that builds the layer of one place
        for its stage's keep_prob (a Python float), e.g.
        ``lambda keep_prob, rngs: nnx.Dropout(1 - keep_prob, rngs=rngs)``.
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
      TypeError, ValueError: for an argument of the wrong type or value, naming it.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from dropblock_jax.models import ResNet
      >>> model = ResNet(10, widths=(8, 16), blocks=(1, 1), block_size=3,
      ...                rngs=nnx.Rngs(params=0, dropout=1))
      >>> model.set_stage_keep_probs(0.8)  # e.g. each step, from linear_keep_prob_schedule
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
        regularizer: str | Callable[[float, nnx.Rngs], _Layer | None] = "dropblock",
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
        if not callable(regularizer):
            check_choice("regularizer", regularizer, REGULARIZERS, detail=" or a function (keep_prob, rngs) -> layer")
        branch = BLOCKS[check_choice("block", block, tuple(BLOCKS))]
        self.stem_kind = check_choice("stem", stem, STEMS)
        check_choice("regularized_shortcuts", regularized_shortcuts, REGULARIZED_SHORTCUTS)
        widths = check_ints("widths", widths)
        blocks = check_ints("blocks", blocks, length=len(widths), detail=" (one per stage)")
        self.regularized_stages = check_int(
            "regularized_stages", regularized_stages, 0, len(widths), detail=" (the number of stages)"
        )
        parse_block_size(block_size)
        checked_probability("keep_prob", keep_prob)
        self.dtype = dtype
        conv_bn = functools.partial(_conv_bn, dtype=dtype, param_dtype=param_dtype, bn_momentum=bn_momentum, rngs=rngs)
        kernel, strides = (7, 2) if stem == "imagenet" else (3, 1)
        self.stem, self.stem_bn = conv_bn(in_features, widths[0], kernel, strides)
        stages, features = [], widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            from_last = len(widths) - 1 - stage
            # A Python float, so that the model can be built under jit or nnx.eval_shape.
            stage_keep = _stage_keep(float(keep_prob), from_last)
            place_layer = functools.partial(_place_layer, regularizer, stage_keep, block_size, rngs)
            stage_blocks = []
            for index in range(count):
                stage_blocks.append(
                    ResidualBlock(
                        features,
                        width,
                        branch=branch,
                        strides=2 if stage > 0 and index == 0 else 1,
                        place_layer=place_layer if from_last < self.regularized_stages else lambda: None,
                        regularized_shortcuts=regularized_shortcuts,
                        conv_bn=conv_bn,
                        location=(stage, index),
                        stages_from_last=from_last,
                    )
                )
                features = width * branch[-1].expansion
            stages.append(nnx.List(stage_blocks))
        self.stages = nnx.List(stages)
        head_init = nnx.initializers.lecun_normal() if head_stddev is None else nnx.initializers.normal(head_stddev)
        self.head = nnx.Linear(
            features, num_classes, kernel_init=head_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array, *, perturb: Perturb | None = None) -> jax.Array:
        """The logits of ``x``, NHWC, in float32 when the model computes in a narrower dtype.

        Args:
          x: images, ``(N, H, W, in_features)``.
          perturb: a hook (see :data:`Perturb`) after every place of the regularized
            stages, after the place's regularizer; on a model in eval mode it is the
            only thing that acts there.
        """
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = nnx.relu(self.stem_bn(self.stem(x)))
        if self.stem_kind == "imagenet":
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for stage in self.stages:
            for block in stage:
                x = block(x, perturb if block.stages_from_last < self.regularized_stages else None)
        logits = self.head(jnp.mean(x, axis=(1, 2)))
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))

    def _stage_dropblocks(self) -> list[tuple[int, list[DropBlock]]]:
        """``(stages_from_last, DropBlock layers)`` of every regularized stage, earliest first."""
        return [
            (stage[0].stages_from_last, [node for _, node in nnx.iter_graph(stage) if isinstance(node, DropBlock)])
            for stage in self.stages
            if stage[0].stages_from_last < self.regularized_stages
        ]

    def set_stage_keep_probs(self, keep_prob: ArrayLike) -> int:
        """Sets the last stage's DropBlock keep_prob to ``keep_prob``, earlier stages by the 1/4 rule.

        The stage ``n`` stages before the last gets :func:`stage_keep_prob` of
        ``keep_prob`` (the authors' ratio), unlike :func:`dropblock_jax.nnx.set_keep_prob`,
        which gives every layer one value. Only DropBlock's keep_prob is data:
        ``nnx.Dropout`` keeps its rate static.

        Args:
          keep_prob: the new keep probability of the last stage, in [0, 1]; may be traced.

        Returns:
          The number of DropBlock layers set.

        Raises:
          ValueError: when the regularized stages hold no DropBlock, or for a
            ``keep_prob`` outside [0, 1].
        """
        stages = self._stage_dropblocks()
        if stages and not any(layers for _, layers in stages):
            raise ValueError(
                "set_stage_keep_probs sets DropBlock layers, and the regularized stages of this ResNet hold none "
                "(its regularizer is not 'dropblock'); nnx.Dropout's rate is static and can only be set at "
                "construction."
            )
        return sum(set_keep_prob(layers, stage_keep_prob(keep_prob, from_last)) for from_last, layers in stages)

    def keep_probs(self) -> list[jax.Array]:
        """The DropBlock keep_prob of each regularized stage, earliest first; empty without DropBlock."""
        return [layers[0].keep_prob[...] for _, layers in self._stage_dropblocks() if layers]


def _place_layer(
    regularizer: str | Callable[[float, nnx.Rngs], _Layer | None],
    keep_prob: float,
    block_size: int | Sequence[int],
    rngs: nnx.Rngs,
) -> _Layer | None:
    """The layer of one place of a regularized stage."""
    if callable(regularizer):
        return regularizer(keep_prob, rngs)
    if regularizer == "dropblock":
        return DropBlock(keep_prob=keep_prob, block_size=static_block_size(block_size), rngs=rngs)
    return None


@rejects_rate_keywords("resnet(50, keep_prob=0.9)")
def resnet(
    depth: int,
    num_classes: int = 1000,
    *,
    regularizer: str | Callable[[float, nnx.Rngs], _Layer | None] = "dropblock",
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
    and torchvision's ResNet-50, and DropBlock at the authors' 36 places (29 with
    ``regularized_shortcuts="projection"``). At depths 18 and 34, where the authors put
    none, the basic blocks are regularized at the same places; there the first block of
    group 1, which keeps the shape, has an identity shortcut, as in torchvision, where
    ``resnet_model.py`` gives it a projection (4,224 more parameters at ``base_width=64``).

    Args:
      depth: one of 18, 34, 50, 101, 152, 200.
      num_classes: number of output logits.
      keep_prob: keep probability of group 4 (the paper: scheduled from 1 to 0.9); the
        fraction kept, not a drop rate (``drop_prob=0.1`` is ``keep_prob=0.9``).
      block_size: DropBlock's block size (the paper: 7), clipped to each feature map.
        On 224-pixel images the maps of groups 3 and 4 are 14x14 and 7x7: blocks in
        group 3, whole 7x7 maps in group 4, as in the paper. On smaller images the
        block is clipped: at 64 pixels the maps are 4x4 and 2x2, so 35 of the 36
        places drop whole channels (SpatialDropout), a different regularizer (the
        first place of group 3, before its strided convolution, sees 8x8). Scale the block
        with the image (``7 * 64 / 224``, i.e. 2, at 64 pixels) to keep blocks in group 3.
      base_width: channels of the stem and width of group 1 (the groups double it); 64
        is the authors' network, smaller values keep its structure at less cost.
      regularizer, regularized_shortcuts, dtype, param_dtype, in_features, rngs: as in
        :class:`ResNet`.

    Returns:
      The :class:`ResNet`.

    Raises:
      TypeError, ValueError: for a depth not in :data:`DEPTHS` or another bad argument.

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
    block, blocks = DEPTHS[check_choice("depth", depth, tuple(DEPTHS))]
    base_width = check_int("base_width", base_width, low=1)
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
