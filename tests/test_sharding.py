"""Several devices: sharded jit, the collectives of the compiled program, shard_map and pmap keys.

The test session has 4 CPU devices (``jax_num_cpu_devices`` in ``conftest.py``); arrays
live on the first one unless a test shards them.
"""

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
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
    """Shardings along the non-spatial axes: the batch over 4 devices (on an Auto mesh and on an
    Explicit one, ``jax.make_mesh``'s default since jax 0.9), and batch x channels over 2 x 2."""
    batch_channels = jax.make_mesh((2, 2), ("b", "c"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    explicit = jax.make_mesh((DEVICES,), (AXIS,), axis_types=(jax.sharding.AxisType.Explicit,))
    return {
        "batch": NamedSharding(_mesh(), P(AXIS)),
        "batch_explicit": NamedSharding(explicit, P(AXIS)),
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


def test_runs_on_four_devices():
    assert jax.device_count() == DEVICES


def test_hlo_parser_sees_gathers_and_vector_all_reduces():
    mesh = _mesh()
    x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P(AXIS)))
    gather = jax.jit(lambda x: x * 2, out_shardings=NamedSharding(mesh, P()))
    vector_sum = jax.jit(lambda x: x.sum(axis=0), out_shardings=NamedSharding(mesh, P()))
    assert _collectives(gather.lower(x).compile().as_text())["forbidden"]["all-gather"] >= 1
    scalar = [_is_scalar_shape(s) for s in _collectives(vector_sum.lower(x).compile().as_text())["all_reduce_shapes"]]
    assert scalar and not any(scalar)


@pytest.fixture(scope="module")
def sharded_programs():
    """Every case on one device and sharded three ways; one program per ``normalize`` and layout (compiles are slow).

    Returns:
      ``(cases, programs)``: per ``"name/layout"``, what the sharded result is next to the
      one-device one; per ``"normalize/layout"``, the collectives of the compiled program.
    """
    key = jax.random.key(2)
    cases, programs = {}, {}
    for normalize in ("batch", "expected"):
        group = [
            (name, shape, {k: v for k, v in kwargs.items() if k != "keep_prob"})
            for name, shape, kwargs in CASES
            if kwargs["normalize"] == normalize
        ]
        keeps = tuple(jnp.asarray(kwargs["keep_prob"]) for _, _, kwargs in CASES if kwargs["normalize"] == normalize)
        xs = tuple(
            jax.random.normal(jax.random.fold_in(jax.random.key(1), i), shape) for i, (_, shape, _) in enumerate(group)
        )
        fn = _jit_cases(group)
        ys_one = fn(key, jax.device_put(xs, jax.devices()[0]), keeps)
        for layout, sharding in _layouts().items():
            sharded = jax.device_put(xs, sharding)
            ys_sharded = fn(key, sharded, keeps)
            programs[f"{normalize}/{layout}"] = _collectives(fn.lower(key, sharded, keeps).compile().as_text())
            for (name, _, _), x, y_one, y_sharded in zip(group, sharded, ys_one, ys_sharded):
                cases[f"{name}/{layout}"] = {
                    "bitwise_equal": bool(np.array_equal(np.asarray(y_one), np.asarray(y_sharded))),
                    "dropped_fraction": float(np.mean(np.asarray(y_one) == 0)),
                    "input_shards": len({str(s.index) for s in x.addressable_shards}),
                    "output_sharding_kept": bool(y_sharded.sharding.is_equivalent_to(x.sharding, x.ndim)),
                }
    return cases, programs


def test_sharded_jit_equals_one_device_bit_for_bit(sharded_programs):
    cases, _ = sharded_programs
    assert len(cases) == 27
    for name, case in cases.items():
        assert case["input_shards"] == 4, name
        assert case["bitwise_equal"], name
        assert case["output_sharding_kept"], name
        assert 0.01 < case["dropped_fraction"] < 0.5, name


def test_no_activation_sized_collectives(sharded_programs):
    _, programs = sharded_programs
    assert len(programs) == 6
    for name, program in programs.items():
        assert program["forbidden"] == {name: 0 for name in FORBIDDEN}, name


def test_expected_normalization_has_no_collective_at_all(sharded_programs):
    _, programs = sharded_programs
    for layout in ("batch", "batch_explicit", "batch_channels"):
        assert programs[f"expected/{layout}"]["all_reduce_shapes"] == [], layout


def test_batch_normalization_all_reduces_only_scalars(sharded_programs):
    _, programs = sharded_programs
    for layout in ("batch", "batch_explicit", "batch_channels"):
        shapes = programs[f"batch/{layout}"]["all_reduce_shapes"]
        # The kept counts are summed across the batch shards: an all-reduce, of scalars only.
        assert shapes, layout
        assert all(map(_is_scalar_shape, shapes)), (layout, shapes)


def test_arrays_past_2_to_the_31_units_shard_without_activation_sized_collectives():
    # Programs on a global array of 3.3e9 units, sharded, compiled (nothing allocated).
    big = (4096, 56, 56, 256)
    programs = 0
    for layout, sharding in _layouts().items():
        x = jax.ShapeDtypeStruct(big, jnp.bfloat16, sharding=sharding)
        for normalize, broadcast_dims in [("batch", ()), ("batch", (-1,)), ("expected", ())]:
            fn = jax.jit(
                lambda k, x, kp, broadcast_dims=broadcast_dims, normalize=normalize: drop_block(
                    k, x, kp, 7, broadcast_dims=broadcast_dims, normalize=normalize
                )
            )
            collectives = _collectives(fn.lower(jax.random.key(0), x, jnp.float32(0.9)).compile().as_text())
            name = f"{normalize}{broadcast_dims}/{layout}"
            scalar = [_is_scalar_shape(s) for s in collectives["all_reduce_shapes"]]
            assert not any(collectives["forbidden"].values()), (name, collectives["forbidden"])
            assert all(scalar), name
            assert bool(scalar) == (normalize == "batch"), name
            programs += 1
    assert programs == 9


def _shard_map(fn):
    return jax.shard_map(fn, mesh=_mesh(), in_specs=(P(), P(AXIS)), out_specs=(P(AXIS), P(AXIS)))


def test_shard_map_axis_name_gives_the_global_batch_normalization():
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
    np.testing.assert_array_equal(mask, np.asarray(mask_again))
    # The global "batch" normalization: kept units scaled by count / kept count over all devices.
    scale = np.float32(mask.size) / np.float32(mask.sum())
    expected = np.where(mask, x * scale, np.float32(0))
    np.testing.assert_array_equal(np.asarray(y_global), expected)
    per_device = mask.reshape(DEVICES, -1)
    local_scales = np.float32(per_device.shape[1]) / per_device.sum(axis=1).astype(np.float32)
    assert len(set(local_scales.tolist())) > 1
    expected_local = np.where(mask, x * np.repeat(local_scales, 2)[:, None, None, None], np.float32(0))
    np.testing.assert_array_equal(np.asarray(y_local), expected_local)
    assert not np.array_equal(np.asarray(y_local), expected)


def _equal_pairs(per_device) -> list[bool]:
    return [bool(np.array_equal(per_device[i], per_device[j])) for i in range(DEVICES) for j in range(i + 1, DEVICES)]


@pytest.mark.parametrize("fold", [False, True], ids=["same_key", "fold_in"])
def test_masks_repeat_across_devices_without_fold_in_and_differ_with_it_under_shard_map(fold):
    def masks(key, x):
        if fold:
            key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
        return x, block_mask(key, x.shape, 0.6, BLOCK)

    _, mask = jax.jit(_shard_map(masks))(jax.random.key(5), jnp.ones((8, 8, 8, 4)))
    per_device = np.asarray(mask).reshape(DEVICES, 2, 8, 8, 4)
    assert _equal_pairs(per_device) == [not fold] * 6
    assert 0.2 < per_device.mean() < 0.9


@pytest.mark.parametrize("fold", [False, True], ids=["same_key", "fold_in"])
def test_pmap_masks_repeat_without_fold_in_and_axis_name_gives_the_global_normalization(fold):
    key = jax.random.key(5)

    def pmapped(x):
        device_key = jax.random.fold_in(key, jax.lax.axis_index(AXIS)) if fold else key
        y = drop_block(device_key, x, 0.6, BLOCK, axis_name=AXIS)
        return y, block_mask(device_key, x.shape, 0.6, BLOCK)

    y, mask = jax.pmap(pmapped, axis_name=AXIS)(jnp.ones((DEVICES, 2, 8, 8, 4)))
    mask = np.asarray(mask)
    assert _equal_pairs(mask) == [not fold] * 6
    assert 0.2 < mask.mean() < 0.9
    global_scale = np.float32(mask.size) / np.float32(mask.sum())
    np.testing.assert_array_equal(np.asarray(y), np.where(mask, global_scale, np.float32(0)))


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = DropBlock(keep_prob=0.8, block_size=3, name="drop")(x, deterministic=not train)
        self.sow("intermediates", "dropped", x)
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Dense(4)(x.mean(axis=(1, 2)))


def test_data_parallel_training_step_matches_one_device():
    model = _CNN()
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
    p1, _, loss1, dropped1 = train_step(*jax.device_put((params, opt_state, images, labels), jax.devices()[0]), rng)
    mesh = _mesh()
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    p4, _, loss4, dropped4 = train_step(
        jax.device_put(params, replicated),
        jax.device_put(opt_state, replicated),
        jax.device_put(images, batch),
        jax.device_put(labels, batch),
        rng,
    )
    assert np.isfinite(float(loss4)) and all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(p4))
    assert len(dropped4.addressable_shards) == 4
    assert list(dropped4.shape) == [8, 12, 12, 8]
    np.testing.assert_array_equal(np.asarray(dropped1) == 0, np.asarray(dropped4) == 0)
    np.testing.assert_array_equal(np.asarray(dropped1), np.asarray(dropped4))
    # The forward pass is per sample and bit-identical; only the gradient's cross-device
    # sum is reordered, so losses and parameters agree to float32 round-off, far below
    # the parameter update itself (Adam, lr 1e-2).
    assert abs(float(loss1) - float(loss4)) <= 1e-6 * abs(float(loss1))
    leaves = zip(jax.tree.leaves(p1), jax.tree.leaves(p4), jax.tree.leaves(params))
    for one, sharded, before in leaves:
        assert float(np.max(np.abs(np.asarray(one) - np.asarray(sharded)))) <= 1e-6
        assert float(np.max(np.abs(np.asarray(one) - np.asarray(before)))) > 1e-3


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
    """A fresh model whose state is put on ``mesh``: all replicated, or the stack's layers sharded over the devices."""
    model = _NNXNet(nnx.Rngs(0))
    state = nnx.state(model)
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
    if placement == "sharded":
        replicated["stack"] = jax.tree.map(lambda _: NamedSharding(mesh, P(AXIS)), state["stack"])
    nnx.update(model, jax.device_put(state, replicated))
    return model


@pytest.mark.parametrize("in_mesh_context", [False, True], ids=["no_mesh_context", "set_mesh"])
@pytest.mark.parametrize("placement", ["replicated", "sharded"])
@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto], ids=str)
def test_nnx_set_keep_prob_on_a_mesh_keeps_each_sharding_and_compiles_nothing_new(
    axis_type, placement, in_mesh_context
):
    # set_keep_prob eagerly and inside nnx.jit, on a model whose state lies on an Explicit
    # (jax.make_mesh's default) or Auto mesh, replicated or sharded, in or out of jax.set_mesh.
    mesh = jax.make_mesh((DEVICES,), (AXIS,), axis_types=(axis_type,))
    x = jax.device_put(jax.random.normal(jax.random.key(3), (2, 8, 8, 3)), NamedSharding(mesh, P()))
    model, baseline_model = _placed_net(mesh, placement), _placed_net(mesh, placement)
    shardings = [kp.sharding for kp in _keep_probs(model)]
    assert (not shardings[1].is_fully_replicated) == (placement == "sharded")
    traces = []

    @nnx.jit
    def step(model, x, value):
        traces.append(None)
        db_nnx.set_keep_prob(model, value)
        return model(x)

    # The same step without set_keep_prob: what nnx.jit compiles for the model on its own.
    baseline = nnx.jit(lambda model, x, value: model(x))

    def assert_values_and_shardings(value):
        for before, kp in zip(shardings, _keep_probs(model)):
            assert (np.asarray(kp) == np.float32(value)).all()
            assert before.is_equivalent_to(kp.sharding, kp.ndim)

    with jax.set_mesh(mesh) if in_mesh_context else contextlib.nullcontext():
        # The plain layer and the stack made with nnx.vmap.
        assert db_nnx.set_keep_prob(model, 0.8) == 2
        assert_values_and_shardings(0.8)
        for value in (0.7, 0.6, 0.5):
            dropped = float(np.mean(np.asarray(step(model, x, jnp.float32(value))) == 0))
            # Each value reached the layer: keep_prob 0.7, 0.6, 0.5 on 8x8 maps drop some units, not all.
            assert 0.05 < dropped < 0.9, value
            baseline(baseline_model, x, jnp.float32(value))
        assert_values_and_shardings(0.5)
    assert len(traces) == 1
    assert step.jitted_fn._cache_size() == baseline.jitted_fn._cache_size()
