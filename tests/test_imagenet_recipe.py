"""``examples/imagenet``'s recipe, step by step: the learning rate, weight decay, label smoothing, batch norm groups.

In this process: the learning rate at every mark of the authors' schedules (90 and 270
epochs, and runs stretched to other lengths) against their rule written out again
(``helpers.learning_rate_by_the_authors_rule``); which parameters one optimizer step
decays; the loss of ``dropblock_ls`` against a NumPy cross-entropy of smoothed labels;
and that batch norm over one group of the whole batch is the synchronized batch norm.
A narrow ResNet-18 (no DropBlock: the authors put none in basic blocks) stands in for
ResNet-50 where the property does not depend on the network. In a process of 4 CPU
devices (the session's, set in ``conftest.py``): ResNet-50 with DropBlock, its batch cut
into groups of 2 samples, one group a device, as the authors' per-core statistics.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pod
import pytest
from configs import baseline, cpu, dropblock, dropblock_ls

from helpers import imagenet_trainer, learning_rate_by_the_authors_rule

# examples/imagenet's own requirements, not the package's minimums: make test-min leaves it out.
pytestmark = pytest.mark.launches

trainer = imagenet_trainer()

IMAGENET_TRAIN_RECORDS = 1_281_167
NUM_CLASSES = 7


# ----------------------------------------------------------------------------------------
# The learning rate.


def _rule(config, steps, records):
    return {
        "records": records,
        "batch": config.global_batch_size,
        "steps": steps,
        "warmup": config.warmup_epochs,
        "decays": tuple(config.lr_decay_epochs),
        "schedule_epochs": config.lr_schedule_epochs,
        "factor": config.lr_decay_factor,
        "base": config.base_learning_rate,
    }


@pytest.mark.parametrize(
    ("schedule", "epochs", "marks"),
    [
        # The authors' 90 epochs: warm-up 5, decays at 30, 60, 80.
        ("90", 90, (5, 30, 60, 80)),
        # The paper's 270 epochs: decays at 125, 200, 250 (the warm-up stays 5 epochs of 270).
        ("270", 270, (5, 125, 200, 250)),
        # The 90-epoch schedule stretched, warm-up included: floor(5/90 * 45) = 2, ...
        ("90", 45, (2, 15, 30, 40)),
        ("90", 120, (6, 40, 80, 106)),
    ],
)
def test_the_learning_rate_changes_at_the_authors_marks_and_nowhere_else(schedule, epochs, marks):
    config = dropblock.get_config(schedule)
    config.num_epochs = float(epochs)
    records, batch = IMAGENET_TRAIN_RECORDS, config.global_batch_size
    steps = trainer.total_steps(config, records)
    assert steps == math.floor(epochs * records / batch)
    rate = trainer.learning_rate_schedule(config, records, steps)
    rule = _rule(config, steps, records)
    peak = 0.1 * batch / 256
    # The first step of each mark's epoch: where the rate changes.
    firsts = [math.ceil(mark * records / batch) for mark in marks]
    probes = sorted({0, 1, steps - 1, *firsts, *(s - 1 for s in firsts), *(s + 1 for s in firsts)})
    for step in probes:
        assert float(rate(step)) == pytest.approx(learning_rate_by_the_authors_rule(step, **rule), rel=1e-6), step
    # The levels themselves: the warm-up's end reaches the peak, each decay a tenth of the level before.
    for i, first in enumerate(firsts):
        assert float(rate(first)) == pytest.approx(peak * 0.1**i, rel=1e-6), (first, marks[i])
        before = peak * (first - 1) * batch / records / marks[0] if i == 0 else peak * 0.1 ** (i - 1)
        assert float(rate(first - 1)) == pytest.approx(before, rel=1e-6), (first, marks[i])


def test_the_270_epoch_configs_are_the_papers_schedule():
    for module in (baseline, dropblock, dropblock_ls):
        config = module.get_config("270")
        assert (config.num_epochs, config.lr_schedule_epochs) == (270, 270)
        assert tuple(config.lr_decay_epochs) == (125, 200, 250)
        assert module.get_config().num_epochs == 90
    with pytest.raises(ValueError, match=r"must be one of \('90', '270'\), got '180'"):
        baseline.get_config("180")


def test_without_warm_up_the_first_step_has_the_full_rate():
    config = dropblock.get_config()
    config.warmup_epochs = 0.0
    rate = trainer.learning_rate_schedule(config, IMAGENET_TRAIN_RECORDS, 112_602)
    assert float(rate(0)) == pytest.approx(0.4, rel=1e-6)


# ----------------------------------------------------------------------------------------
# Weight decay, label smoothing, and one batch norm group: a narrow ResNet-18 in this process.


def _small_config(base=cpu, **fields):
    config = base.get_config()
    config.update(model_depth=18, model_width=4, regularizer="none", warmup_epochs=0.0, data_dir="/unused")
    config.update(image_size=32, global_batch_size=8, batch_norm_group_size=0)
    config.update(fields)
    return config


def _batch(seed=0, size=8):
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.integers(0, 256, (size, 32, 32, 3), dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, NUM_CLASSES, size, dtype=np.int32)),
    }


def _replicated():
    # The example's own placement: its state replicated over a mesh of every device (4 here).
    return pod.data_shardings()[0]


def test_one_optimizer_step_decays_every_weight_but_the_batch_norms():
    config = _small_config()
    run = trainer.Trainer(config, NUM_CLASSES, train_records=64)
    state, _ = run.initial_state(_replicated())
    params = state["params"]
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = run.tx.update(zero, state["opt_state"], params)
    # Nesterov SGD's first step on the gradient wd * w alone: w * (1 - lr * (1 + momentum) * wd).
    lr = float(run.learning_rate(0))
    shrink = 1 - lr * (1 + config.momentum) * config.weight_decay
    leaves = jax.tree_util.tree_leaves_with_path(params)
    decayed = 0
    for (path, weight), update in zip(leaves, jax.tree.leaves(updates)):
        weight, moved = np.asarray(weight), np.asarray(weight + update)
        # The batch norms' scales and offsets are the only vectors not of the head's size
        # (NUM_CLASSES, which no layer of the network has as its width).
        is_batch_norm = weight.ndim == 1 and weight.shape[0] != NUM_CLASSES
        if is_batch_norm:
            assert np.array_equal(moved, weight), jax.tree_util.keystr(path)
        else:
            decayed += 1
            np.testing.assert_allclose(moved, weight * shrink, rtol=1e-6, err_msg=jax.tree_util.keystr(path))
    # ResNet-18: 20 convolutions, the head's kernel and bias.
    assert decayed == 22
    assert len(leaves) - decayed == 2 * 20  # a scale and an offset for each of 20 batch norms


def test_dropblock_ls_trains_on_labels_smoothed_by_0_1():
    config = _small_config(dropblock_ls)
    assert config.label_smoothing == 0.1
    run = trainer.Trainer(config, NUM_CLASSES, train_records=64)
    state, other = run.initial_state(_replicated())
    # A freshly built network predicts nearly uniformly, where smoothing changes little: spread the head's bias.
    spread = np.random.default_rng(3).normal(0, 3, NUM_CLASSES).astype(np.float32)

    def head_bias_spread(path, leaf):
        return jnp.asarray(spread) if "head" in jax.tree_util.keystr(path) and leaf.ndim == 1 else leaf

    state["params"] = jax.tree_util.tree_map_with_path(head_bias_spread, state["params"])
    batch = _batch()
    logits, _, _ = run.forward(state["params"], state, other, batch["image"])
    _, metrics = run.train_step(jax.tree.map(jnp.copy, state), other, batch)
    logits = np.asarray(logits, np.float64)
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    one_hot = np.eye(NUM_CLASSES)[np.asarray(batch["label"])]
    smoothed = one_hot * 0.9 + 0.1 / NUM_CLASSES
    expected = -(smoothed * log_probs).sum(1).mean()
    unsmoothed = -(one_hot * log_probs).sum(1).mean()
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    assert abs(expected - unsmoothed) > 0.05


def test_one_group_of_the_whole_batch_is_the_synchronized_batch_norm():
    batch = _batch(1)
    results = []
    for group_size in (0, 8):
        run = trainer.Trainer(_small_config(batch_norm_group_size=group_size), NUM_CLASSES, train_records=64)
        state, other = run.initial_state(_replicated())
        results.append(jax.device_get(run.forward(state["params"], state, other, batch["image"])[:2]))
    (logits_0, stats_0), (logits_8, stats_8) = results
    assert np.array_equal(logits_0, logits_8)
    for a, b in zip(jax.tree.leaves(stats_0), jax.tree.leaves(stats_8)):
        assert np.array_equal(a, b)


def test_groups_of_two_normalize_each_pair_by_its_own_statistics():
    # The training-mode output of a sample changes with its group's other sample only.
    run = trainer.Trainer(_small_config(batch_norm_group_size=2), NUM_CLASSES, train_records=64)
    state, other = run.initial_state(_replicated())
    images = np.asarray(_batch(2)["image"])
    changed = images.copy()
    changed[3] = 255 - changed[3]  # the second sample of group 1
    a, b = (np.asarray(run.forward(state["params"], state, other, jnp.asarray(x))[0]) for x in (images, changed))
    same = np.all(a == b, axis=1)
    assert same.tolist() == [True, True, False, False, True, True, True, True]


def test_the_running_averages_are_the_mean_of_the_groups_updates():
    grouped = trainer.Trainer(_small_config(batch_norm_group_size=2), NUM_CLASSES, train_records=64)
    state, other = grouped.initial_state(_replicated())
    images = np.asarray(_batch(4)["image"])
    _, stats, _ = grouped.forward(state["params"], state, other, jnp.asarray(images))
    # Each pair alone, as a batch of 2 normalized over itself.
    alone = trainer.Trainer(_small_config(global_batch_size=2), NUM_CLASSES, train_records=64)
    updates = [alone.forward(state["params"], state, other, jnp.asarray(images[i : i + 2]))[1] for i in range(0, 8, 2)]
    for combined, *each in zip(jax.tree.leaves(stats), *map(jax.tree.leaves, updates)):
        np.testing.assert_allclose(combined, np.mean(each, axis=0), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------
# Groups on devices: ResNet-50 with DropBlock on the session's 4 CPU devices.

MOVING = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter", "ragged-all-to-all")


def _collectives(hlo):
    """The lines that move data between devices, and the element counts of every all-reduced array."""
    moving, reduced = [], []
    for line in hlo.splitlines():
        if any(f" {op}(" in line or f" {op}-start(" in line for op in MOVING):
            moving.append(line.strip())
        match = re.search(r"=\s*(.*?)\sall-reduce(?:-start)?\(", line)
        if match:
            for dims in re.findall(r"\[([\d,]*)\]", match.group(1)):
                reduced.append(int(np.prod([int(d) for d in dims.split(",") if d])))
    return {"moving": moving, "all_reduce_elements": reduced}


@pytest.fixture(scope="module")
def groups_on_devices():
    """``configs/cpu.py`` at width 4, a global batch of 8 cut into groups of 2, one group a device.

    The logits of a base batch; of the batch with group 1's samples replaced; of groups 0
    and 1 given the same images, at a step that drops and at step 0, which keeps
    everything; and the collectives of the compiled pass.
    """
    assert jax.device_count() == 4, jax.devices()
    config = cpu.get_config()
    config.update(model_width=4, keep_prob=0.5, num_train_steps=2, batch_norm_group_size=2, data_dir="/unused")
    run = trainer.Trainer(config, num_classes=NUM_CLASSES, train_records=64)
    replicated, batched = pod.data_shardings()
    state, other = run.initial_state(replicated)
    # Step 1, the last of 2: keep_prob 0.5 in group 4; step 0: keep_prob 1.
    dropping = dict(state, step=jax.device_put(jnp.int32(1), replicated))
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)

    def logits(batch_images, at=dropping):
        return np.asarray(run.forward(at["params"], at, other, jax.device_put(batch_images, batched))[0])

    changed = images.copy()
    changed[2:4] = 255 - changed[2:4]
    alike = images.copy()
    alike[2:4] = images[0:2]
    hlo = run.forward.lower(dropping["params"], dropping, other, jax.device_put(images, batched)).compile().as_text()
    return {
        "base": logits(images),
        "group1_changed": logits(changed),
        "groups01_alike": logits(alike),
        "groups01_alike_kept": logits(alike, at=state),
        "collectives": _collectives(hlo),
        "widest_channels": max(int(np.size(leaf)) for leaf in jax.tree.leaves(state["batch_stats"])),
    }


def test_each_group_is_normalized_alone_on_its_device(groups_on_devices):
    base, changed = groups_on_devices["base"], groups_on_devices["group1_changed"]
    same = np.all(base == changed, axis=1)
    # Samples 2 and 3 (group 1) were replaced: only their logits move, bit for bit.
    assert same.tolist() == [True, True, False, False, True, True, True, True]


def test_each_group_draws_its_own_dropblock_masks(groups_on_devices):
    # Groups 0 and 1 given the same two images: the same statistics, other masks.
    twins = groups_on_devices["groups01_alike"]
    assert not np.array_equal(twins[0:2], twins[2:4])
    # With DropBlock off (keep_prob 1), the same images give the same logits.
    assert np.array_equal(groups_on_devices["groups01_alike_kept"][0:2], groups_on_devices["groups01_alike_kept"][2:4])


def test_groups_on_their_devices_move_no_activation_between_devices(groups_on_devices):
    # One group a device: the compiled forward pass moves nothing between devices but the
    # batch statistics' mean (an all-reduce of each batch norm's channels).
    collectives = groups_on_devices["collectives"]
    assert collectives["moving"] == [], collectives["moving"]
    assert collectives["all_reduce_elements"], "the running averages must be combined across groups"
    assert max(collectives["all_reduce_elements"]) <= groups_on_devices["widest_channels"]
