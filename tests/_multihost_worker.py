"""Checks for ``tests/test_multihost.py``, run in each of 2 processes x 2 CPU devices.

Run as ``python tests/_multihost_worker.py PORT PROCESS_ID`` in two processes (ids 0 and 1)
with ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` and ``examples/`` on
``PYTHONPATH`` (for ``examples/train.py`` and its ``imagenet.pod``): they meet through
``jax.distributed`` on ``localhost:PORT`` and exchange collectives through gloo. Every
process computes the one-process reference itself, on one of its own devices, from the
same global arrays, and compares the shards it holds. Every check runs even when
another fails; the results are printed as one JSON object on the last line of stdout.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import train as example
from flax import linen as nn
from imagenet import pod
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dropblock_jax.equinox as dbx
from dropblock_jax import DropBlock, block_mask, drop_block

PROCESSES = 2
DEVICES_PER_PROCESS = 2

AXIS = "data"
BLOCK = 3
LAYOUTS = {"per_channel": (), "shared": (-1,), "batch_shared": (0,)}
FORBIDDEN = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def _mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((jax.device_count(),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def _local_device() -> jax.Device:
    return jax.local_devices()[0]


def _from_process_rows(global_value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global array whose rows of this process come from this process only."""
    rows = len(global_value) // jax.process_count()
    start = jax.process_index() * rows
    return jax.make_array_from_process_local_data(sharding, global_value[start : start + rows])


def _shards_equal(sharded: jax.Array, reference: np.ndarray) -> list[bool]:
    """For each shard this process holds: bit-equal to the reference's block at its index."""
    return [bool(np.array_equal(np.asarray(s.data), reference[s.index])) for s in sharded.addressable_shards]


def _collectives(hlo: str) -> dict:
    lines = hlo.splitlines()
    return {
        "forbidden": sum(1 for line in lines for name in FORBIDDEN if f" {name}(" in line or f" {name}-start(" in line),
        "all_reduce_shapes": [
            line.split("=", 1)[1].split("all-reduce", 1)[0].strip()
            for line in lines
            if " all-reduce(" in line or " all-reduce-start(" in line
        ],
    }


def check_drop_block_on_a_global_batch() -> dict:
    """Every layout and normalize mode on a (32, 14, 14, 64) batch whose rows come from both processes."""
    x = np.asarray(jax.random.normal(jax.random.key(1), (32, 14, 14, 64)))
    key = jax.random.key(2)
    keep = jnp.float32(0.8)
    batch = NamedSharding(_mesh(), P(AXIS))
    results: dict = {"cases": {}, "programs": {}}
    for normalize in ("batch", "expected"):

        def apply(key, x, keep, normalize=normalize):
            return {
                layout: drop_block(jax.random.fold_in(key, i), x, keep, BLOCK, broadcast_dims=dims, normalize=normalize)
                for i, (layout, dims) in enumerate(LAYOUTS.items())
            }

        fn = jax.jit(apply)
        x_global = _from_process_rows(x, batch)
        compiled = fn.lower(key, x_global, keep).compile()
        ys = compiled(key, x_global, keep)
        one_process = fn(key, jax.device_put(x, _local_device()), keep)
        results["programs"][normalize] = _collectives(compiled.as_text())
        for layout, y in ys.items():
            reference = np.asarray(one_process[layout])
            results["cases"][f"{normalize}/{layout}"] = {
                "shards_equal": _shards_equal(y, reference),
                "global_shape": list(y.shape),
                "dropped_fraction": float(np.mean(reference == 0)),
            }
    return results


def check_shard_map_across_processes() -> dict:
    """shard_map over all 4 devices, per-device keys, normalize="batch" over ``axis_name``."""
    devices = jax.device_count()
    x = np.asarray(jax.random.normal(jax.random.key(3), (2 * devices, 8, 8, 4)))
    key = jax.random.key(4)
    keep = 0.8

    def per_device(key, x):
        device_key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
        return drop_block(device_key, x, keep, BLOCK, axis_name=AXIS), block_mask(device_key, x.shape, keep, BLOCK)

    mesh = _mesh()
    fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(AXIS), P(AXIS))))
    y, mask = fn(key, _from_process_rows(x, NamedSharding(mesh, P(AXIS))))
    # Every device's mask, computed here: the processes' masks together give the global count.
    masks = np.stack(
        [np.asarray(block_mask(jax.random.fold_in(key, d), (2, 8, 8, 4), keep, BLOCK)) for d in range(devices)]
    )
    global_scale = np.float32(masks.size) / np.float32(masks.sum())
    expected = np.where(masks, x.reshape(masks.shape) * global_scale, np.float32(0)).reshape(x.shape)
    local_scales = np.float32(masks[0].size) / masks.reshape(devices, -1).sum(axis=1).astype(np.float32)
    return {
        "output_shards_equal_global_scale": _shards_equal(y, expected),
        "mask_shards_equal_per_device_keys": _shards_equal(mask, masks.reshape(x.shape)),
        "distinct_device_masks": [
            bool(not np.array_equal(masks[i], masks[j])) for i in range(devices) for j in range(i + 1, devices)
        ],
        "local_scales_differ_from_global": bool(np.any(local_scales != global_scale)),
        "kept_fraction": float(masks.mean()),
    }


# ----------------------------------------------------------------------------------------
# Data-parallel train steps: the sharded step and the one-process step on the same batch.


def _compare_steps(sharded: list, one_process: list, traces: list[int]) -> dict:
    """Per step: masks of this process's shards equal, loss within float32 round-off."""
    steps = []
    for (loss, keep, masks), (loss_one, keep_one, masks_one) in zip(sharded, one_process):
        masks_one = {name: np.asarray(m) for name, m in masks_one.items()}
        steps.append(
            {
                "loss": float(loss),
                "loss_one_process": float(loss_one),
                "keep_prob": float(keep),
                "keep_prob_one_process": float(keep_one),
                "mask_shards_equal": {name: _shards_equal(m, masks_one[name]) for name, m in masks.items()},
                "kept_fraction": {name: float(m.mean()) for name, m in masks_one.items()},
            }
        )
    return {"steps": steps, "traces": len(traces)}


def _counted(fn, traces: list[int]):
    def traced(*args):
        traces.append(1)
        return fn(*args)

    return traced


def _images(count: int, size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(jax.random.normal(jax.random.key(5), (count, size, size, channels)))
    return images, np.arange(count, dtype=np.int32) % 10


SCHEDULE = optax.linear_schedule(1.0, 0.6, transition_steps=4)
STEPS = (1, 2)  # keep_prob 0.9 then 0.8: traced values of one compiled step


def check_nnx_resnet_train_step() -> dict:
    """The example's NNX ResNet step (DropBlock at the paper's places, set_stage_keep_probs)."""
    # Five steps: the example's schedule reaches 0.6 at step 4, as SCHEDULE does.
    config = example.Config(steps=5, global_batch=16, keep_prob=0.6, widths=(4, 8), block_size=BLOCK)
    images, labels = _images(16, 12, 1)
    mesh = _mesh()
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    graphdef, initial, other = example.init_state(config)
    initial["step"] = jnp.int32(STEPS[0])
    runs = {}
    traces: list[int] = []
    for name in ("sharded", "one_process"):
        step_fn = example.make_train_step(config, graphdef, with_masks=True)
        if name == "sharded":
            step_fn = jax.jit(_counted(step_fn, traces))
            state, model_other = pod.replicate((initial, other), replicated)
            x, y = _from_process_rows(images, batch), _from_process_rows(labels, batch)
        else:
            step_fn = jax.jit(step_fn)
            state, model_other = jax.device_put((initial, other), _local_device())
            x, y = jax.device_put((images, labels), _local_device())
        outputs = []
        for _ in STEPS:
            state, metrics = step_fn(state, model_other, x, y)
            outputs.append((metrics["loss"], metrics["keep_prob"], metrics["masks"]))
        runs[name] = outputs
    return _compare_steps(runs["sharded"], runs["one_process"], traces)


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, keep_prob):
        # DropBlock right after a convolution with bias: its output is 0 only where dropped.
        x = nn.Conv(4, (3, 3))(x)
        x = DropBlock(keep_prob=0.9, block_size=BLOCK, name="drop")(x, deterministic=False, keep_prob=keep_prob)
        self.sow("intermediates", "output", x)
        return nn.Dense(10)(nn.relu(x).mean(axis=(1, 2)))


def check_linen_train_step() -> dict:
    model = LinenCNN()
    images, labels = _images(16, 12, 3)
    params = model.init(jax.random.key(6), images[:1], 1.0)["params"]
    tx = optax.adam(1e-2)
    traces: list[int] = []

    def train_step(params, opt_state, images, labels, step):
        keep_prob = SCHEDULE(step)

        def loss_fn(params):
            logits, state = model.apply(
                {"params": params},
                images,
                keep_prob,
                rngs={"dropout": jax.random.fold_in(jax.random.key(7), step)},
                mutable=["intermediates"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, state["intermediates"]["output"][0] != 0

        (loss, kept), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, (loss, keep_prob, {"drop": kept})

    return _run_steps(train_step, (params, tx.init(params)), images, labels, traces)


class EquinoxCNN(eqx.Module):
    conv: eqx.nn.Conv2d
    drop: dbx.DropBlock
    head: eqx.nn.Linear

    def __init__(self, key):
        conv_key, head_key = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(3, 4, 3, padding=1, key=conv_key)
        # One (C, H, W) sample per call under vmap; "batch" normalization over the vmapped axis.
        self.drop = dbx.DropBlock(keep_prob=0.9, block_size=BLOCK, spatial_axes=(1, 2), axis_name="batch")
        self.head = eqx.nn.Linear(4, 10, key=head_key)

    def __call__(self, x, key, keep_prob):
        x = self.drop(self.conv(x), key=key, keep_prob=keep_prob)
        return self.head(jax.nn.relu(x).mean(axis=(1, 2))), x != 0


def check_equinox_train_step() -> dict:
    model = EquinoxCNN(jax.random.key(8))
    params, static = eqx.partition(model, eqx.is_array)
    images, labels = _images(16, 12, 3)
    images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    tx = optax.adam(1e-2)
    traces: list[int] = []

    def train_step(params, opt_state, images, labels, step):
        keep_prob = SCHEDULE(step)
        keys = jax.random.split(jax.random.fold_in(jax.random.key(9), step), len(images))

        def loss_fn(params):
            model = eqx.combine(params, static)
            logits, kept = jax.vmap(model, in_axes=(0, 0, None), axis_name="batch")(images, keys, keep_prob)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), kept

        (loss, kept), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, (loss, keep_prob, {"drop": kept})

    return _run_steps(train_step, (params, tx.init(params)), images, labels, traces)


def _run_steps(train_step, state, images, labels, traces) -> dict:
    """``train_step(*state, images, labels, step)`` for STEPS, sharded and on one device."""
    mesh = _mesh()
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    runs = {}
    for name in ("sharded", "one_process"):
        if name == "sharded":
            current = pod.replicate(state, replicated)
            x, y = _from_process_rows(images, batch), _from_process_rows(labels, batch)
            step_fn = jax.jit(_counted(train_step, traces))
        else:
            current = jax.device_put(state, _local_device())
            x, y = jax.device_put((images, labels), _local_device())
            step_fn = jax.jit(train_step)
        outputs = []
        for step in STEPS:
            *current, metrics = step_fn(*current, x, y, np.int32(step))
            outputs.append(metrics)
        runs[name] = outputs
    return _compare_steps(runs["sharded"], runs["one_process"], traces)


CHECKS = [
    check_drop_block_on_a_global_batch,
    check_shard_map_across_processes,
    check_nnx_resnet_train_step,
    check_linen_train_step,
    check_equinox_train_step,
]


def _initialize() -> None:
    port, process_id = sys.argv[1], int(sys.argv[2])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=PROCESSES, process_id=process_id)


def main() -> None:
    results = {
        "startup_cpu_seconds": time.process_time(),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
    }
    for check in CHECKS:
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            results[check.__name__] = check()
            results[check.__name__]["seconds"] = time.perf_counter() - start
            results[check.__name__]["cpu_seconds"] = time.process_time() - cpu_start
        except Exception:  # every failure is reported to the test that owns it.
            results[check.__name__] = {"error": traceback.format_exc()}
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    # Before anything touches a device (importing the modules above touches none).
    _initialize()
    main()
