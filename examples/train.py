"""Data-parallel ResNet training with DropBlock, on one process or one process per host.

DropBlock sits where the paper's authors put it (:class:`dropblock_jax.models.ResNet`:
the last two stages, after every batch norm and on every shortcut), and its
keep_prob follows the paper's linear schedule from 1 to ``--keep-prob``, reached at the
run's last step, as a traced value (one compile for the whole run).

Every process reads only its own slice of the training records, as a pod input
pipeline does (Grain's ``ShardByJaxProcess``); the slices become one global batch with
``jax.make_array_from_process_local_data`` over a 1-D ``"data"`` mesh of all devices.
The masks are drawn from ``fold_in(dropout_key, step)``, and orbax-checkpoint saves the
parameters, batch statistics, optimizer state and step: a run restarted from its
checkpoint continues with the masks and the parameters an unbroken run would have.
A SIGTERM (a preempted TPU VM's notice; the ``--simulate-hosts`` launcher passes it on
to its processes) makes every process save the step it has reached and exit cleanly.
The slicing, the global batch, checkpoints, preemption and the processes are those of
``examples/imagenet/pod/``, the package ``examples/imagenet/train.py`` runs on too,
imported here as ``imagenet.pod``.

Run it (requirements: ``pip install -r examples/requirements.txt``)::

    python examples/train.py                       # one process, this machine's devices
    python examples/train.py --simulate-hosts 2    # 2 local processes x 2 CPU devices
    python examples/train.py --distributed         # one process per host of a TPU pod
                                                   # slice or GPU cluster (docs/pods.md)

Each logged line gives the loss, the scheduled keep_prob and, for every DropBlock
place, the fraction of units its mask kept in that step's global batch.

References:
  Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional networks",
  NeurIPS 2018 (arXiv 1810.12890), Sections 3 (schedule) and 4.1 (placement).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

# examples/ is this script's folder, the first entry of sys.path: the ImageNet example's
# pod machinery (slices, global batch, checkpoints, preemption, processes) is one import away.
from imagenet import pod

from dropblock_jax import block_mask, linear_keep_prob_schedule
from dropblock_jax.models import ResNet
from dropblock_jax.nnx import DropBlock

# sklearn's digits: 1797 records; the first TRAIN_RECORDS are the training set, split
# between the processes; the rest are never read here.
TRAIN_RECORDS = 1600
# The labels of a basic block's regularizer places, in the order ResNet's perturb hook numbers them.
PLACE_NAMES = ("drop1", "drop2", "shortcut_drop")


@dataclasses.dataclass(frozen=True)
class Config:
    """What defines the experiment; the same on every process."""

    steps: int = 40
    global_batch: int = 32
    keep_prob: float = 0.8
    block_size: int = 3
    widths: tuple[int, ...] = (8, 16, 32)
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    image_scale: int = 2


# ----------------------------------------------------------------------------------------
# Input: each process reads its slice and batches it; the batches form one global batch.


def load_host_slice(process_index: int, process_count: int, image_scale: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's training images (NHWC float32) and labels, nothing of the others'."""
    from sklearn.datasets import load_digits

    records = pod.host_records(TRAIN_RECORDS, process_index, process_count, drop_remainder=True)
    digits = load_digits()
    images = digits.images[records.start : records.stop, :, :, None].astype(np.float32)
    # A fixed affine map of the pixel range (0..16 to -1..1), not statistics of the data:
    # a process sees only its slice, and every process must preprocess alike.
    images = upscale(images / 8.0 - 1.0, image_scale)
    return images, digits.target[records.start : records.stop].astype(np.int32)


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
    """NHWC images ``factor`` times larger, bilinearly: neighbouring pixels correlate, as in photos.

    DropBlock is made for such inputs: dropping one pixel of a smooth image hides little.
    """
    if factor == 1:
        return images
    n, height, width, channels = images.shape
    return np.asarray(jax.image.resize(images, (n, height * factor, width * factor, channels), "bilinear"))


def local_batch_indices(step: int, num_local: int, local_batch: int, seed: int, process_index: int) -> np.ndarray:
    """Indices into this process's slice for ``step``: a pure function of its arguments.

    Each epoch reshuffles the slice with a generator seeded by (seed, epoch, process),
    so a restarted run reads the batches an unbroken one would, without saving an
    iterator.
    """
    batches_per_epoch = num_local // local_batch
    epoch, position = divmod(step, batches_per_epoch)
    order = np.random.default_rng([seed, epoch, process_index]).permutation(num_local)
    return order[position * local_batch : (position + 1) * local_batch]


# ----------------------------------------------------------------------------------------
# Model, masks and the train step.


def make_model(config: Config, params_key: jax.Array) -> ResNet:
    """The ResNet with DropBlock at the paper's places; its dropout streams are reseeded each step."""
    return ResNet(
        10,
        widths=config.widths,
        blocks=(1,) * len(config.widths),
        regularizer="dropblock",
        keep_prob=config.keep_prob,
        block_size=config.block_size,
        rngs=nnx.Rngs(params=params_key, dropout=0),
    )


def dropblock_places(model: ResNet) -> dict[tuple[int, int, int], DropBlock]:
    """Every DropBlock layer of ``model`` by (stage, block, place), as ResNet's perturb hook numbers them."""
    places = {}
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage):
            for p, layer in enumerate(block.regularizers):
                if isinstance(layer, DropBlock):
                    places[(s, b, p)] = layer
    return places


def place_label(place: tuple[int, int, int]) -> str:
    """``"stage2/block0/drop1"`` for place ``(2, 0, 0)``."""
    s, b, p = place
    return f"stage{s}/block{b}/{PLACE_NAMES[p]}"


def forward_with_masks(model: ResNet, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The logits, and the mask (True = kept) each DropBlock layer drew for ``images``.

    The masks cost one more pass of the hash per place, with no extra random state:
    each layer's next key is read from a copy of its stream, and ``block_mask`` with
    that key is exactly the mask the layer applies.
    """
    layers = dropblock_places(model)
    next_keys = {place: nnx.clone(layer.rngs)() for place, layer in layers.items()}
    masks: dict[str, jax.Array] = {}

    def record(y: jax.Array, place: tuple[int, int, int], stages_from_last: int) -> jax.Array:
        layer = layers[place]
        masks[place_label(place)] = block_mask(
            next_keys[place],
            y.shape,
            layer.keep_prob[...],
            layer.block_size,
            spatial_axes=layer.spatial_axes,
            broadcast_dims=layer.broadcast_dims,
            seed_region=layer.seed_region,
            gamma=layer.gamma,
        )
        return y

    return model(images, perturb=record), masks


def keep_prob_schedule(config: Config) -> optax.Schedule:
    """The paper's schedule: keep_prob falls linearly from 1 to ``config.keep_prob``, reached at the last step."""
    return linear_keep_prob_schedule(config.keep_prob, config.steps)


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """AdamW on the parameters (keep_prob is a model variable, not a parameter: no decay)."""
    return optax.adamw(config.learning_rate, weight_decay=config.weight_decay)


def init_state(config: Config) -> tuple[nnx.GraphDef, dict[str, Any], Any]:
    """The model's structure, the train state, and the model's other variables, on this process.

    The train state (what a checkpoint holds) is ``{"params", "batch_stats",
    "opt_state", "step"}``; the other variables (the dropout streams, the keep_probs)
    are overwritten every step and need no saving. Every process builds the same values
    from the seed; :func:`pod.replicate` makes them global arrays.
    """
    params_key, _ = jax.random.split(jax.random.key(config.seed))
    # Built eagerly: ResNet's constructor needs a concrete keep_prob (it cannot run under jit).
    model = make_model(config, params_key)
    graphdef, params, batch_stats, other = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    state = {
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": make_optimizer(config).init(params),
        "step": jnp.zeros((), jnp.int32),
    }
    return graphdef, state, other


def make_train_step(
    config: Config, graphdef: nnx.GraphDef, *, with_masks: bool = False
) -> Callable[..., tuple[dict[str, Any], dict[str, Any]]]:
    """The train step ``(state, other, images, labels) -> (state, metrics)``, to be jitted.

    The step number in ``state`` gives both the keep_prob (the schedule) and the masks'
    key, ``fold_in(dropout_key, step)``: both traced, so one compile serves the run.
    The metrics are the loss, the keep_prob, the kept fraction of every DropBlock place
    and, with ``with_masks``, the masks themselves.
    """
    _, dropout_key = jax.random.split(jax.random.key(config.seed))
    tx = make_optimizer(config)
    schedule = keep_prob_schedule(config)

    def train_step(
        state: dict[str, Any], other: Any, images: jax.Array, labels: jax.Array
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        step = state["step"]
        keep_prob = schedule(step)

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[Any, dict[str, jax.Array]]]:
            model = nnx.merge(graphdef, params, state["batch_stats"], other, copy=True)
            model.set_stage_keep_probs(keep_prob)
            # Every DropBlock stream restarts from a key of (seed, step): the masks of a
            # step do not depend on how many steps this process has run.
            nnx.reseed(model, dropout=jax.random.fold_in(dropout_key, step))
            logits, masks = forward_with_masks(model, images)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            batch_stats = nnx.state(model, nnx.BatchStat)
            return loss, (batch_stats, masks)

        (loss, (batch_stats, masks)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "params": optax.apply_updates(state["params"], updates),
            "batch_stats": batch_stats,
            "opt_state": opt_state,
            "step": step + 1,
        }
        metrics: dict[str, Any] = {
            "loss": loss,
            "keep_prob": keep_prob,
            "kept_fraction": {label: mask.mean() for label, mask in masks.items()},
        }
        if with_masks:
            metrics["masks"] = masks
        return new_state, metrics

    return train_step


_JITTED_STEPS: dict[tuple[Config, bool], Callable[..., Any]] = {}


def jitted_train_step(config: Config, graphdef: nnx.GraphDef, with_masks: bool) -> Callable[..., Any]:
    """:func:`make_train_step`, jitted once per configuration (a resumed run in the same process reuses it).

    Keyed by the configuration, which determines ``graphdef``.
    """
    key = (config, with_masks)
    if key not in _JITTED_STEPS:
        _JITTED_STEPS[key] = jax.jit(make_train_step(config, graphdef, with_masks=with_masks), donate_argnums=0)
    return _JITTED_STEPS[key]


# ----------------------------------------------------------------------------------------
# The run.


def train(
    config: Config,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 10,
    log_every: int = 5,
    stop_after: int | None = None,
    log: Callable[[str], None] | None = print,
    with_masks: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Trains to ``config.steps`` (or ``stop_after``, or a SIGTERM), resuming from ``checkpoint_dir`` if it holds one.

    Returns the final train state and, for every step run, its metrics as Python
    numbers (the loss, the keep_prob, the kept fraction of each place) and, with
    ``with_masks`` on one process, the masks as NumPy arrays. Only process 0 logs.
    """
    devices = jax.device_count()
    processes = jax.process_count()
    local_batch = pod.check_global_batch(config.global_batch)
    replicated, batched = pod.data_shardings()
    images, labels = load_host_slice(jax.process_index(), processes, config.image_scale)
    if len(images) < local_batch:
        raise ValueError(f"global_batch {config.global_batch} is larger than the {len(images) * processes} records.")

    graphdef, state, other = init_state(config)
    state, other = pod.replicate((state, other), replicated)
    step_fn = jitted_train_step(config, graphdef, with_masks)
    manager = None if checkpoint_dir is None else pod.checkpoint_manager(checkpoint_dir)
    if manager is not None:
        state = pod.restore_or_keep(manager, state)
    say = log if (log is not None and jax.process_index() == 0) else (lambda line: None)
    first = int(state["step"])
    last = config.steps if stop_after is None else min(stop_after, config.steps)
    say(
        f"{processes} process(es), {devices} device(s), global batch {config.global_batch} "
        f"({local_batch} rows read by each process), steps {first}..{last - 1}"
    )
    history = []
    start = time.perf_counter()
    with pod.Preemption() as preemption:
        for step in range(first, last):
            rows = local_batch_indices(step, len(images), local_batch, config.seed, jax.process_index())
            batch = pod.global_batch(batched, (images[rows], labels[rows]))
            if step == first and processes > 1:
                step_fn = pod.compiled_together(step_fn, state, other, *batch, name="train step")
            state, metrics = step_fn(state, other, *batch)
            # Every process asks at every step, so that all stop after the same one.
            preempted = preemption.reached(step)
            if manager is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == last or preempted):
                manager.save(step + 1, args=ocp.args.StandardSave(state), force=preempted)
            masks = metrics.pop("masks", None)
            record = jax.tree.map(float, metrics)
            if masks is not None:
                record["masks"] = jax.tree.map(np.asarray, masks)
            history.append(record)
            if (step + 1) % log_every == 0 or step + 1 == last or preempted:
                kept = " ".join(f"{label}={value:.3f}" for label, value in record["kept_fraction"].items())
                say(f"step {step + 1:4d} loss {record['loss']:.4f} keep_prob {record['keep_prob']:.3f} kept: {kept}")
            if preempted:
                say(f"SIGTERM: saved step {step + 1}, stopping")
                break
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    say(f"done in {time.perf_counter() - start:.1f} s")
    return state, history


# ----------------------------------------------------------------------------------------
# The command line.


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _widths(text: str) -> tuple[int, ...]:
    widths = tuple(_positive_int(w) for w in text.split(","))
    if len(widths) < 2:
        raise argparse.ArgumentTypeError(f"needs at least 2 stages (DropBlock is in the last two), got {text!r}")
    return widths


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line; ``--help`` lists it."""
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=_positive_int, default=defaults.steps)
    parser.add_argument("--global-batch", type=_positive_int, default=defaults.global_batch)
    parser.add_argument("--keep-prob", type=float, default=defaults.keep_prob, help="keep_prob at the end of the run")
    parser.add_argument("--block-size", type=_positive_int, default=defaults.block_size)
    parser.add_argument(
        "--widths",
        type=_widths,
        default=defaults.widths,
        help="channels of each ResNet stage, comma-separated (the last two stages get DropBlock)",
    )
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--checkpoint-dir", default=None, help="save here, and resume from here when it holds one")
    parser.add_argument("--checkpoint-every", type=_positive_int, default=10)
    parser.add_argument("--log-every", type=_positive_int, default=5)
    parser.add_argument("--stop-after", type=_positive_int, default=None, help="stop at this step (as if preempted)")
    cluster = parser.add_argument_group("processes")
    cluster.add_argument(
        "--distributed",
        action="store_true",
        help="jax.distributed.initialize() with its own detection (TPU pod slices, SLURM, ...)",
    )
    cluster.add_argument("--simulate-hosts", type=_positive_int, default=None, help="spawn this many local processes")
    cluster.add_argument("--devices-per-host", type=_positive_int, default=2, help="CPU devices of each simulated host")
    cluster.add_argument("--timeout", type=float, default=600.0, help="seconds the simulated hosts may take")
    cluster.add_argument(
        "--coordinator", default=None, help="host:port of process 0 (explicit initialization; CPU processes use gloo)"
    )
    cluster.add_argument("--num-processes", type=int, default=None)
    cluster.add_argument("--process-id", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the command line, starts or joins the processes, trains."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.simulate_hosts:
        passed_on = pod.without_option(argv, "--simulate-hosts")
        return pod.simulate_hosts(__file__, args.simulate_hosts, args.devices_per_host, passed_on, args.timeout)
    pod.initialize(args.coordinator, args.num_processes, args.process_id, args.distributed)
    config = Config(
        steps=args.steps,
        global_batch=args.global_batch,
        keep_prob=args.keep_prob,
        block_size=args.block_size,
        widths=args.widths,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    train(config, args.checkpoint_dir, args.checkpoint_every, args.log_every, args.stop_after)
    pod.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
