"""dropblock_jax.linear_keep_prob_schedule: the paper's linear keep_prob schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dropblock_jax as db

KEEP_PROBS = [0.0, 1e-7, 0.1, 1 / 3, 0.5, 0.75, 0.8, 0.9, 0.999, 1.0]
TOTAL_STEPS = [1, 2, 3, 7, 12, 1001]


def by_hand(keep_prob, total_steps, step):
    """``1 - (step / last) * (1 - keep_prob)`` in float64, the step clipped to 0 .. last = total_steps - 1."""
    last = total_steps - 1
    if last == 0:
        return keep_prob
    return 1.0 - (min(max(step, 0), last) / last) * (1.0 - keep_prob)


@pytest.mark.parametrize("total_steps", TOTAL_STEPS)
@pytest.mark.parametrize("keep_prob", KEEP_PROBS)
def test_the_schedule_falls_linearly_from_one_to_the_target_at_the_last_step(keep_prob, total_steps):
    schedule = db.linear_keep_prob_schedule(keep_prob, total_steps)
    last = total_steps - 1
    steps = sorted({-3, -1, 0, 1, last // 3, last // 2, last - 1, last, last + 1, last + 100})
    values = np.asarray(schedule(jnp.asarray(steps)))
    assert values.dtype == np.float32 and values.shape == (len(steps),)
    # float32 rounding of a handful of operations on numbers of at most 1.
    np.testing.assert_allclose(values, [by_hand(keep_prob, total_steps, s) for s in steps], rtol=0, atol=4e-7)
    # The ends are exact: every run starts at 1 (unless it is one step long) and ends at the target.
    assert float(schedule(0)) == (1.0 if total_steps > 1 else np.float32(keep_prob))
    assert np.float32(schedule(last)) == np.float32(keep_prob)
    assert np.float32(schedule(last + 1000)) == np.float32(keep_prob)


def test_a_one_step_run_trains_at_the_target():
    schedule = db.linear_keep_prob_schedule(0.8, 1)
    np.testing.assert_array_equal(schedule(jnp.arange(3)), np.full(3, 0.8, np.float32))
    assert float(schedule(0)) == np.float32(0.8)


def test_a_traced_step_compiles_once_and_gives_the_eager_bits():
    schedule = db.linear_keep_prob_schedule(0.9, 10)
    traces = []

    @jax.jit
    def step_keep_prob(step):
        traces.append(None)
        return schedule(step)

    jitted = [np.asarray(step_keep_prob(jnp.int32(step))) for step in range(12)]
    assert len(traces) == 1
    np.testing.assert_array_equal(np.stack(jitted), np.asarray(schedule(jnp.arange(12, dtype=jnp.int32))))


@pytest.mark.parametrize("total_steps", [2, 3, 12, 180, 1001])
@pytest.mark.parametrize("keep_prob", [0.1, 0.5, 0.8, 0.9])
def test_the_bits_are_those_of_optax_linear_schedule_to_the_last_step(keep_prob, total_steps):
    # Runs that used optax.linear_schedule(1.0, keep_prob, total_steps - 1) keep their numbers.
    ours = db.linear_keep_prob_schedule(keep_prob, total_steps)
    theirs = optax.linear_schedule(1.0, keep_prob, total_steps - 1)
    steps = jnp.arange(-2, total_steps + 3)
    np.testing.assert_array_equal(np.asarray(ours(steps)).view(np.uint32), np.asarray(theirs(steps)).view(np.uint32))
    np.testing.assert_array_equal(
        np.asarray(jax.jit(ours)(steps)).view(np.uint32), np.asarray(jax.jit(theirs)(steps)).view(np.uint32)
    )


@pytest.mark.parametrize(
    ("keep_prob", "total_steps", "error", "message"),
    [
        (1.5, 10, ValueError, r"keep_prob must be in \[0, 1\], got 1.5"),
        (float("nan"), 10, ValueError, r"keep_prob must be in \[0, 1\], got nan"),
        ("0.9", 10, TypeError, "keep_prob must be a real number or a scalar array, got '0.9'"),
        (0.9, 0, ValueError, "total_steps must be an int >= 1, got 0"),
        (0.9, 2.5, TypeError, "total_steps must be an int >= 1, got 2.5"),
        (0.9, True, TypeError, "total_steps must be an int >= 1, got True"),
    ],
)
def test_bad_arguments_name_the_argument_the_value_and_what_is_allowed(keep_prob, total_steps, error, message):
    with pytest.raises(error, match=message):
        db.linear_keep_prob_schedule(keep_prob, total_steps)


def test_numpy_arguments_are_accepted_and_a_traced_target_is_refused():
    schedule = db.linear_keep_prob_schedule(np.float32(0.5), np.int64(3))
    assert float(schedule(2)) == 0.5
    with pytest.raises(TypeError, match="keep_prob must be a concrete number"):
        jax.jit(lambda keep_prob: db.linear_keep_prob_schedule(keep_prob, 10)(0))(0.9)
