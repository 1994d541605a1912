"""dropblock_jax.models.ResNet: DropBlock where the authors put it, schedules without retracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dropblock_jax.models import InferenceDropBlock, ResNet, stage_keep_prob
from dropblock_jax.nnx import DropBlock, set_keep_prob


def small(regularizer="dropblock", keep_prob=0.8, **kwargs):
    return ResNet(
        10,
        widths=(4, 8, 8),
        regularizer=regularizer,
        keep_prob=keep_prob,
        block_size=3,
        rngs=nnx.Rngs(params=0, dropout=1),
        **kwargs,
    )


def layers_of(model, kind):
    return {path: node for path, node in nnx.iter_graph(model) if isinstance(node, kind)}


def test_dropblock_sits_after_the_batch_norms_of_the_last_two_stages_and_on_their_shortcuts():
    model = small()
    names = sorted((path[1], path[-1]) for path in layers_of(model, DropBlock))
    assert names == [(1, "drop1"), (1, "drop2"), (1, "proj_drop"), (2, "drop1"), (2, "drop2"), (2, "proj_drop")]
    keep = {path[1]: float(layer.keep_prob[...]) for path, layer in layers_of(model, DropBlock).items()}
    assert keep == {1: pytest.approx(0.95), 2: pytest.approx(0.8)}


def test_stage_keep_prob_follows_the_reference_rule():
    assert float(stage_keep_prob(0.9, 0)) == pytest.approx(0.9)
    assert float(stage_keep_prob(0.9, 1)) == pytest.approx(1 - 0.1 / 4)
    assert float(stage_keep_prob(0.9, 2)) == pytest.approx(1 - 0.1 / 16)


@pytest.mark.parametrize(("regularizer", "broadcast_dims"), [("dropout", ()), ("spatial_dropout", (1, 2))])
def test_dropout_variants_take_the_same_places_with_the_same_rates(regularizer, broadcast_dims):
    model = small(regularizer)
    dropouts = layers_of(model, nnx.Dropout)
    assert sorted(path[1:] for path in dropouts) == sorted(path[1:] for path in layers_of(small(), DropBlock))
    for path, layer in dropouts.items():
        assert layer.rate == pytest.approx(0.2 if path[1] == 2 else 0.05)
        assert tuple(layer.broadcast_dims) == broadcast_dims
    assert not layers_of(small("none"), nnx.Dropout) and not layers_of(small("none"), DropBlock)


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
    with pytest.raises(ValueError, match="regularizer='dropout'"):
        small("dropout").set_stage_keep_probs(0.9)
    with pytest.raises(ValueError, match=r"keep_prob must be in \[0, 1\], got 1.5"):
        small().set_stage_keep_probs(1.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(regularizer="cutout"), "regularizer must be one of .* got 'cutout'"),
        (dict(widths=()), r"widths must be a non-empty sequence of positive ints, got \(\)"),
        (dict(widths=(4, 8), blocks=(1,)), r"blocks must give a positive int per stage \(2 stages\), got \(1,\)"),
        (dict(regularized_stages=4), r"regularized_stages must be an int in \[0, 3\].*got 4"),
        (dict(block_size=0), "block_size must be a positive int or a tuple of them, got 0"),
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


def test_inference_dropblock_acts_at_the_regularizer_places_of_every_regularizer():
    calls = []

    def record(y, place, stages_from_last):
        calls.append((place, stages_from_last, y.shape))
        return y

    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
    for regularizer in ("none", "dropout", "dropblock"):
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


def test_inference_dropblock_gives_every_regularizer_the_same_masks_and_is_off_at_keep_1():
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))

    @nnx.jit
    def forward(model, key, keep_prob):
        return model(x, perturb=InferenceDropBlock(key, keep_prob, block_size=3))

    outputs = {}
    for regularizer in ("none", "dropout", "spatial_dropout", "dropblock"):
        model = small(regularizer)  # same params: the regularizers hold none
        model.eval()
        # Compiled and op-by-op programs may round differently in the last bits; a dropped
        # block moves the logits by orders of magnitude more (checked at keep_prob 0.5).
        np.testing.assert_allclose(forward(model, jax.random.key(1), jnp.float32(1.0)), model(x), rtol=1e-5, atol=1e-6)
        outputs[regularizer] = forward(model, jax.random.key(1), jnp.float32(0.5))
        assert not np.allclose(outputs[regularizer], model(x), rtol=1e-3)
    # Each regularizer compiles its own program (same tolerance, same reason).
    for output in outputs.values():
        np.testing.assert_allclose(output, outputs["none"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(forward(model, jax.random.key(2), jnp.float32(0.5)), outputs["none"], rtol=1e-3)


def test_inference_dropblock_keeps_the_stage_ratio_unless_told_not_to():
    x = jnp.ones((64, 8, 8, 16))
    key = jax.random.key(0)
    for per_stage, expected in ((True, 1 - 0.5 / 4), (False, 0.5)):
        probe = InferenceDropBlock(key, 0.5, block_size=1, per_stage=per_stage, normalize="none")
        kept = float((probe(x, (1, 0, 0), stages_from_last=1) != 0).mean())
        assert kept == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(keep_prob=1.5), r"keep_prob must be in \[0, 1\], got 1.5"),
        (dict(block_size=0), "block_size must be a positive int or a tuple of them, got 0"),
        (dict(block_size=(3, -1)), r"block_size must be a positive int or a tuple of them, got \(3, -1\)"),
        (dict(per_stage="yes"), "per_stage must be True or False, got 'yes'"),
    ],
)
def test_inference_dropblock_refuses_bad_arguments(kwargs, message):
    args = dict(key=jax.random.key(0), keep_prob=0.9) | kwargs
    with pytest.raises(ValueError, match=message):
        InferenceDropBlock(**args)


def test_the_model_can_be_built_under_jit_and_eval_shape():
    # Pod users build models sharded inside jit; the constructor must not need concrete values.
    build = lambda: ResNet(10, widths=(4, 8), blocks=(1, 1), block_size=3, rngs=nnx.Rngs(params=0, dropout=1))  # noqa: E731
    abstract = nnx.eval_shape(build)
    assert isinstance(abstract, ResNet)
    model = nnx.jit(build)()
    assert [float(k) for k in model.keep_probs()] == pytest.approx([0.975, 0.9])
