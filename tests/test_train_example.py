"""``examples/train.py`` on one process: a run stopped or sent SIGTERM, then resumed, is the unbroken run.

No XLA setting is needed for this on CPU: a compiled program run on the same inputs
gives the same bits (the suite's ``--xla_backend_optimization_level=0`` is not needed
either; it only shortens the compile). The three runs share one compiled step, as a
restarted process would compile the same program again.
"""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train as example
from flax import nnx
from imagenet import pod

# Steps 0..5 of a schedule 1 -> 0.7; stopped after step 3 (as if preempted), checkpoints every 2 steps.
# Runs examples/train.py: newest versions only (make test-min leaves it out).
pytestmark = pytest.mark.launches

CONFIG = example.Config(steps=6, global_batch=16, keep_prob=0.7, widths=(4, 8))
STOP = 3
SIGTERM_STEP = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    def train(folder, **kwargs):
        return example.train(CONFIG, folder, checkpoint_every=2, log=None, with_masks=True, **kwargs)

    unbroken = train(tmp_path_factory.mktemp("unbroken"))
    folder = tmp_path_factory.mktemp("preempted")
    before = train(folder, stop_after=STOP)
    after = train(folder)
    return unbroken, before, after, folder


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
    # SIGTERM arrives while step SIGTERM_STEP is logged (log_every=1), as a preemption notice
    # between two steps would: the next step finishes, is saved, and the run returns.
    folder = tmp_path_factory.mktemp("sigterm")

    def log(line):
        if line.startswith(f"step {SIGTERM_STEP:4d} "):
            os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    before = example.train(CONFIG, folder, checkpoint_every=100, log_every=1, log=log, with_masks=True)
    # The handler the run installed is gone again.
    assert signal.getsignal(signal.SIGTERM) is handler
    after = example.train(CONFIG, folder, checkpoint_every=100, log=None, with_masks=True)
    return before, after, folder


def test_a_stopped_run_checkpoints_where_it_stopped(runs):
    _, (_, before), (_, after), folder = runs
    assert len(before) == STOP
    assert len(after) == CONFIG.steps - STOP
    assert sorted(int(p.name) for p in folder.iterdir()) == [4, 6]


def test_resumed_run_ends_with_the_unbroken_runs_parameters_bit_for_bit(runs):
    (unbroken_state, _), _, (resumed_state, _), _ = runs
    assert int(resumed_state["step"]) == CONFIG.steps
    unbroken, resumed = jax.tree.leaves(unbroken_state), jax.tree.leaves(resumed_state)
    assert len(unbroken) == len(resumed) > 10
    for a, b in zip(unbroken, resumed):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_sigterm_saves_the_step_reached_and_the_rerun_ends_as_the_unbroken_run(runs, sigterm_run):
    (unbroken_state, unbroken), _, _, _ = runs
    (_, before), (resumed_state, after), folder = sigterm_run
    stopped = SIGTERM_STEP + 1
    assert len(before) == stopped
    assert len(after) == CONFIG.steps - stopped
    # The SIGTERM's checkpoint and the end's (checkpoint_every=100 saves no other).
    assert sorted(int(p.name) for p in folder.iterdir()) == [stopped, CONFIG.steps]
    assert [r["loss"] for r in before + after] == [r["loss"] for r in unbroken]
    for a, b in zip(jax.tree.leaves(unbroken_state), jax.tree.leaves(resumed_state)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_the_keep_prob_schedule_reaches_its_target_at_the_last_step(runs):
    (_, unbroken), _, _, _ = runs
    # 1 - (step / (steps - 1)) * (1 - target), written out in float32 for steps 0..5.
    steps = np.arange(CONFIG.steps, dtype=np.float32)
    expected = np.float32(1) - steps / np.float32(CONFIG.steps - 1) * (np.float32(1) - np.float32(CONFIG.keep_prob))
    assert [r["keep_prob"] for r in unbroken] == expected.tolist()
    assert unbroken[-1]["keep_prob"] == np.float32(CONFIG.keep_prob)
    assert unbroken[0]["keep_prob"] == 1.0


def test_a_one_step_run_uses_the_target():
    one_step = example.keep_prob_schedule(example.Config(steps=1, keep_prob=0.8))
    assert float(one_step(0)) == np.float32(0.8)
    # Past the last step the schedule holds the target.
    six_steps = example.keep_prob_schedule(example.Config(steps=6, keep_prob=0.8))
    assert float(six_steps(9)) == np.float32(0.8)


def test_resumed_run_draws_the_unbroken_runs_masks(runs):
    (_, unbroken), (_, before), (_, after), _ = runs
    for step, (expected, got) in enumerate(zip(unbroken, before + after)):
        assert got["keep_prob"] == expected["keep_prob"], step
        assert got["loss"] == expected["loss"], step
        assert list(got["masks"]) == list(expected["masks"]) and len(got["masks"]) == 6
        for place, mask in got["masks"].items():
            assert np.array_equal(mask, expected["masks"][place]), (step, place)
    # The masks of the schedule's later steps drop something, and differ from step to step.
    last, previous = unbroken[-1]["masks"], unbroken[-2]["masks"]
    for place, mask in last.items():
        assert 0.5 < mask.mean() < 0.99, place
        assert not np.array_equal(mask, previous[place]), place


def test_the_logged_kept_fraction_is_the_fraction_of_the_mask(runs):
    (_, unbroken), _, _, _ = runs
    for record in unbroken:
        for place, mask in record["masks"].items():
            assert record["kept_fraction"][place] == pytest.approx(mask.mean(), abs=1e-7)


def test_the_masks_are_the_ones_the_layers_apply():
    # Where a DropBlock follows a batch norm with no ReLU (drop2, the projection's
    # shortcut_drop), its output is zero exactly where its mask drops; drop2's batch norm
    # starts at zero scale, so every scale is set to one first. (Stage 0's identity
    # shortcut carries the stem's ReLU output, zero in places already.)
    graphdef, state, other = example.init_state(CONFIG)

    @jax.jit
    def outputs_and_masks(state, other, images):
        model = nnx.merge(graphdef, state["params"], state["batch_stats"], other, copy=True)
        for _, node in nnx.iter_graph(model):
            if isinstance(node, nnx.BatchNorm):
                node.scale[...] = jnp.ones_like(node.scale[...])
        model.set_stage_keep_probs(0.6)
        outputs = {}

        def capture(y, place, stages_from_last):
            outputs[example.place_label(place)] = y
            return y

        nnx.reseed(model, dropout=1)
        model(images, perturb=capture)
        nnx.reseed(model, dropout=1)
        return outputs, example.forward_with_masks(model, images)[1]

    outputs, masks = outputs_and_masks(state, other, jax.random.normal(jax.random.key(0), (4, 16, 16, 1)))
    checked = [label for label in masks if label.endswith("drop2") or label == "stage1/block0/shortcut_drop"]
    assert len(checked) == 3
    for label in checked:
        assert np.array_equal(np.asarray(outputs[label]) != 0, np.asarray(masks[label])), label
        assert 0.3 < np.asarray(masks[label]).mean() < 0.95, label


def test_each_process_reads_its_own_equal_slice():
    slices = [pod.host_records(1600, p, 3, drop_remainder=True) for p in range(3)]
    assert [(s.start, s.stop) for s in slices] == [(0, 533), (533, 1066), (1066, 1599)]
    images, labels = example.load_host_slice(1, 2, image_scale=2)
    assert images.shape == (800, 16, 16, 1) and labels.shape == (800,)
    assert -1.0 <= images.min() < images.max() <= 1.0


def test_batches_are_a_function_of_the_step():
    first = example.local_batch_indices(7, 100, 16, seed=0, process_index=1)
    again = example.local_batch_indices(7, 100, 16, seed=0, process_index=1)
    assert np.array_equal(first, again) and len(set(first.tolist())) == 16
    # One epoch (6 batches of 16 from 100 records) draws no record twice.
    epoch = np.concatenate([example.local_batch_indices(s, 100, 16, 0, 1) for s in range(6)])
    assert len(set(epoch.tolist())) == 96


def test_simulated_hosts_get_the_command_line_without_the_option_that_spawned_them():
    argv = ["--steps", "3", "--simulate-hosts", "2", "--seed=1", "--simulate-hosts=4"]
    assert pod.without_option(argv, "--simulate-hosts") == ["--steps", "3", "--seed=1"]
