"""Training one :class:`~dropblock_jax.models.ResNet` per method and seed, and stress-testing it.

After training, every model is scored in eval mode on the held-out set three ways:
clean; with DropBlock applied at inference at its regularizer places (the paper's
Section 4.1 test of spatially spread representations), for a grid of keep_probs
and block sizes; and with a square of every image occluded.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.typing import ArrayLike

from dropblock_jax import drop_block, linear_keep_prob_schedule
from dropblock_jax._checks import check_bool, check_ints, checked_probability, parse_block_size
from dropblock_jax.demo.data import Dataset
from dropblock_jax.models import ResNet, stage_keep_prob


@dataclasses.dataclass(frozen=True)
class Method:
    """One regularization setting of the comparison.

    Attributes:
      name: the name of the method in tables and files.
      regularizer: a key of :data:`REGULARIZERS`.
      scheduled: whether keep_prob falls from 1 to its target over training.
    """

    name: str
    regularizer: str
    scheduled: bool = False


def dropout(keep_prob: float, rngs: nnx.Rngs) -> nnx.Dropout:
    """Plain dropout at a regularizer place of the ResNet, dropping ``1 - keep_prob``."""
    # nnx.Dropout branches in Python on its rate, so it gets a concrete float.
    return nnx.Dropout(1.0 - keep_prob, rngs=rngs)


def spatial_dropout(keep_prob: float, rngs: nnx.Rngs) -> nnx.Dropout:
    """SpatialDropout at a regularizer place: one draw per (sample, channel), shared over H and W."""
    return nnx.Dropout(1.0 - keep_prob, broadcast_dims=(1, 2), rngs=rngs)


#: What each method puts at the ResNet's regularizer places (its ``regularizer`` argument):
#: the regularizers the paper compares DropBlock with, at the very same places.
REGULARIZERS: dict[str, str | Callable[[float, nnx.Rngs], nnx.Dropout]] = {
    "none": "none",
    "dropout": dropout,
    "spatial_dropout": spatial_dropout,
    "dropblock": "dropblock",
}

METHODS = (
    Method("none", "none"),
    Method("dropout", "dropout"),
    Method("spatial_dropout", "spatial_dropout"),
    Method("dropblock", "dropblock"),
    Method("dropblock_scheduled", "dropblock", scheduled=True),
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters shared by every method, so that only the regularizer differs."""

    epochs: int = 30
    batch_size: int = 50
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    keep_prob: float = 0.8
    block_size: int = 3
    widths: tuple[int, ...] = (16, 32, 64)
    eval_every: int = 1
    eval_chunk: int = 512


@dataclasses.dataclass
class RunResult:
    """One method, one seed."""

    method: str
    seed: int
    test_accuracy: float
    train_accuracy: float
    seconds_per_step: float
    curve: list[tuple[int, float]]
    keep_prob_curve: list[float]
    # Filled when train_one gets a StressTest.
    occlusion_accuracy: float | None = None
    # str(block size) -> held-out accuracy for each StressTest.keep_probs.
    robustness: dict[str, list[float]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StressTest:
    """What a trained model is scored on besides the clean held-out set.

    Attributes:
      keep_probs: inference keep_probs (of the last stage; earlier regularized
        stages keep the training ratio, see :func:`dropblock_jax.models.stage_keep_prob`),
        descending from 1.0. At 1.0 DropBlock is the identity: the clean accuracy.
      block_sizes: inference block sizes; 1 is plain dropout.
      x_occluded: the held-out images with a square occluded (the same for every model).
      key_seed: seed of the inference masks: the same for every method and seed.
    """

    keep_probs: tuple[float, ...]
    block_sizes: tuple[int, ...]
    x_occluded: np.ndarray = dataclasses.field(repr=False, compare=False)
    key_seed: int = 0

    def __post_init__(self) -> None:
        """Checks the keep_prob grid and the block sizes."""
        keeps = np.asarray(self.keep_probs, np.float64)
        if keeps.ndim != 1 or len(keeps) < 2 or keeps[0] != 1.0 or not (np.diff(keeps) < 0).all() or keeps[-1] < 0:
            raise ValueError(
                f"keep_probs must start at 1.0 and fall strictly, staying >= 0, got {tuple(self.keep_probs)!r}."
            )
        check_ints("block_sizes", self.block_sizes)


@dataclasses.dataclass(frozen=True)
class InferenceDropBlock:
    """:func:`dropblock_jax.drop_block` at every regularizer place of a ResNet: a ``perturb`` hook.

    Pass it as ``model(x, perturb=InferenceDropBlock(key, keep_prob, block_size))`` (see
    :data:`dropblock_jax.models.Perturb`). It acts whatever the model's regularizer,
    ``"none"`` included (whose places hold no layer), and whatever its mode: on a model
    in eval mode (batch norm on running averages, the trained regularizer off) it is the
    only thing dropped. This is how the paper tests that DropBlock spreads a network's
    representation (Section 4.1): units or blocks removed at inference cost a
    DropBlock-trained network less accuracy.

    Every place gets its own key, ``fold_in`` of ``key`` with the stage, block and place
    index, so two models of the same architecture see the same masks whatever their
    regularizer.

    Attributes:
      key: a JAX PRNG key.
      keep_prob: keep probability of the last stage; may be traced, so one compiled
        function serves every keep_prob.
      block_size: the block size; 1 is plain dropout.
      per_stage: if True (default), earlier regularized stages keep
        :func:`~dropblock_jax.models.stage_keep_prob` of ``keep_prob``, as in training;
        if False every place uses ``keep_prob``.
      normalize: as in :func:`dropblock_jax.drop_block`; ``"batch"`` is the default of
        the trained DropBlock layers.

    Raises:
      TypeError, ValueError: for a bad ``block_size`` or ``per_stage``, or a concrete
        ``keep_prob`` outside [0, 1].

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from dropblock_jax.demo.train import InferenceDropBlock
      >>> from dropblock_jax.models import ResNet
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
        parse_block_size(self.block_size)
        check_bool("per_stage", self.per_stage)

    def __call__(self, x: jax.Array, place: tuple[int, int, int], stages_from_last: int) -> jax.Array:
        """Drops blocks of ``x``, the output of the regularizer place ``place``."""
        key = self.key
        for index in place:
            key = jax.random.fold_in(key, index)
        keep = stage_keep_prob(self.keep_prob, stages_from_last) if self.per_stage else self.keep_prob
        return drop_block(key, x, keep, self.block_size, normalize=self.normalize)


def _loss(model: ResNet, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def _train_step(model: ResNet, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array, keep_prob: jax.Array) -> jax.Array:
    if model.keep_probs():  # the model holds DropBlock layers
        # Inside the jitted step keep_prob is traced data: the layers' keep_prob
        # variables change, the compiled program does not, so the fixed and the
        # scheduled runs share one compilation.
        model.set_stage_keep_probs(keep_prob)
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def _predict(model: ResNet, x: jax.Array) -> jax.Array:
    return jnp.argmax(model(x), axis=-1)


@nnx.jit(static_argnames="block_size")
def _predict_perturbed(model: ResNet, x: jax.Array, key: jax.Array, keep_prob: jax.Array, block_size: int) -> jax.Array:
    # keep_prob is traced: one compilation per (model structure, block size) serves
    # the whole keep_prob grid.
    return jnp.argmax(model(x, perturb=InferenceDropBlock(key, keep_prob, block_size)), axis=-1)


def accuracy(
    model: ResNet,
    x: np.ndarray,
    y: np.ndarray,
    chunk: int = 512,
    perturb: tuple[jax.Array, float, int] | None = None,
) -> float:
    """Accuracy in eval mode, in fixed-size padded chunks so one compiled program serves every set.

    Args:
      model: the model; put back in train mode afterwards.
      x: images.
      y: labels.
      chunk: images per call.
      perturb: None, or ``(key, keep_prob, block_size)`` of an
        :class:`InferenceDropBlock`; chunk ``i`` uses
        ``fold_in(key, i)``.
    """
    model.eval()
    correct = 0
    for index, start in enumerate(range(0, len(x), chunk)):
        part = x[start : start + chunk]
        padded = np.zeros((chunk, *x.shape[1:]), np.float32)
        padded[: len(part)] = part
        # nnx.jit converts NumPy inputs; its typing repeats the traced signature (jax.Array).
        if perturb is None:
            predictions = _predict(model, padded)  # type: ignore[arg-type]
        else:
            key, keep_prob, block_size = perturb
            chunk_key = jax.random.fold_in(key, index)
            predictions = _predict_perturbed(model, padded, chunk_key, jnp.float32(keep_prob), block_size)  # type: ignore[arg-type]
        correct += int((np.asarray(predictions)[: len(part)] == y[start : start + chunk]).sum())
    model.train()
    return correct / len(x)


def inference_key(seed: int, block_size: int, keep_prob: float) -> jax.Array:
    """The key of one robustness evaluation: fixed by (seed, block size, keep_prob), not by the model."""
    key = jax.random.fold_in(jax.random.key(seed), block_size)
    return jax.random.fold_in(key, round(keep_prob * 10_000))


def stress(
    model: ResNet, data: Dataset, test: StressTest, clean_accuracy: float, chunk: int = 512
) -> tuple[float, dict]:
    """Occlusion accuracy and the robustness curves of a trained model.

    Returns:
      ``(occlusion_accuracy, {str(block_size): [accuracy per keep_prob]})``; the
      first point of each curve (keep_prob 1.0, where DropBlock is the identity) is
      ``clean_accuracy``.
    """
    occluded = accuracy(model, test.x_occluded, data.y_test, chunk)
    curves = {}
    for block_size in test.block_sizes:
        curve = [clean_accuracy]
        for keep_prob in test.keep_probs[1:]:
            key = inference_key(test.key_seed, block_size, keep_prob)
            curve.append(accuracy(model, data.x_test, data.y_test, chunk, perturb=(key, keep_prob, block_size)))
        curves[str(block_size)] = curve
    return occluded, curves


@functools.lru_cache(maxsize=8)
def _optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    # The transformation is static structure of nnx.Optimizer: a new (unequal) object
    # per run would retrace the train step, so runs with one config share one.
    learning_rate = optax.cosine_decay_schedule(config.learning_rate, total_steps)
    return optax.adamw(learning_rate, weight_decay=config.weight_decay)


def build_model(method: Method, config: TrainConfig, in_features: int, num_classes: int, seed: int) -> ResNet:
    """The model for ``method``; every method shares the architecture and the init seed."""
    return ResNet(
        num_classes,
        in_features=in_features,
        widths=config.widths,
        blocks=(1,) * len(config.widths),
        regularizer=REGULARIZERS[method.regularizer],
        # A scheduled run starts from keep_prob 1 and ends at config.keep_prob.
        keep_prob=1.0 if method.scheduled else config.keep_prob,
        block_size=config.block_size,
        rngs=nnx.Rngs(params=seed, dropout=seed + 10_000),
    )


def train_one(
    method: Method,
    seed: int,
    data: Dataset,
    config: TrainConfig,
    on_epoch: Callable[[int, float], object] | None = None,
    stress_test: StressTest | None = None,
) -> RunResult:
    """Trains one model and returns held-out and train accuracy, step time and curves.

    Args:
      method: which regularizer.
      seed: seeds the initialization, the masks and the batch order.
      data: a :class:`~dropblock_jax.demo.data.Dataset`.
      config: the shared hyperparameters.
      on_epoch: called as ``on_epoch(epoch, held_out_accuracy)`` after every epoch.
      stress_test: if given, the trained model is also scored with occlusion and with
        DropBlock at inference (see :func:`stress`).
    """
    n = len(data.x_train)
    batch = min(config.batch_size, n)
    steps_per_epoch = n // batch
    total_steps = steps_per_epoch * config.epochs
    model = build_model(method, config, data.x_train.shape[-1], data.num_classes, seed)
    optimizer = nnx.Optimizer(model, _optimizer(config, total_steps), wrt=nnx.Param)
    # The paper's schedule: keep_prob falls linearly from 1 to its target over training.
    # The last step trains at the target keep_prob.
    keep_schedule = linear_keep_prob_schedule(config.keep_prob, total_steps)
    if method.scheduled:
        # Evaluated once for every step, so the loop only indexes a host array.
        keeps = np.asarray(keep_schedule(jnp.arange(total_steps)), np.float32)
    else:
        keeps = np.full(total_steps, config.keep_prob, np.float32)
    rng = np.random.default_rng(seed)
    curve, keep_curve = [], []
    step_seconds, timed_steps, step = 0.0, 0, 0
    model.train()
    for epoch in range(config.epochs):
        order = rng.permutation(n)
        started = time.perf_counter()
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            # NumPy batches: nnx.jit converts them (its typing names the traced jax.Array).
            loss = _train_step(model, optimizer, data.x_train[idx], data.y_train[idx], keeps[step])  # type: ignore[arg-type]
            step += 1
            if epoch == 0 and i == 0:
                # The first step compiles; leave it out of the time per step.
                jax.block_until_ready(loss)
                started = time.perf_counter()
        jax.block_until_ready(loss)
        step_seconds += time.perf_counter() - started
        timed_steps += steps_per_epoch - (1 if epoch == 0 else 0)
        if method.regularizer == "dropblock":
            keep_curve.append(float(model.keep_probs()[-1]))
        else:
            keep_curve.append(1.0 if method.regularizer == "none" else config.keep_prob)
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            curve.append((epoch + 1, accuracy(model, data.x_test, data.y_test, config.eval_chunk)))
        if on_epoch is not None:
            on_epoch(epoch, curve[-1][1] if curve else float("nan"))
    result = RunResult(
        method=method.name,
        seed=seed,
        test_accuracy=curve[-1][1],
        train_accuracy=accuracy(model, data.x_train, data.y_train, config.eval_chunk),
        seconds_per_step=step_seconds / max(timed_steps, 1),
        curve=curve,
        keep_prob_curve=keep_curve,
    )
    if stress_test is not None:
        result.occlusion_accuracy, result.robustness = stress(
            model, data, stress_test, result.test_accuracy, config.eval_chunk
        )
    return result
