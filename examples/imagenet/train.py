r"""ResNet-50 on ImageNet with DropBlock, the paper's Table 1, on one process or one process per host.

The authors' recipe (``configs/``) with :func:`dropblock_jax.models.resnet`: SGD with
Nesterov momentum, a linear warm-up and step decay, weight decay on the non-batch-norm
weights, optional label smoothing, bfloat16 compute, and DropBlock's keep_prob going
linearly from 1 to its target at the last step (a traced value: one compile). Data
comes from ``prepare.py``'s ArrayRecord shards through Grain (``input_pipeline.py``);
every process reads its own slice, and the slices form one global batch on the
``"data"`` mesh (``pod/``, this folder's package, as are the checkpoints, preemption and
the processes; ``examples/train.py`` runs on it too).

Batch norm statistics are those of groups of ``batch_norm_group_size`` samples (the
authors' per-core statistics on a TPU), or of the global batch.

Evaluation is exact: every val image once (padded, masked batches), top-1 and top-5,
every ``eval_every_steps`` and at the end. Orbax checkpoints are written every
``checkpoint_every_steps``, at the end, and on SIGTERM (then the run exits with status
0); a rerun with the same work directory continues from the last complete one
bit-exactly, whatever stopped the run (a SIGKILL mid-save included): the masks come
from ``fold_in(key, step)`` and the data from (seed, process, step). Process 0 writes
``WORKDIR/metrics.jsonl`` (one JSON object a line) and TensorBoard events in
``WORKDIR/tensorboard``; their ``images_per_second_per_device`` counts the training
steps only (not evaluations, checkpoints or the compilation), and
``input_wait_fraction`` is the share of that time the loop waited for its next batch.
The work directory and ``checkpoint_dir`` may be URLs (``gs://bucket/run``, any path
``etils.epath`` opens); the data directory is read as files.
``--config.synthetic_data=True`` trains on random batches made on the devices (no
``data_dir``, no evaluation): the devices' images/s before any data is prepared.

Run it::

    python examples/imagenet/train.py --config examples/imagenet/configs/dropblock.py \
        --workdir /tmp/run --config.data_dir=/data/imagenet-arrayrecord [--config.FIELD=VALUE ...]
    ... --simulate-hosts 2     # 2 local processes x 2 CPU devices (with configs/cpu.py)
    ... --config.synthetic_data=True   # instead of data_dir: the chips' images/s on random batches
    ... --distributed          # one process per host of a TPU pod slice or GPU cluster (SLURM:
                               # one task per node, every GPU of it)

See ``docs/imagenet.md`` for the launch lines, batch sizes and expected times.

References:
  Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional networks",
  NeurIPS 2018 (arXiv 1810.12890). Goyal et al., "Accurate, large minibatch SGD:
  training ImageNet in 1 hour", 2017 (the warm-up and the linear scaling rule).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grain
import input_pipeline
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pod
from absl import app, flags
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags

from dropblock_jax import linear_keep_prob_schedule
from dropblock_jax.models import DEPTHS, REGULARIZED_SHORTCUTS, resnet

REGULARIZERS = ("none", "dropblock")
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
KEEP_PROB_SCHEDULES = ("linear", "constant")
METRICS_FILE = "metrics.jsonl"
# What config.synthetic_data stands in for: ILSVRC 2012's classes and train images.
SYNTHETIC_CLASSES, SYNTHETIC_TRAIN_RECORDS = 1000, 1_281_167


# ----------------------------------------------------------------------------------------
# The configuration.


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"config.{field} must be {allowed}, got {value!r}.")


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a URL (``gs://bucket/run``) rather than a local path."""
    return "://" in os.fspath(path)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises a ValueError naming the field, its value and what is allowed, for the first bad field."""
    if not config.data_dir and not config.synthetic_data:
        _fail("data_dir", config.data_dir, "the directory prepare.py wrote (--config.data_dir=DIR)")
    if is_url(config.data_dir):
        # ArrayRecord reads files: a bucket is mounted (gcsfuse) or copied to a disk.
        _fail("data_dir", config.data_dir, "a directory of this machine (mount a bucket with gcsfuse, or copy it)")
    choices = {
        "regularizer": REGULARIZERS,
        "dtype": tuple(DTYPES),
        "keep_prob_schedule": KEEP_PROB_SCHEDULES,
        "regularized_shortcuts": REGULARIZED_SHORTCUTS,
        "model_depth": tuple(DEPTHS),
    }
    for field, allowed in choices.items():
        if config[field] not in allowed:
            _fail(field, config[field], f"one of {allowed}")
    positive_ints = (
        "image_size",
        "model_width",
        "block_size",
        "global_batch_size",
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "lr_schedule_epochs",
        "prefetch_batches",
    )
    for field in positive_ints:
        if not isinstance(config[field], int) or config[field] < 1:
            _fail(field, config[field], "a positive integer")
    for field in (
        "eval_every_steps",
        "data_workers",
        "profile_steps",
        "profile_first_step",
        "data_threads",
        "batch_norm_group_size",
    ):
        if not isinstance(config[field], int) or config[field] < 0:
            _fail(field, config[field], "an integer >= 0")
    if config.batch_norm_group_size and config.global_batch_size % config.batch_norm_group_size:
        _fail(
            "batch_norm_group_size",
            config.batch_norm_group_size,
            f"0 (the global batch) or a divisor of global_batch_size={config.global_batch_size}",
        )
    if config.num_train_steps != -1 and config.num_train_steps < 1:
        _fail("num_train_steps", config.num_train_steps, "a positive integer, or -1 for num_epochs of data")
    if config.num_train_steps == -1 and not config.num_epochs > 0:
        _fail("num_epochs", config.num_epochs, "a positive number (with num_train_steps -1)")
    if not 0 < config.keep_prob <= 1:
        _fail("keep_prob", config.keep_prob, "in (0, 1]")
    if not 0 <= config.label_smoothing < 1:
        _fail("label_smoothing", config.label_smoothing, "in [0, 1)")
    if not 0 < config.eval_crop_fraction <= 1:
        _fail("eval_crop_fraction", config.eval_crop_fraction, "in (0, 1]")
    for field in ("base_learning_rate", "lr_decay_factor"):
        if not config[field] > 0:
            _fail(field, config[field], "a positive number")
    for field in ("warmup_epochs", "weight_decay", "momentum"):
        if not config[field] >= 0:
            _fail(field, config[field], "a number >= 0")
    decays = tuple(config.lr_decay_epochs)
    if list(decays) != sorted(decays) or any(not 0 < e <= config.lr_schedule_epochs for e in decays):
        _fail("lr_decay_epochs", decays, f"increasing epochs in (0, lr_schedule_epochs={config.lr_schedule_epochs}]")


def total_steps(config: ml_collections.ConfigDict, train_records: int) -> int:
    """``num_train_steps``, or ``num_epochs`` of the train split at ``global_batch_size``."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return max(1, math.floor(config.num_epochs * train_records / config.global_batch_size))


# ----------------------------------------------------------------------------------------
# Schedules.


def learning_rate_schedule(config: ml_collections.ConfigDict, train_records: int, steps: int) -> optax.Schedule:
    """The authors' learning rate: linear warm-up, then steps of ``lr_decay_factor``, stretched with the run.

    ``peak = base_learning_rate * global_batch_size / 256``. The warm-up and the decays
    are epochs of an ``lr_schedule_epochs``-epoch run (``warmup_epochs``,
    ``lr_decay_epochs``); a run of ``E = steps / floor(train_records /
    global_batch_size)`` epochs moves each mark ``e`` to epoch ``floor(e /
    lr_schedule_epochs * E)``: the warm-up stretches with the run, as do the decays
    (``get_lr_schedule`` of the authors' ``resnet_main.py``). At step ``s``, epoch
    ``s * global_batch_size / train_records``: ``peak * epoch / warmup`` during the
    warm-up, then ``peak * lr_decay_factor ** n``, ``n`` the decay marks reached (a mark
    reached replaces the warm-up, in the authors' order).
    """
    peak = config.base_learning_rate * config.global_batch_size / 256
    batch = config.global_batch_size
    # get_lr_schedule counts whole steps an epoch; the epoch of a step does not (resnet_model_fn's current_epoch).
    run_epochs = steps / max(1, train_records // batch)

    def first_step_of(epoch: int) -> int:
        # The first step whose epoch, step * batch / train_records, is at least ``epoch``: exact, in integers.
        return -(-epoch * train_records // batch)

    marks = [
        math.floor(e / config.lr_schedule_epochs * run_epochs) for e in (config.warmup_epochs, *config.lr_decay_epochs)
    ]
    warmup_steps = marks[0] * train_records / batch
    levels = [(config.lr_decay_factor**i, first_step_of(mark)) for i, mark in enumerate(marks)]

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step)
        rate = peak * step / warmup_steps if warmup_steps else jnp.full(step.shape, peak)
        for multiplier, start in levels:
            rate = jnp.where(step < start, rate, peak * multiplier)
        return rate

    return schedule


def keep_prob_schedule(config: ml_collections.ConfigDict, steps: int) -> Callable[[jax.Array], jax.Array] | None:
    """The keep_prob of group 4 at each step (None without DropBlock): linear to the target at the last step."""
    if config.regularizer != "dropblock":
        return None
    if config.keep_prob_schedule == "constant":
        return lambda step: jnp.float32(config.keep_prob)
    return linear_keep_prob_schedule(config.keep_prob, steps)


# ----------------------------------------------------------------------------------------
# Model, optimizer, steps.


def make_model(config: ml_collections.ConfigDict, num_classes: int, params_key: jax.Array) -> nnx.Module:
    """The configured ResNet; its dropout streams are reseeded each step."""
    return resnet(
        config.model_depth,
        num_classes,
        regularizer=config.regularizer,
        keep_prob=config.keep_prob,
        block_size=config.block_size,
        regularized_shortcuts=config.regularized_shortcuts,
        dtype=DTYPES[config.dtype],
        param_dtype=jnp.float32,
        base_width=config.model_width,
        rngs=nnx.Rngs(params=params_key, dropout=0),
    )


def decay_mask(model: nnx.Module, params: nnx.State) -> Any:
    """True for every parameter but the batch norms' (the authors leave those out of the L2 term)."""
    norms = {path for path, node in nnx.iter_graph(model) if isinstance(node, nnx.BatchNorm)}

    def decayed(path: tuple[Any, ...], _: Any) -> bool:
        keys = tuple(getattr(entry, "key", getattr(entry, "idx", entry)) for entry in path)
        return not any(keys[:length] in norms for length in range(len(keys)))

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config: ml_collections.ConfigDict, learning_rate: optax.Schedule, mask: Any) -> Any:
    """L2 on the masked weights (``add_decayed_weights`` is the gradient of ``wd / 2 * |w|^2``), then Nesterov SGD."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask),
        optax.sgd(learning_rate, momentum=config.momentum, nesterov=config.nesterov),
    )


def normalize(images: jax.Array) -> jax.Array:
    """uint8 RGB to the network's input: per-channel mean and standard deviation, float32."""
    mean = jnp.asarray(input_pipeline.MEAN_RGB, jnp.float32)
    std = jnp.asarray(input_pipeline.STDDEV_RGB, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std


def correct_counts(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Top-1 and top-5 hits and the number of real images of one evaluation batch.

    Rows whose ``mask`` is False pad the last batch to the global batch size; they count
    for nothing, whatever the model predicts for them.
    """
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {
        "top1": jnp.sum((jnp.argmax(logits, axis=-1) == labels) & mask),
        "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) & mask),
        "eval_images": jnp.sum(mask),
    }


class Trainer:
    """The model's structure, the optimizer and the jitted train and eval steps of one configuration.

    The train state (what a checkpoint holds) is ``{"params", "batch_stats",
    "opt_state", "step"}``; the model's other variables (dropout streams, keep_probs)
    are set at every step and are not saved.
    """

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int, train_records: int) -> None:
        self.config = config
        self.num_classes = num_classes
        self.steps = total_steps(config, train_records)
        self.steps_per_epoch = train_records / config.global_batch_size
        self.learning_rate = learning_rate_schedule(config, train_records, self.steps)
        self.keep_prob = keep_prob_schedule(config, self.steps)
        self.group_size = config.batch_norm_group_size or config.global_batch_size
        self._params_key, self.dropout_key = jax.random.split(jax.random.key(config.seed))
        abstract = nnx.eval_shape(lambda: make_model(config, num_classes, self._params_key))
        self.graphdef, abstract_params, _, _ = nnx.split(abstract, nnx.Param, nnx.BatchStat, ...)
        self.tx = make_optimizer(config, self.learning_rate, decay_mask(abstract, abstract_params))
        self.train_step = jax.jit(self._train_step, donate_argnums=0)
        self.forward = jax.jit(self._forward)
        self.eval_step = jax.jit(self._eval_step)
        self._compiled_eval_step: Any = None

    def run_eval_step(self, state: dict[str, Any], other: Any, batch: dict[str, Any]) -> Any:
        """:attr:`eval_step` on a batch, compiled on every process before its first run."""
        if self._compiled_eval_step is None:
            self._compiled_eval_step = pod.compiled_together(self.eval_step, state, other, batch, name="eval step")
        return self._compiled_eval_step(state, other, batch)

    def initial_state(self, sharding: jax.sharding.Sharding) -> tuple[dict[str, Any], Any]:
        """The train state and the model's other variables at step 0, as global arrays with ``sharding``.

        One compiled program builds them on every process alike (from the seed), rather
        than hundreds of small eager ones.
        """

        def build() -> tuple[dict[str, Any], Any]:
            model = make_model(self.config, self.num_classes, self._params_key)
            _, params, batch_stats, other = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
            state = {
                "params": params,
                "batch_stats": batch_stats,
                "opt_state": self.tx.init(params),
                "step": jnp.zeros((), jnp.int32),
            }
            return state, other

        return jax.jit(build, out_shardings=sharding)()

    def _model(self, params: Any, state: dict[str, Any], other: Any) -> nnx.Module:
        return nnx.merge(self.graphdef, params, state["batch_stats"], other, copy=True)

    def _forward(
        self, params: Any, state: dict[str, Any], other: Any, images: jax.Array
    ) -> tuple[jax.Array, Any, jax.Array]:
        """The training-mode logits of a global batch, the new batch statistics and the step's keep_prob.

        The batch is cut into groups of ``batch_norm_group_size`` consecutive samples
        (one group: the global batch). Each group is normalized by its own statistics, as
        each TPU core normalizes its own samples in the authors' code, and draws its own
        DropBlock masks (the group's index folded into the step's key), normalized by
        its own kept count; the running averages become the mean of the groups' updates.
        Groups are laid out whole on devices when their count is a multiple of the
        device count, so that no activation crosses devices for them. A sample's mask
        depends on its group and its place in it.
        """
        step = state["step"]
        keep_prob = jnp.float32(1.0) if self.keep_prob is None else self.keep_prob(step)
        batch = images.shape[0]
        grouped = normalize(images).reshape(batch // self.group_size, self.group_size, *images.shape[1:])
        if grouped.shape[0] % jax.device_count() == 0:
            grouped = jax.lax.with_sharding_constraint(grouped, pod.data_shardings()[1])
        # The masks of a step depend on (seed, step, group) only, not on where the run restarted.
        step_key = jax.random.fold_in(self.dropout_key, step)
        keys = jax.vmap(lambda group: jax.random.fold_in(step_key, group))(jnp.arange(grouped.shape[0]))

        def one_group(images: jax.Array, key: jax.Array) -> tuple[jax.Array, Any]:
            model = self._model(params, state, other)
            if self.keep_prob is not None:
                model.set_stage_keep_probs(keep_prob)
            nnx.reseed(model, dropout=key)
            return model(images), nnx.state(model, nnx.BatchStat)

        logits, batch_stats = jax.vmap(one_group)(grouped, keys)
        batch_stats = jax.tree.map(lambda stats: jnp.mean(stats, axis=0), batch_stats)
        return logits.reshape(batch, -1), batch_stats, keep_prob

    def _train_step(
        self, state: dict[str, Any], other: Any, batch: dict[str, jax.Array]
    ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        step = state["step"]
        targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], self.num_classes), self.config.label_smoothing)

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[Any, jax.Array]]:
            logits, batch_stats, keep_prob = self._forward(params, state, other, batch["image"])
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            return loss, (batch_stats, keep_prob)

        (loss, (batch_stats, keep_prob)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "params": optax.apply_updates(state["params"], updates),
            "batch_stats": batch_stats,
            "opt_state": opt_state,
            "step": step + 1,
        }
        return new_state, {"loss": loss, "learning_rate": self.learning_rate(step), "keep_prob": keep_prob}

    def _eval_step(
        self, state: dict[str, Any], other: Any, batch: dict[str, jax.Array]
    ) -> tuple[dict[str, jax.Array], jax.Array]:
        model = self._model(state["params"], state, other)
        model.eval()
        logits = model(normalize(batch["image"]))
        return correct_counts(logits, batch["label"], batch["mask"]), logits


# ----------------------------------------------------------------------------------------
# What the run writes: in the work directory, which may be a bucket.


def write_text(path: epath.Path, text: str) -> None:
    """Replaces ``path``'s content with ``text`` whole: a killed write leaves the old content.

    A bucket's object is replaced whole by its upload; a local file is written beside
    and renamed over the old one.
    """
    if is_url(path):
        path.write_text(text)
    else:
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        partial.replace(path)


class JsonLines:
    """A file of one JSON object a line that a resumed run continues.

    Buckets cannot append to an object, so the file is rewritten whole (by
    :func:`write_text`) at every :meth:`append`; it stays small (a line every
    ``log_every_steps``). Opening it keeps the lines ``keep`` accepts, the ones a run
    resumed from a checkpoint does not write again, and drops the rest.
    """

    def __init__(self, path: epath.Path, keep: Callable[[dict[str, Any]], bool]) -> None:
        self.path = path
        old = path.read_text().splitlines() if path.exists() else []
        self.records = [record for record in map(json.loads, old) if keep(record)]

    def append(self, record: dict[str, Any]) -> None:
        """Adds ``record`` as the last line."""
        self.records.append(record)
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))


class LocalFolder:
    """A local folder for writers that need one (TensorBoard's, the profiler's), copied to ``target`` if remote.

    With a local ``target`` it is ``target`` itself; for a URL, a temporary folder whose
    files :meth:`upload` copies, whole, under ``target``.
    """

    def __init__(self, target: epath.Path) -> None:
        self.target = target
        self.remote = is_url(target)
        self.path = pathlib.Path(tempfile.mkdtemp(prefix="workdir-")) if self.remote else pathlib.Path(target)

    def upload(self) -> None:
        """Copies every file of the local folder to the same place under the target (remote targets only)."""
        if not self.remote:
            return
        for file in sorted(self.path.rglob("*")):
            if file.is_file():
                destination = self.target / file.relative_to(self.path).as_posix()
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(file.read_bytes())

    def close(self) -> None:
        """Uploads what is left and removes the temporary folder (remote targets only)."""
        if self.remote:
            self.upload()
            shutil.rmtree(self.path)


def is_evaluation(record: dict[str, Any]) -> bool:
    """Whether a line of ``metrics.jsonl`` is an evaluation's (the others are training lines)."""
    return "top1" in record


class MetricsWriter:
    """``WORKDIR/metrics.jsonl`` and TensorBoard events, written by process 0 only; a line on stdout.

    A run resumed at ``resumed_step`` keeps the training lines up to that step and the
    evaluations before it (an evaluation due at that step runs again); its TensorBoard
    events start a new file that discards the old files' later steps.
    """

    def __init__(self, workdir: epath.Path, resumed_step: int) -> None:
        self.active = jax.process_index() == 0
        self.events: Any = None
        if self.active:
            from tensorboardX import SummaryWriter

            def kept(record: dict[str, Any]) -> bool:
                return record["step"] < resumed_step or (record["step"] == resumed_step and not is_evaluation(record))

            self.lines = JsonLines(workdir / METRICS_FILE, kept)
            self.folder = LocalFolder(workdir / "tensorboard")
            self.events = SummaryWriter(str(self.folder.path), purge_step=resumed_step or None)

    def write(self, record: dict[str, Any]) -> None:
        """Appends ``record`` (with its ``step``) as one line, and its numbers as TensorBoard scalars."""
        if not self.active:
            return
        self.lines.append(record)
        for name, value in record.items():
            if name != "step":
                self.events.add_scalar(name, value, record["step"])
        self.events.flush()
        self.folder.upload()
        print(" ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()), flush=True)

    def best(self, metric: str) -> dict[str, Any] | None:
        """The evaluation line with the highest ``metric`` over the whole run (earlier launches included)."""
        evaluations = [record for record in self.lines.records if metric in record] if self.active else []
        return max(evaluations, key=lambda record: record[metric], default=None)

    def close(self) -> None:
        """Closes the files."""
        if self.active:
            self.events.close()
            self.folder.close()


class StepClock:
    """The wall time of the training steps of each logging interval, and the share of it spent waiting for input.

    Evaluations, checkpoints and the train step's compilation run inside
    :meth:`excluded` and do not count; the loop's waits for its next batch run inside
    :meth:`waiting` and count, as part of the steps. A user reads from the share
    whether the input pipeline keeps the devices busy.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._start = clock()
        self._seconds = {"excluded": 0.0, "waiting": 0.0}

    @contextlib.contextmanager
    def _counted_as(self, part: str) -> Iterator[None]:
        start = self._clock()
        try:
            yield
        finally:
            self._seconds[part] += self._clock() - start

    def excluded(self) -> contextlib.AbstractContextManager[None]:
        """Time that is not the training steps'."""
        return self._counted_as("excluded")

    def waiting(self) -> contextlib.AbstractContextManager[None]:
        """The loop waiting for its next batch."""
        return self._counted_as("waiting")

    def lap(self) -> tuple[float, float]:
        """(seconds of training steps since the previous lap, the share of them spent waiting); starts the next."""
        now = self._clock()
        seconds = now - self._start - self._seconds["excluded"]
        waited = self._seconds["waiting"] / seconds if seconds > 0 else 0.0
        self._start, self._seconds = now, {"excluded": 0.0, "waiting": 0.0}
        return seconds, waited


def synthetic_batches(
    config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding
) -> Iterator[tuple[dict, dict]]:
    """One global batch of random images and labels, made on the devices, at every step (``config.synthetic_data``).

    Nothing crosses from the hosts: a run measures the devices' images/s alone, as the
    authors' ``resnet_main.py`` without ``data_dir`` and Flax's fake-data benchmark do.
    """

    def make(key: jax.Array) -> dict[str, jax.Array]:
        images, labels = jax.random.split(key)
        shape = (config.global_batch_size, config.image_size, config.image_size, 3)
        return {
            "image": jax.random.randint(images, shape, 0, 256).astype(jnp.uint8),
            "label": jax.random.randint(labels, shape[:1], 0, SYNTHETIC_CLASSES),
        }

    batch = jax.jit(make, out_shardings=sharding)(jax.random.key(config.seed))
    return itertools.repeat(({}, batch))


# ----------------------------------------------------------------------------------------
# The run.


def count_records(data_dir: str, split: str) -> tuple[int, int]:
    """(records held by the readable shards of ``split``, shards that cannot be read, e.g. cut short)."""
    try:
        files = input_pipeline.shard_files(data_dir, split)
    except FileNotFoundError:
        return 0, 0
    held = unreadable = 0
    for file in files:
        try:
            held += len(grain.sources.ArrayRecordDataSource([file]))
        except RuntimeError:
            unreadable += 1
    return held, unreadable


def check_data(data_dir: str, info: dict[str, Any]) -> None:
    """Stops every process when the hosts' data directories differ, or one holds other records than it says.

    Each host reads its own copy of the data (a local disk): a half-copied one
    (missing or truncated shards) or one prepared differently would train on other
    images, or stall the processes at the end of an epoch. Compared across hosts: the
    classes of ``info.json`` (a CRC-32), its record counts, the records the shards
    hold and the shards that cannot be read; then on each host, the counts with the
    records.
    """
    facts = {"info.json classes (CRC-32)": zlib.crc32(json.dumps(info["classes"]).encode()) & 0x7FFFFFFF}
    for split in input_pipeline.SPLITS:
        facts[f"info.json {split} count"] = int(info[split])
        held, unreadable = count_records(data_dir, split)
        facts[f"{split} records in the shards"] = held
        facts[f"unreadable {split} shards"] = unreadable
    pod.check_hosts_agree(facts, f"config.data_dir={data_dir}")
    for split in input_pipeline.SPLITS:
        said, held = facts[f"info.json {split} count"], facts[f"{split} records in the shards"]
        unreadable = facts[f"unreadable {split} shards"]
        if said != held or unreadable:
            raise ValueError(
                f"config.data_dir={data_dir}: info.json counts {said} {split} records, its {split}-*.array_record "
                f"shards hold {held}, {unreadable} shard(s) cannot be read (missing or cut short: copy the directory "
                "again, or rerun prepare.py)."
            )


def batches_from(dataset: Iterable[Any], workers: int) -> Iterator[Any]:
    """``dataset``'s batches; its worker processes, if any, started deaf to SIGTERM.

    A preemption's SIGTERM reaches every process: the workers must keep feeding the
    steps up to the checkpoint it triggers (``pod.sigterm_ignored_by_new_processes``).
    Grain starts them when the first batch is asked for.
    """
    iterator = iter(dataset)
    if not workers:
        return iterator
    with pod.sigterm_ignored_by_new_processes():
        first = next(iterator, None)
    return iterator if first is None else itertools.chain([first], iterator)


def evaluate(
    trainer: Trainer,
    state: dict[str, Any],
    other: Any,
    batches: Iterator[tuple[dict, dict]],
    debug: epath.Path | None,
) -> dict[str, Any]:
    """Top-1, top-5 and the count of images over the whole val split; with ``debug``, the predictions too."""
    totals = {"top1": 0, "top5": 0, "eval_images": 0}
    dumped: dict[str, list[np.ndarray]] = {"record": [], "label": [], "logits": []}
    for host, batch in batches:
        counts, logits = trainer.run_eval_step(state, other, batch)
        for name, value in jax.device_get(counts).items():
            totals[name] += int(value)
        if debug is not None:
            # Every process's rows, in process order (what each host saw and what the devices gave).
            dumped["record"].append(multihost_utils.process_allgather(host["record"], tiled=True))
            dumped["label"].append(np.asarray(multihost_utils.process_allgather(batch["label"], tiled=True)))
            dumped["logits"].append(np.asarray(multihost_utils.process_allgather(logits, tiled=True)))
    step = int(state["step"])
    if debug is not None and jax.process_index() == 0:
        with (debug / f"eval_step{step}.npz").open("wb") as file:
            np.savez(file, **{k: np.concatenate(v) for k, v in dumped.items()})
    count = max(totals["eval_images"], 1)
    return {
        "step": step,
        "top1": totals["top1"] / count,
        "top5": totals["top5"] / count,
        "eval_images": totals["eval_images"],
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]) -> dict[str, Any]:
    """Trains and evaluates as configured, resuming from ``workdir``'s checkpoints; returns the final train state."""
    check_config(config)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if config.synthetic_data:
        info = {"classes": range(SYNTHETIC_CLASSES), "train": SYNTHETIC_TRAIN_RECORDS}
    else:
        info = input_pipeline.read_info(config.data_dir)
        check_data(config.data_dir, info)
    local_batch = pod.check_global_batch(config.global_batch_size, "config.global_batch_size")
    replicated, batched = pod.data_shardings()
    trainer = Trainer(config, len(info["classes"]), info["train"])
    state, other = trainer.initial_state(replicated)
    checkpoints = config.checkpoint_dir or workdir / "checkpoints"
    manager = pod.checkpoint_manager(checkpoints, max_to_keep=config.keep_checkpoints)
    state = pod.restore_or_keep(manager, state)
    first, last = int(state["step"]), trainer.steps
    debug = workdir / "debug" if config.debug_dumps and not config.synthetic_data else None
    if debug is not None:
        debug.mkdir(exist_ok=True)
    process, processes = jax.process_index(), jax.process_count()
    if config.synthetic_data:
        train_batches, eval_data = None, None
    else:
        reading = {"threads": config.data_threads, "workers": config.data_workers}
        data = {"process_index": process, "process_count": processes, "local_batch": local_batch}
        data |= {"image_size": config.image_size, "crop_fraction": config.eval_crop_fraction}
        train_batches = input_pipeline.train_batches(
            config.data_dir, seed=config.seed, start_step=first, **data, **reading
        )
        eval_data, _ = input_pipeline.eval_batches(config.data_dir, **data, **reading)
    writer = MetricsWriter(workdir, first)
    if process == 0:
        print(
            f"{processes} process(es), {jax.device_count()} device(s), global batch {config.global_batch_size}, "
            f"{trainer.steps_per_epoch:.1f} steps an epoch, steps {first}..{last - 1} of {last}",
            flush=True,
        )

    def run_eval() -> None:
        # Synthetic data has no validation split: its accuracy would mean nothing.
        if eval_data is not None:
            batches = input_pipeline.on_devices(batches_from(eval_data, config.data_workers), batched)
            writer.write(evaluate(trainer, state, other, batches, debug))

    if config.eval_every_steps and 0 < first < last and first % config.eval_every_steps == 0:
        # A run stopped by SIGTERM saves and exits before the evaluation due at that step.
        run_eval()

    pending: list[dict[str, jax.Array]] = []
    clock = StepClock()
    train_step = None
    if train_batches is None:
        stream = synthetic_batches(config, batched)
    else:
        stream = input_pipeline.on_devices(
            batches_from(train_batches, config.data_workers), batched, config.prefetch_batches
        )
    records_log = None
    if debug is not None:
        records_log = JsonLines(debug / f"train_records.process{process}.jsonl", lambda record: record["step"] < first)
    profile = LocalFolder(workdir / "profile") if config.profile_steps and process == 0 else None
    profiling = False
    with pod.Preemption() as preemption:
        for step in range(first, last):
            if profile is not None and step == config.profile_first_step:
                with clock.excluded():
                    jax.profiler.start_trace(str(profile.path))
                profiling = True
            with clock.waiting():
                host, batch = next(stream)
            if train_step is None:
                # Compiled ahead, so that the first interval's images/s counts the step, not its compilation.
                with clock.excluded():
                    train_step = pod.compiled_together(trainer.train_step, state, other, batch, name="train step")
            state, metrics = train_step(state, other, batch)
            pending.append(metrics)
            if records_log is not None:
                records_log.append({"step": step, "records": host["record"].tolist()})
            if profiling and step + 1 == config.profile_first_step + config.profile_steps:
                jax.block_until_ready(state)
                with clock.excluded():
                    jax.profiler.stop_trace()
                profiling = False
            done = step + 1
            preempted = preemption.reached(step)
            if done % config.log_every_steps == 0 or done == last or preempted:
                values = jax.device_get(pending)
                seconds, waited = clock.lap()
                images = len(values) * config.global_batch_size
                writer.write(
                    {
                        "step": done,
                        "loss": float(np.mean([v["loss"] for v in values])),
                        "learning_rate": float(values[-1]["learning_rate"]),
                        "keep_prob": float(values[-1]["keep_prob"]),
                        "images_per_second_per_device": images / seconds / jax.device_count(),
                        "input_wait_fraction": waited,
                        "epoch": done / trainer.steps_per_epoch,
                    }
                )
                pending = []
            # The steps' device time counts as training, up to here; the save's and the evaluation's do not.
            if done % config.checkpoint_every_steps == 0 or done == last or preempted:
                jax.block_until_ready(state)
                with clock.excluded():
                    manager.save(done, args=ocp.args.StandardSave(state), force=preempted)
            if preempted:
                if process == 0:
                    print(f"SIGTERM: saved step {done}, stopping", flush=True)
                break
            if config.eval_every_steps and done % config.eval_every_steps == 0 and done != last:
                jax.block_until_ready(state)
                with clock.excluded():
                    run_eval()
        else:
            with clock.excluded():
                run_eval()
    if profiling:
        jax.profiler.stop_trace()
    if profile is not None:
        profile.close()
    manager.wait_until_finished()
    manager.close()
    best = writer.best("top1")
    if best is not None:
        print(f"best top1 {best['top1']:.6g} at step {best['step']}", flush=True)
    writer.close()
    return state


# ----------------------------------------------------------------------------------------
# The command line.

config_flags.DEFINE_config_file("config", None, "a file of examples/imagenet/configs/", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl and TensorBoard events; a rerun resumes from it")
flags.DEFINE_integer("simulate-hosts", None, "run this many local processes (CPU devices), as the hosts of a pod")
flags.DEFINE_integer("devices-per-host", 2, "CPU devices of each simulated host")
flags.DEFINE_float("timeout", 3600.0, "seconds the simulated hosts may take")
flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() with its own detection (TPU pod slices, SLURM)")
flags.DEFINE_string("coordinator", None, "host:port of process 0 (explicit initialization; CPU processes use gloo)")
flags.DEFINE_integer("num-processes", None, "with --coordinator")
flags.DEFINE_integer("process-id", None, "with --coordinator")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> int:
    """Starts or joins the processes, then trains."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    hosts = flags.FLAGS["simulate-hosts"].value
    if hosts:
        passed_on = pod.without_option(sys.argv[1:], "--simulate-hosts")
        devices = flags.FLAGS["devices-per-host"].value
        return pod.simulate_hosts(__file__, hosts, devices, passed_on, flags.FLAGS.timeout)
    pod.initialize(
        flags.FLAGS.coordinator,
        flags.FLAGS["num-processes"].value,
        flags.FLAGS["process-id"].value,
        flags.FLAGS.distributed,
    )
    config = flags.FLAGS.config
    try:
        check_config(config)
        if not config.synthetic_data:
            input_pipeline.read_info(config.data_dir)
    except (ValueError, FileNotFoundError) as error:
        raise app.UsageError(str(error)) from error
    train_and_evaluate(config, flags.FLAGS.workdir)
    pod.shutdown()
    return 0


if __name__ == "__main__":
    app.run(main)
