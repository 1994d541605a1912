"""Training one :class:`~dropblock_jax.models.ResNet` per method and seed."""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dropblock_jax.models import ResNet


@dataclasses.dataclass(frozen=True)
class Method:
    """One regularization setting of the comparison."""

    name: str
    regularizer: str
    scheduled: bool = False


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


def _loss(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def _train_step(model, optimizer, x, y, keep_prob):
    if model.regularizer == "dropblock":
        # Inside the jitted step keep_prob is traced data: the layers' keep_prob
        # variables change, the compiled program does not, so the fixed and the
        # scheduled runs share one compilation.
        model.set_keep_prob(keep_prob)
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def _predict(model, x):
    return jnp.argmax(model(x), axis=-1)


def accuracy(model: ResNet, x: np.ndarray, y: np.ndarray, chunk: int = 512) -> float:
    """Accuracy in eval mode, in fixed-size padded chunks so one compiled program serves every set."""
    model.eval()
    correct = 0
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk]
        padded = np.zeros((chunk, *x.shape[1:]), np.float32)
        padded[: len(part)] = part
        predictions = np.asarray(_predict(model, padded))[: len(part)]
        correct += int((predictions == y[start : start + chunk]).sum())
    model.train()
    return correct / len(x)


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
        regularizer=method.regularizer,
        # A scheduled run starts from keep_prob 1 and ends at config.keep_prob.
        keep_prob=1.0 if method.scheduled else config.keep_prob,
        block_size=config.block_size,
        rngs=nnx.Rngs(params=seed, dropout=seed + 10_000),
    )


def train_one(method: Method, seed: int, data, config: TrainConfig, on_epoch=None) -> RunResult:
    """Trains one model and returns held-out and train accuracy, step time and curves.

    Args:
      method: which regularizer.
      seed: seeds the initialization, the masks and the batch order.
      data: a :class:`~dropblock_jax.demo.data.Dataset`.
      config: the shared hyperparameters.
      on_epoch: called as ``on_epoch(epoch, held_out_accuracy)`` after every epoch.
    """
    n = len(data.x_train)
    batch = min(config.batch_size, n)
    steps_per_epoch = n // batch
    total_steps = steps_per_epoch * config.epochs
    model = build_model(method, config, data.x_train.shape[-1], data.num_classes, seed)
    optimizer = nnx.Optimizer(model, _optimizer(config, total_steps), wrt=nnx.Param)
    # The paper's schedule: keep_prob falls linearly from 1 to its target over training.
    # The last step trains at the target keep_prob.
    keep_schedule = optax.linear_schedule(1.0, config.keep_prob, max(total_steps - 1, 1))
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
            loss = _train_step(model, optimizer, data.x_train[idx], data.y_train[idx], keeps[step])
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
    return RunResult(
        method=method.name,
        seed=seed,
        test_accuracy=curve[-1][1],
        train_accuracy=accuracy(model, data.x_train, data.y_train, config.eval_chunk),
        seconds_per_step=step_seconds / max(timed_steps, 1),
        curve=curve,
        keep_prob_curve=keep_curve,
    )
