"""dropblock_jax.models.ResNet: DropBlock where the authors put it, schedules without retracing."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import ClosedJaxpr, Jaxpr

from dropblock_jax.models import BLOCKS, ResNet, resnet, stage_keep_prob
from dropblock_jax.nnx import DropBlock, set_keep_prob
from helpers import layers_of, randomize_resnet_variables, reference_conv, reference_resnet_logits
from helpers import small_resnet as small


def dropout(keep_prob, rngs):
    """A regularizer other than DropBlock: nnx.Dropout at the same places."""
    return nnx.Dropout(1.0 - keep_prob, rngs=rngs)


def test_dropblock_sits_after_the_batch_norms_of_the_last_two_stages_and_on_their_shortcuts():
    model = small()
    # (stage, place): places 0 and 1 follow the two branch layers, place 2 is the shortcut's.
    places = sorted((path[1], path[-1]) for path in layers_of(model, DropBlock))
    assert places == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    keep = {path[1]: float(layer.keep_prob[...]) for path, layer in layers_of(model, DropBlock).items()}
    assert keep == {1: pytest.approx(0.95), 2: pytest.approx(0.8)}


def test_stage_keep_prob_follows_the_reference_rule():
    assert float(stage_keep_prob(0.9, 0)) == pytest.approx(0.9)
    assert float(stage_keep_prob(0.9, 1)) == pytest.approx(1 - 0.1 / 4)
    assert float(stage_keep_prob(0.9, 2)) == pytest.approx(1 - 0.1 / 16)


def test_train_draws_new_masks_and_eval_is_deterministic():
    model = small(keep_prob=0.5)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))
    assert model(x).shape == (4, 10)
    assert not np.array_equal(model(x), model(x))
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))


def test_set_stage_keep_probs_keeps_the_stage_ratio_and_never_retraces():
    model = small(keep_prob=1.0)
    traces = []

    @nnx.jit
    def forward(model, x, keep_prob):
        traces.append(None)
        model.set_stage_keep_probs(keep_prob)
        return model(x)

    x = jnp.ones((2, 16, 16, 1))
    for keep in np.linspace(1.0, 0.7, 4, dtype=np.float32):
        forward(model, x, keep)
    assert len(traces) == 1
    assert [float(k) for k in model.keep_probs()] == pytest.approx([1 - 0.3 / 4, 0.7])
    # Two stages of one block each, three places a block (two branch norms and the shortcut's).
    assert model.set_stage_keep_probs(0.9) == 6
    assert [float(k) for k in model.keep_probs()] == pytest.approx([0.975, 0.9])


def test_set_keep_prob_and_set_stage_keep_probs_mean_different_things():
    model = small(keep_prob=1.0)
    assert set_keep_prob(model, 0.9) == 6  # every layer gets the one value
    assert [float(k) for k in model.keep_probs()] == pytest.approx([0.9, 0.9])
    assert not hasattr(model, "set_keep_prob")


def test_set_stage_keep_probs_refuses_models_without_dropblock():
    with pytest.raises(ValueError, match="the regularized stages of this ResNet hold none"):
        small(dropout).set_stage_keep_probs(0.9)
    with pytest.raises(ValueError, match=r"keep_prob must be in \[0, 1\], got 1.5"):
        small().set_stage_keep_probs(1.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(regularizer="cutout"), "regularizer must be one of .* got 'cutout'"),
        (dict(widths=()), r"widths must be a non-empty tuple of ints >= 1, got \(\)"),
        (dict(widths=(4, 8), blocks=(1,)), r"blocks must be a tuple of 2 ints >= 1 \(one per stage\), got \(1,\)"),
        (dict(regularized_stages=4), r"regularized_stages must be an int in \[0, 3\].*got 4"),
        (dict(block_size=0), "block_size entries must be >= 1, got 0"),
        (dict(keep_prob=1.2), r"keep_prob must be in \[0, 1\], got 1.2"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_value(kwargs, message):
    args = dict(widths=(4, 8, 8), blocks=(1, 1, 1))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ResNet(10, rngs=nnx.Rngs(0), **args)


def test_regularized_stages_moves_the_layers():
    model = small(regularized_stages=1)
    assert {path[1] for path in layers_of(model, DropBlock)} == {2}
    assert [float(k) for k in model.keep_probs()] == pytest.approx([0.8])


def test_the_perturb_hook_sees_every_place_of_the_regularized_stages_whatever_the_regularizer():
    calls = []

    def record(y, place, stages_from_last):
        calls.append((place, stages_from_last, y.shape))
        return y

    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
    for regularizer in ("none", dropout, "dropblock"):
        calls.clear()
        model = small(regularizer)
        model.eval()
        np.testing.assert_array_equal(model(x, perturb=record), model(x))
        assert sorted(calls) == [((1, 0, p), 1, (2, 8, 8, 8)) for p in range(3)] + [
            ((2, 0, p), 0, (2, 4, 4, 8)) for p in range(3)
        ]
    calls.clear()
    small(regularized_stages=0)(x, perturb=record)
    assert calls == []


def _record_calls(monkeypatch, kinds):
    """Records each call of a module of ``kinds``: (kind, module, input, output)."""
    calls = []
    for kind in kinds:

        def recording(self, x, *args, _call=kind.__call__, **kwargs):
            y = _call(self, x, *args, **kwargs)
            calls.append((type(self), self, np.asarray(x), np.asarray(y)))
            return y

        monkeypatch.setattr(kind, "__call__", recording)
    return calls


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_a_block_applies_each_branch_layer_then_its_place_and_the_shortcut_last(monkeypatch, kind):
    # One projection block (stride 2) of a regularized last stage, seen through the calls of
    # its layers: convolution, batch norm, the place (ReLU between them but after the last
    # branch layer), the next convolution on what the place gave, then the projection
    # and the shortcut's place.
    model = ResNet(10, widths=(4, 8), blocks=(1, 1), block=kind, keep_prob=0.5, block_size=2, rngs=nnx.Rngs(0))
    block = model.stages[1][0]
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, model.stages[0][0].convs[-1].out_features))
    calls = _record_calls(monkeypatch, (nnx.Conv, nnx.BatchNorm, DropBlock))
    y = block(x)
    depth = len(BLOCKS[kind])
    assert [call[0] for call in calls] == [nnx.Conv, nnx.BatchNorm, DropBlock] * (depth + 1)
    assert [call[1] for call in calls[::3]] == [*block.convs, block.projection.layers[0]]
    assert [call[1] for call in calls[2::3]] == list(block.regularizers)
    inputs = [x] + [calls[3 * i + 2][3] for i in range(depth - 1)] + [x]
    for i in range(depth + 1):
        (_, _, conv_in, conv_out), (_, _, norm_in, norm_out), (_, _, place_in, _) = calls[3 * i : 3 * i + 3]
        np.testing.assert_array_equal(conv_in, inputs[i])
        np.testing.assert_array_equal(norm_in, conv_out)
        relu = i < depth - 1  # every branch layer but the last; not the shortcut
        np.testing.assert_array_equal(place_in, np.maximum(norm_out, 0) if relu else norm_out)
    branch, shortcut = calls[3 * depth - 1][3], calls[-1][3]
    np.testing.assert_array_equal(y, np.maximum(branch + shortcut, 0))


def test_numpy_ints_are_ints_and_a_wrong_type_is_a_type_error():
    ints = dict(widths=(np.int64(4), 8), blocks=[np.int32(1), 1], regularized_stages=np.int8(1))
    model = ResNet(10, **ints, rngs=nnx.Rngs(0))
    assert [float(k) for k in model.keep_probs()] == pytest.approx([0.9])
    for kwargs, message in [
        (dict(widths=(4.0, 8)), r"widths must be a non-empty tuple of ints >= 1, got \(4.0, 8\)"),
        (dict(regularized_stages="1"), r"regularized_stages must be an int in \[0, 2\]"),
        (dict(block_size=2.5), "block_size must be an int or a non-empty tuple of ints, got 2.5"),
    ]:
        with pytest.raises(TypeError, match=message):
            ResNet(10, **(dict(widths=(4, 8), blocks=(1, 1)) | kwargs), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"base_width must be an int >= 1, got 8\.0"):
        resnet(18, base_width=8.0, rngs=nnx.Rngs(0))


def test_the_model_can_be_built_under_jit_and_eval_shape():
    # Pod users build models sharded inside jit; the constructor must not need concrete values.
    build = lambda: ResNet(10, widths=(4, 8), blocks=(1, 1), block_size=3, rngs=nnx.Rngs(params=0, dropout=1))  # noqa: E731
    abstract = nnx.eval_shape(build)
    assert isinstance(abstract, ResNet)
    model = nnx.jit(build)()
    assert [float(k) for k in model.keep_probs()] == pytest.approx([0.975, 0.9])


# ----------------------------------------------------------------------------------------
# resnet(): the authors' ImageNet networks.

# Parameter counts of torchvision's ResNets (torchvision.models.resnetXX().parameters()),
# which have the same layers and batch norms as the authors' TPU ResNet, but for the
# projection the TPU code gives the first block of group 1 at depths 18 and 34.
# (101: 44,549,160 and 152: 60,192,808 too; not built here, for time.)
TORCHVISION_PARAMETERS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032}


@pytest.fixture(scope="module")
def built_resnet50():
    """One narrow ResNet-50 with parameters (building one takes seconds); tests take clones."""
    return resnet(50, 10, base_width=4, keep_prob=1.0, dtype=jnp.bfloat16, rngs=nnx.Rngs(params=0, dropout=1))


def abstract_resnet(depth, **kwargs):
    return nnx.eval_shape(lambda: resnet(depth, rngs=nnx.Rngs(params=0, dropout=1), **kwargs))


def parameter_count(model):
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("depth", sorted(TORCHVISION_PARAMETERS))
def test_resnet_has_torchvisions_parameter_count(depth):
    assert parameter_count(abstract_resnet(depth)) == TORCHVISION_PARAMETERS[depth]


def resnet50_parameters_by_hand(num_classes=1000, width=64):
    """ResNet-50 counted layer by layer: convolutions without bias, batch norms with scale and bias."""
    count = 7 * 7 * 3 * width + 2 * width  # stem convolution and batch norm
    features = width
    for group, blocks in enumerate((3, 4, 6, 3)):
        inner = width * 2**group
        for block in range(blocks):
            count += features * inner + 2 * inner  # 1x1
            count += 9 * inner * inner + 2 * inner  # 3x3
            count += inner * 4 * inner + 2 * 4 * inner  # 1x1 expansion
            if block == 0:
                count += features * 4 * inner + 2 * 4 * inner  # projection shortcut
            features = 4 * inner
    return count + features * num_classes + num_classes


def test_resnet50_parameters_are_the_layers_counted_by_hand_at_any_width_and_class_count():
    assert resnet50_parameters_by_hand() == 25_557_032
    model = abstract_resnet(50, num_classes=10, base_width=8)
    assert parameter_count(model) == resnet50_parameters_by_hand(10, 8)


def dropblocks_by_group(model):
    groups = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, DropBlock):
            groups.setdefault(path[1], []).append((path[2], path[-1]))
    return groups


def test_resnet50_has_dropblock_at_the_authors_36_places_with_the_group_keep_probs(built_resnet50):
    model = nnx.clone(built_resnet50)
    groups = dropblocks_by_group(model)
    # Groups 3 and 4 (stages 2 and 3): every block's three branch norms (places 0, 1, 2)
    # and its shortcut (place 3).
    assert sorted(groups) == [2, 3]
    assert sorted(groups[2]) == [(b, p) for b in range(6) for p in range(4)]
    assert sorted(groups[3]) == [(b, p) for b in range(3) for p in range(4)]
    assert model.set_stage_keep_probs(0.9) == 36
    keeps = {path[1]: float(node.keep_prob[...]) for path, node in nnx.iter_graph(model) if isinstance(node, DropBlock)}
    assert keeps == {2: pytest.approx(1 - 0.1 / 4), 3: pytest.approx(0.9)}
    assert [float(k) for k in model.keep_probs()] == pytest.approx([0.975, 0.9])


def test_projection_only_shortcuts_leave_the_29_places_of_the_earlier_placement():
    model = abstract_resnet(50, regularized_shortcuts="projection")
    groups = dropblocks_by_group(model)
    assert sum(len(places) for places in groups.values()) == 29
    assert [b for b, p in groups[2] + groups[3] if p == 3] == [0, 0]
    with pytest.raises(ValueError, match=r"regularized_shortcuts must be one of \('all', 'projection'\), got 'some'"):
        abstract_resnet(50, regularized_shortcuts="some")


def test_another_regularizer_takes_the_36_places_and_none_takes_none():
    dropouts = layers_of(abstract_resnet(50, regularizer=dropout), nnx.Dropout)
    assert len(dropouts) == 36
    assert {path[1]: layer.rate for path, layer in dropouts.items()} == {2: pytest.approx(0.025), 3: pytest.approx(0.1)}
    baseline = abstract_resnet(50, regularizer="none")
    assert not layers_of(baseline, DropBlock) and not layers_of(baseline, nnx.Dropout)
    assert parameter_count(baseline) == 25_557_032


def places_seen(model, images):
    """(place, shape, dtype) at every regularizer place, in train mode, and the logits' type, traced only."""
    seen = []

    def record(y, place, stages_from_last):
        seen.append((place, y.shape, y.dtype))
        return y

    graphdef, state = nnx.split(model)

    def forward(state, images):
        return nnx.merge(graphdef, state)(images, perturb=record)

    logits = jax.eval_shape(forward, state, images)
    return seen, logits


def test_at_224_pixels_the_places_see_28x28_once_14x14_24_times_and_7x7_11_times_in_bfloat16():
    model = abstract_resnet(50, dtype=jnp.bfloat16)
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    seen, logits = places_seen(model, images)
    sizes = [shape[1:3] for _, shape, _ in seen]
    assert len(seen) == 36
    assert {size: sizes.count(size) for size in set(sizes)} == {(28, 28): 1, (14, 14): 24, (7, 7): 11}
    # v1.5: the first block of group 3 drops its 1x1 output before the strided 3x3 convolution.
    assert [place for place, shape, _ in seen if shape[1] == 28] == [(2, 0, 0)]
    assert {dtype for _, _, dtype in seen} == {jnp.dtype(jnp.bfloat16)}
    assert (logits.shape, logits.dtype) == ((2, 1000), jnp.float32)
    # Parameters and batch statistics stay float32.
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param, nnx.BatchStat))}
    assert dtypes == {jnp.dtype(jnp.float32)}


def test_float32_is_the_default_computation_and_the_input_dtype_decides_without_dtype():
    seen, logits = places_seen(abstract_resnet(50, base_width=4), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    assert {dtype for _, _, dtype in seen} == {jnp.dtype(jnp.float32)} and logits.dtype == jnp.float32


def test_the_stem_halves_twice_and_the_first_block_of_groups_2_to_4_halves_again():
    seen, _ = places_seen(resnet(50, 10, base_width=4, regularizer="none", rngs=nnx.Rngs(0)), jnp.ones((1, 64, 64, 3)))
    assert {place: shape[1] for place, shape, _ in seen if place[1] == 0} == {
        (2, 0, 0): 8,
        (2, 0, 1): 4,
        (2, 0, 2): 4,
        (2, 0, 3): 4,
        (3, 0, 0): 4,
        (3, 0, 1): 2,
        (3, 0, 2): 2,
        (3, 0, 3): 2,
    }


def test_the_last_batch_norm_of_every_block_starts_at_zero_scale_and_the_head_is_small(built_resnet50):
    model = nnx.clone(built_resnet50)
    for stage in model.stages:
        for block in stage:
            np.testing.assert_array_equal(block.norms[2].scale[...], 0.0)
            np.testing.assert_array_equal(block.norms[0].scale[...], 1.0)
            assert (block.norms[0].momentum, block.norms[0].epsilon) == (0.9, 1e-5)
    # N(0, 0.01): 320 weights, std within a few standard errors of 0.01.
    assert float(jnp.std(model.head.kernel[...])) == pytest.approx(0.01, rel=0.25)


def test_a_traced_schedule_traces_the_resnet50_step_once_and_eval_is_deterministic(built_resnet50):
    model = nnx.clone(built_resnet50)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    traces = []

    @nnx.jit
    def forward(model, keep_prob):
        traces.append(None)
        model.set_stage_keep_probs(keep_prob)
        return model(images)

    train = [forward(model, keep) for keep in np.linspace(1.0, 0.9, 5, dtype=np.float32)]
    assert len(traces) == 1
    assert [float(k) for k in model.keep_probs()] == pytest.approx([0.975, 0.9])
    assert not np.array_equal(train[-1], forward(model, np.float32(0.9)))  # new masks each call
    model.eval()
    first = forward(model, np.float32(0.5))
    np.testing.assert_array_equal(first, forward(model, np.float32(0.5)))
    assert first.dtype == jnp.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(depth=42), r"depth must be one of \(18, 34, 50, 101, 152, 200\), got 42"),
        (dict(depth=50, base_width=0), "base_width must be an int >= 1, got 0"),
        (dict(depth=50, regularizer="cutout"), "regularizer must be one of .* got 'cutout'"),
        (dict(depth=50, keep_prob=-0.1), r"keep_prob must be in \[0, 1\], got -0.1"),
    ],
)
def test_resnet_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resnet(**kwargs, rngs=nnx.Rngs(0))


def test_the_bfloat16_resnet50_train_step_exports_for_tpu_and_cuda_without_host_callbacks():
    import optax

    model = abstract_resnet(50, dtype=jnp.bfloat16)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)

    def train_step(params, rest, opt_state, images, labels, keep_prob):
        def loss_fn(params):
            model = nnx.merge(graphdef, params, rest, copy=True)
            model.set_stage_keep_probs(keep_prob)
            logits = model(images)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, nnx.state(model, ...)

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    opt_state = jax.eval_shape(tx.init, params)
    args = (
        params,
        rest,
        opt_state,
        jax.ShapeDtypeStruct((8, 224, 224, 3), jnp.bfloat16),
        jax.ShapeDtypeStruct((8,), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.float32),
    )
    exported = jax.export.export(jax.jit(train_step), platforms=["tpu", "cuda"])(*args)
    assert exported.platforms == ("tpu", "cuda")
    text = exported.mlir_module()
    assert "stablehlo.convolution" in text and "bf16" in text
    # A host callback lowers to a custom call (or to send/recv on TPU); the step needs none.
    custom_calls = set(re.findall(r"stablehlo\.custom_call @(\w+)", text))
    assert custom_calls <= {"Sharding"}, custom_calls
    assert "stablehlo.send" not in text and "stablehlo.recv" not in text
    new_params = exported.out_avals[: len(jax.tree.leaves(params))]
    assert {aval.dtype for aval in new_params} == {jnp.dtype(jnp.float32)}


def test_every_convolution_pads_as_the_authors_fixed_padding_whatever_its_stride():
    # conv2d_fixed_padding: (k - 1) // 2 before and k // 2 after; "SAME" would pad a strided
    # 3x3 convolution (0, 1) on an even map.
    model = abstract_resnet(50, base_width=4)
    convs = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Conv)]
    assert len(convs) == 53  # the stem, 16 blocks of three, 4 projections
    for conv in convs:
        assert [tuple(p) for p in conv.padding] == [((k - 1) // 2, k // 2) for k in conv.kernel_size]
    assert {tuple(conv.kernel_size) for conv in convs if conv.strides == 2} == {(7, 7), (3, 3), (1, 1)}


def test_the_stem_max_pool_is_3x3_stride_2_with_tensorflows_same_padding():
    model = abstract_resnet(50, base_width=4)
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x))(
        state, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    )
    pools = [e.params for e in jaxpr.jaxpr.eqns if e.primitive.name == "reduce_window_max"]
    # SAME at 112 -> 56: one row and column of padding, after.
    assert [(p["window_dimensions"], p["window_strides"], p["padding"]) for p in pools] == [
        ((1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (0, 1), (0, 1), (0, 0)))
    ]


def test_the_graphdef_is_hashable_so_it_can_be_a_static_jit_argument():
    model = resnet(18, 10, base_width=4, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(model)
    assert jax.jit(lambda x, g: x, static_argnums=1)(1.0, graphdef) == 1.0
    assert hash(graphdef) == hash(nnx.split(resnet(18, 10, base_width=4, rngs=nnx.Rngs(1)))[0])


# ----------------------------------------------------------------------------------------
# The function, not only the structure: logits against a float64 reference of the authors'
# network, the initial values of every batch norm, the dtype policy, the momentum.


@pytest.fixture(scope="module", params=[18, 50])
def float32_resnet(request):
    """A narrow float32 ResNet-18 and ResNet-50 with parameters, DropBlock at keep_prob 0.5; tests take clones."""
    model = resnet(request.param, 10, base_width=4, keep_prob=0.5, rngs=nnx.Rngs(params=0, dropout=1))
    return request.param, model


def test_eval_logits_are_the_authors_resnet_computed_in_float64_from_the_same_variables(float32_resnet):
    depth, model = float32_resnet
    model = nnx.clone(model)
    randomize_resnet_variables(model, seed=depth)
    model.eval()  # batch norm on the running statistics, DropBlock off
    variables = nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    logits = np.asarray(model(images))
    expected = reference_resnet_logits(variables, images, depth)
    assert logits.dtype == np.float32 and logits.shape == expected.shape == (2, 10)
    # float32 rounds each product and partial sum to 2**-24 relative; over some fifty layers,
    # each a sum of at most a few hundred products, the rounding stays orders of magnitude
    # below 1e-4 of the logits' scale, where a layer added, dropped or moved changes them by
    # a fraction of order one.
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_every_blocks_last_batch_norm_of_both_kinds_starts_at_zero_scale_and_every_other_at_identity(float32_resnet):
    depth, model = float32_resnet
    last_index = {18: 1, 50: 2}[depth]  # two 3x3 convolutions, or 1x1-3x3-1x1
    blocks = {18: 8, 50: 16}[depth]
    norms = {path: node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.BatchNorm)}
    last = {path for path in norms if path[-2:] == ("norms", last_index)}
    assert len(last) == blocks
    for path, norm in norms.items():
        np.testing.assert_array_equal(norm.scale[...], 0.0 if path in last else 1.0, err_msg=str(path))
        np.testing.assert_array_equal(norm.bias[...], 0.0, err_msg=str(path))
        np.testing.assert_array_equal(norm.mean[...], 0.0, err_msg=str(path))
        np.testing.assert_array_equal(norm.var[...], 1.0, err_msg=str(path))
    # So every block starts as its shortcut: at initialization in eval mode an identity block
    # passes its input, relu(0 + x) = x for the nonnegative x a block receives.
    model = nnx.clone(model)
    model.eval()
    block = model.stages[0][1]
    x = jax.nn.relu(jax.random.normal(jax.random.key(1), (2, 8, 8, block.convs[0].in_features)))
    np.testing.assert_array_equal(block(x), x)


def _equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in its equations."""
    for equation in jaxpr.eqns:
        yield equation
        for value in equation.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(inner, ClosedJaxpr):
                    yield from _equations(inner.jaxpr)
                elif isinstance(inner, Jaxpr):
                    yield from _equations(inner)


@pytest.mark.parametrize("train", [True, False])
def test_under_bfloat16_every_convolution_and_the_head_compute_in_bfloat16_on_float32_variables(train):
    model = abstract_resnet(50, num_classes=10, base_width=4, dtype=jnp.bfloat16)
    if not train:
        model.eval()
    graphdef, state = nnx.split(model)
    closed = jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x))(
        state, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    )
    equations = list(_equations(closed.jaxpr))
    products = [e for e in equations if e.primitive.name in ("conv_general_dilated", "dot_general")]
    # The stem, 16 blocks of three, 4 projections, and the head.
    assert [e.primitive.name for e in products].count("conv_general_dilated") == 53
    assert [e.primitive.name for e in products][-1] == "dot_general"
    assert [e.primitive.name for e in products].count("dot_general") == 1
    bf16 = jnp.dtype(jnp.bfloat16)
    for e in products:
        dtypes = [v.aval.dtype for v in (*e.invars, *e.outvars)]
        assert dtypes == [bf16] * len(dtypes), (e.primitive.name, dtypes)
    # The logits come back in float32, for the loss.
    assert closed.out_avals[0].dtype == jnp.float32


def test_bn_momentum_reaches_every_batch_norm_and_moves_its_statistics_by_the_authors_rule():
    # One training-mode step from the initial statistics (mean 0, variance 1):
    # new = momentum * old + (1 - momentum) * batch statistic. Train mode normalizes with the
    # batch's own statistics, so two momenta see the same batch statistics at every norm.
    images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3)) + 0.5
    moved = {}
    for momentum in (0.5, 0.8):
        model = ResNet(
            10,
            in_features=3,
            widths=(4, 8),
            blocks=(2, 1),
            block="bottleneck",
            stem="imagenet",
            regularizer="none",
            bn_momentum=momentum,
            rngs=nnx.Rngs(0),
        )
        model(images)
        norms = {path: node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.BatchNorm)}
        moved[momentum] = {
            path: (
                (np.asarray(norm.mean[...], np.float64) - momentum * 0.0) / (1 - momentum),
                (np.asarray(norm.var[...], np.float64) - momentum * 1.0) / (1 - momentum),
            )
            for path, norm in norms.items()
        }
    # The stem, three norms in each of 3 blocks, 2 projections.
    assert len(moved[0.5]) == 12 and moved[0.5].keys() == moved[0.8].keys()
    for path, (mean, var) in moved[0.5].items():
        np.testing.assert_allclose(mean, moved[0.8][path][0], rtol=1e-4, atol=1e-5, err_msg=str(path))
        np.testing.assert_allclose(var, moved[0.8][path][1], rtol=1e-4, atol=1e-5, err_msg=str(path))
        assert np.abs(mean).max() > 1e-3 and np.abs(var - 1).max() > 1e-3, path
    # The stem's batch statistics, written out: its convolution's output over N, H and W.
    stem = reference_conv(np.asarray(images, np.float64), np.asarray(model.stem.kernel[...], np.float64), 2)
    np.testing.assert_allclose(moved[0.5][("stem_bn",)][0], stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(moved[0.5][("stem_bn",)][1], stem.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
