"""Multi-device checks for ``tests/test_sharding.py``, run in a subprocess with 4 host devices.

Run as ``XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/_sharding_checks.py``.
Every check runs even when another fails; the results are printed as one JSON object on
the last line of stdout: ``{check_name: {...measurements...} or {"error": traceback}}``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dropblock_jax import DropBlock, block_mask, drop_block
from dropblock_jax import nnx as db_nnx

DEVICES = 4
AXIS = "data"
# (name, shape, drop_block keyword arguments): small maps, maps of the size of real
# feature maps, low and high seed rates, channels shared.
CASES = [
    ("batch_dense", (8, 8, 8, 4), dict(keep_prob=0.8, normalize="batch")),
    ("expected_dense", (8, 8, 8, 4), dict(keep_prob=0.8, normalize="expected")),
    ("batch_maps", (8, 32, 32, 16), dict(keep_prob=0.8, normalize="batch")),
    ("batch_maps_low_rate", (8, 32, 32, 16), dict(keep_prob=0.95, normalize="batch")),
    ("expected_maps_low_rate", (8, 32, 32, 16), dict(keep_prob=0.95, normalize="expected")),
    ("batch_shared_channels", (8, 32, 32, 16), dict(keep_prob=0.95, normalize="batch", broadcast_dims=(-1,))),
    # Words of 24 channels (one a device on the batch x channels mesh), words of 8 samples.
    ("batch_channels_in_words_of_24", (8, 16, 16, 48), dict(keep_prob=0.8, normalize="batch")),
    ("batch_shared_over_32_samples", (32, 16, 16, 4), dict(keep_prob=0.8, normalize="batch", broadcast_dims=(-1,))),
    (
        "calibrated_everywhere",
        (8, 8, 8, 4),
        dict(keep_prob=0.8, normalize="expected", gamma="calibrated", seed_region="everywhere"),
    ),
]
KEEP_PROB = 0.8
BLOCK = 3
FORBIDDEN = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def _mesh():
    return jax.make_mesh((DEVICES,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def _collectives(hlo: str) -> dict:
    """Collective instructions of an optimized HLO module, with their result shapes."""
    found = {name: 0 for name in FORBIDDEN}
    all_reduce_shapes = []
    for line in hlo.splitlines():
        for name in FORBIDDEN:
            if re.search(rf"\b{name}(-start)?\(", line):
                found[name] += 1
        match = re.search(r"=\s*(.+?)\s+all-reduce(?:-start)?\(", line)
        if match:
            all_reduce_shapes.append(match.group(1))
    return {"forbidden": found, "all_reduce_shapes": all_reduce_shapes}


def _is_scalar_shape(shape: str) -> bool:
    """True for ``f32[]`` or a tuple of such, e.g. ``(f32[], f32[])``."""
    parts = [p.strip() for p in shape.strip("()").split(",")]
    return all(re.fullmatch(r"[a-z0-9]+\[\](\{[^}]*\})?", p) for p in parts)


def _layouts() -> dict:
    """Shardings along the non-spatial axes: the batch over 4 devices (on an Auto mesh and on
    ``jax.make_mesh``'s default Explicit one), and batch x channels over 2 x 2."""
    batch_channels = jax.make_mesh((2, 2), ("b", "c"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    return {
        "batch": NamedSharding(_mesh(), P(AXIS)),
        "batch_explicit": NamedSharding(jax.make_mesh((DEVICES,), (AXIS,)), P(AXIS)),
        "batch_channels": NamedSharding(batch_channels, P("b", None, None, "c")),
    }


def _jit_cases(cases):
    """One jitted program applying ``drop_block`` to every case, each with its own key."""

    def apply(key, xs, keeps):
        return tuple(
            drop_block(jax.random.fold_in(key, i), x, keep, BLOCK, **kwargs)
            for i, (x, keep, (_, _, kwargs)) in enumerate(zip(xs, keeps, cases))
        )

    return jax.jit(apply)


def check_sharded_equals_one_device() -> dict:
    """Cases grouped by ``normalize``, one program per group and layout (compiles are slow)."""
    key = jax.random.key(2)
    results = {"cases": {}, "programs": {}}
    for normalize in ("batch", "expected"):
        cases = [
            (name, shape, {k: v for k, v in kwargs.items() if k != "keep_prob"})
            for name, shape, kwargs in CASES
            if kwargs["normalize"] == normalize
        ]
        keeps = tuple(jnp.asarray(kwargs["keep_prob"]) for _, _, kwargs in CASES if kwargs["normalize"] == normalize)
        xs = tuple(
            jax.random.normal(jax.random.fold_in(jax.random.key(1), i), shape) for i, (_, shape, _) in enumerate(cases)
        )
        fn = _jit_cases(cases)
        ys_one = fn(key, jax.device_put(xs, jax.devices()[0]), keeps)
        for layout, sharding in _layouts().items():
            sharded = jax.device_put(xs, sharding)
            ys_sharded = fn(key, sharded, keeps)
            collectives = _collectives(fn.lower(key, sharded, keeps).compile().as_text())
            results["programs"][f"{normalize}/{layout}"] = {
                "forbidden": collectives["forbidden"],
                "all_reduce_shapes": collectives["all_reduce_shapes"],
                "all_reduce_scalar": [_is_scalar_shape(s) for s in collectives["all_reduce_shapes"]],
            }
            for (name, _, _), x, y_one, y_sharded in zip(cases, sharded, ys_one, ys_sharded):
                results["cases"][f"{name}/{layout}"] = {
                    "bitwise_equal": bool(np.array_equal(np.asarray(y_one), np.asarray(y_sharded))),
                    "dropped_fraction": float(np.mean(np.asarray(y_one) == 0)),
                    "input_shards": len({str(s.index) for s in x.addressable_shards}),
                    "output_sharding_kept": bool(y_sharded.sharding.is_equivalent_to(x.sharding, x.ndim)),
                }
    return results


def check_past_2_to_the_31_units() -> dict:
    """Programs on a global array of 3.3e9 units, sharded, compiled (nothing allocated)."""
    big = (4096, 56, 56, 256)
    programs = {}
    for layout, sharding in _layouts().items():
        x = jax.ShapeDtypeStruct(big, jnp.bfloat16, sharding=sharding)
        for normalize, broadcast_dims in [("batch", ()), ("batch", (-1,)), ("expected", ())]:
            fn = jax.jit(
                lambda k, x, kp, broadcast_dims=broadcast_dims, normalize=normalize: drop_block(
                    k, x, kp, 7, broadcast_dims=broadcast_dims, normalize=normalize
                )
            )
            collectives = _collectives(fn.lower(jax.random.key(0), x, jnp.float32(0.9)).compile().as_text())
            programs[f"{normalize}{broadcast_dims}/{layout}"] = {
                "forbidden": collectives["forbidden"],
                "all_reduce_scalar": [_is_scalar_shape(s) for s in collectives["all_reduce_shapes"]],
            }
    return {"programs": programs}


def check_hlo_parser_control() -> dict:
    """The collective parser on programs known to gather and to all-reduce a vector."""
    mesh = _mesh()
    x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P(AXIS)))
    gather = jax.jit(lambda x: x * 2, out_shardings=NamedSharding(mesh, P()))
    vector_sum = jax.jit(lambda x: x.sum(axis=0), out_shardings=NamedSharding(mesh, P()))
    gathered = _collectives(gather.lower(x).compile().as_text())
    summed = _collectives(vector_sum.lower(x).compile().as_text())
    return {
        "all_gather_found": gathered["forbidden"]["all-gather"],
        "vector_all_reduce_scalar": [_is_scalar_shape(s) for s in summed["all_reduce_shapes"]],
    }


def _shard_map(fn):
    return jax.shard_map(fn, mesh=_mesh(), in_specs=(P(), P(AXIS)), out_specs=(P(AXIS), P(AXIS)))


def check_shard_map_batch_normalization() -> dict:
    x = jax.random.normal(jax.random.key(3), (8, 8, 8, 4))
    key = jax.random.key(4)

    def local(key, x, axis_name):
        key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
        y = drop_block(key, x, KEEP_PROB, BLOCK, axis_name=axis_name)
        return y, block_mask(key, x.shape, KEEP_PROB, BLOCK)

    y_global, mask = jax.jit(_shard_map(functools.partial(local, axis_name=AXIS)))(key, x)
    y_local, mask_again = jax.jit(_shard_map(functools.partial(local, axis_name=None)))(key, x)
    mask = np.asarray(mask)
    x = np.asarray(x)
    # The global "batch" normalization: kept units scaled by count / kept count over all devices.
    scale = np.float32(mask.size) / np.float32(mask.sum())
    expected = np.where(mask, x * scale, np.float32(0))
    per_device = mask.reshape(DEVICES, -1)
    local_scales = np.float32(per_device.shape[1]) / per_device.sum(axis=1).astype(np.float32)
    expected_local = np.where(mask, x * np.repeat(local_scales, 2)[:, None, None, None], np.float32(0))
    return {
        "same_mask_both_ways": bool(np.array_equal(mask, np.asarray(mask_again))),
        "global_bitwise_equal": bool(np.array_equal(np.asarray(y_global), expected)),
        "global_max_abs_diff": float(np.max(np.abs(np.asarray(y_global) - expected))),
        "local_scales_differ": bool(len(set(local_scales.tolist())) > 1),
        "without_axis_name_is_local": bool(np.array_equal(np.asarray(y_local), expected_local)),
        "without_axis_name_differs_from_global": bool(not np.array_equal(np.asarray(y_local), expected)),
    }


def _equal_pairs(per_device) -> list[bool]:
    return [bool(np.array_equal(per_device[i], per_device[j])) for i in range(DEVICES) for j in range(i + 1, DEVICES)]


def check_per_device_keys() -> dict:
    """Masks per device under ``shard_map`` and ``pmap``, with and without folding in the device index."""
    x = jnp.ones((8, 8, 8, 4))
    key = jax.random.key(5)

    def masks(key, x, fold):
        if fold:
            key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
        return x, block_mask(key, x.shape, 0.6, BLOCK)

    def pmapped(x, fold):
        device_key = jax.random.fold_in(key, jax.lax.axis_index(AXIS)) if fold else key
        y = drop_block(device_key, x, 0.6, BLOCK, axis_name=AXIS)
        return y, block_mask(device_key, x.shape, 0.6, BLOCK)

    results = {}
    for fold in (False, True):
        _, mask = jax.jit(_shard_map(functools.partial(masks, fold=fold)))(key, x)
        per_device = np.asarray(mask).reshape(DEVICES, 2, 8, 8, 4)
        results[f"shard_map/fold_in={fold}"] = {
            "equal_pairs": _equal_pairs(per_device),
            "kept_fraction": float(per_device.mean()),
        }
        y, mask = jax.pmap(functools.partial(pmapped, fold=fold), axis_name=AXIS)(x.reshape(DEVICES, 2, 8, 8, 4))
        mask = np.asarray(mask)
        global_scale = np.float32(mask.size) / np.float32(mask.sum())
        results[f"pmap/fold_in={fold}"] = {
            "equal_pairs": _equal_pairs(mask),
            "kept_fraction": float(mask.mean()),
            "global_bitwise_equal": bool(np.array_equal(np.asarray(y), np.where(mask, global_scale, np.float32(0)))),
        }
    return results


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = DropBlock(keep_prob=0.8, block_size=3, name="drop")(x, deterministic=not train)
        self.sow("intermediates", "dropped", x)
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Dense(4)(x.mean(axis=(1, 2)))


def check_data_parallel_training_step() -> dict:
    model = CNN()
    images = jax.random.normal(jax.random.key(6), (8, 12, 12, 3))
    labels = jnp.arange(8) % 4
    params = model.init(jax.random.key(7), images, train=False)["params"]
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, images, labels, rng):
        def loss_fn(params):
            logits, state = model.apply(
                {"params": params}, images, train=True, rngs={"dropout": rng}, mutable=["intermediates"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, state["intermediates"]["dropped"][0]

        (loss, dropped), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, dropped

    rng = jax.random.key(8)
    one = jax.devices()[0]
    single = train_step(*jax.device_put((params, opt_state, images, labels), one), rng)
    mesh = _mesh()
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    sharded = train_step(
        jax.device_put(params, replicated),
        jax.device_put(opt_state, replicated),
        jax.device_put(images, batch),
        jax.device_put(labels, batch),
        rng,
    )
    (p1, _, loss1, dropped1), (p4, _, loss4, dropped4) = single, sharded
    param_diffs = [
        float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4))
    ]
    param_steps = [
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params))
    ]
    return {
        "loss_one": float(loss1),
        "loss_sharded": float(loss4),
        "dropped_shards": len(dropped4.addressable_shards),
        "dropped_shape": list(dropped4.shape),
        "mask_bitwise_equal": bool(np.array_equal(np.asarray(dropped1) == 0, np.asarray(dropped4) == 0)),
        "dropped_fraction": float(np.mean(np.asarray(dropped1) == 0)),
        "dropped_max_abs_diff": float(np.max(np.abs(np.asarray(dropped1) - np.asarray(dropped4)))),
        "param_max_abs_diff": max(param_diffs),
        "param_min_step": min(param_steps),
        "finite": bool(
            np.isfinite(float(loss4)) and all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(p4))
        ),
    }


class _NNXNet(nnx.Module):
    """A convolution, a DropBlock and a stack of one DropBlock a device (keep_prob of shape (DEVICES,))."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.drop = db_nnx.DropBlock(keep_prob=0.9, block_size=3, rngs=rngs)
        self.stack = nnx.vmap(lambda r: db_nnx.DropBlock(keep_prob=0.9, block_size=3, rngs=r))(
            nnx.Rngs(dropout=1).split(DEVICES)
        )

    def __call__(self, x):
        return self.drop(self.conv(x))


def _keep_probs(model: _NNXNet) -> list:
    return [model.drop.keep_prob[...], model.stack.keep_prob[...]]


def _placed_net(mesh, placement: str) -> _NNXNet:
    """A fresh model whose state is put on ``mesh``: all replicated, or the stack's layers
    sharded over the devices."""
    model = _NNXNet(nnx.Rngs(0))
    state = nnx.state(model)
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
    if placement == "sharded":
        replicated["stack"] = jax.tree.map(lambda _: NamedSharding(mesh, P(AXIS)), state["stack"])
    nnx.update(model, jax.device_put(state, replicated))
    return model


def _set_keep_prob_case(mesh, placement: str, in_mesh_context: bool) -> dict:
    x = jax.device_put(jax.random.normal(jax.random.key(3), (2, 8, 8, 3)), NamedSharding(mesh, P()))
    models = {"set": _placed_net(mesh, placement), "baseline": _placed_net(mesh, placement)}
    model = models["set"]
    shardings = [kp.sharding for kp in _keep_probs(model)]
    traces = []

    @nnx.jit
    def step(model, x, value):
        traces.append(None)
        db_nnx.set_keep_prob(model, value)
        return model(x)

    # The same step without set_keep_prob: what nnx.jit compiles for the model on its own.
    baseline = nnx.jit(lambda model, x, value: model(x))

    def values_are(value):
        return all(bool((np.asarray(kp) == np.float32(value)).all()) for kp in _keep_probs(model))

    def shardings_kept():
        return all(before.is_equivalent_to(kp.sharding, kp.ndim) for before, kp in zip(shardings, _keep_probs(model)))

    with jax.set_mesh(mesh) if in_mesh_context else contextlib.nullcontext():
        count = db_nnx.set_keep_prob(model, 0.8)
        eager = {"values": values_are(0.8), "shardings_kept": shardings_kept()}
        dropped = []
        for value in (0.7, 0.6, 0.5):
            dropped.append(float(np.mean(np.asarray(step(model, x, jnp.float32(value))) == 0)))
            baseline(models["baseline"], x, jnp.float32(value))
        jitted = {"values": values_are(0.5), "shardings_kept": shardings_kept()}
    return {
        "count": count,
        "stack_sharded": not shardings[1].is_fully_replicated,
        "eager": eager,
        "jitted": jitted,
        "traces": len(traces),
        "compiles": step.jitted_fn._cache_size(),
        "baseline_compiles": baseline.jitted_fn._cache_size(),
        "dropped_fractions": dropped,
    }


def check_nnx_set_keep_prob_on_meshes() -> dict:
    """set_keep_prob eagerly and inside nnx.jit, on a model whose state lies on an Explicit
    (jax.make_mesh's default) or Auto mesh, replicated or sharded, in or out of jax.set_mesh."""
    results = {}
    for axis_type in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):
        mesh = jax.make_mesh((DEVICES,), (AXIS,), axis_types=(axis_type,))
        for placement in ("replicated", "sharded"):
            for in_mesh_context in (False, True):
                name = f"{axis_type.name}/{placement}/{'set_mesh' if in_mesh_context else 'no_mesh_context'}"
                try:
                    results[name] = _set_keep_prob_case(mesh, placement, in_mesh_context)
                except Exception:  # each case reports its own failure.
                    results[name] = {"error": traceback.format_exc()}
    return results


CHECKS = [
    check_hlo_parser_control,
    check_sharded_equals_one_device,
    check_past_2_to_the_31_units,
    check_shard_map_batch_normalization,
    check_per_device_keys,
    check_data_parallel_training_step,
    check_nnx_set_keep_prob_on_meshes,
]


def main() -> None:
    results = {"device_count": jax.device_count()}
    for check in CHECKS:
        try:
            results[check.__name__] = check()
        except Exception:  # every failure is reported to the test that owns it.
            results[check.__name__] = {"error": traceback.format_exc()}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
