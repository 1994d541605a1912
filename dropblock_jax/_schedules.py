"""The paper's keep_prob schedule: linear from 1 to the target over training."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from dropblock_jax._checks import check_int, checked_probability, concrete_value


def linear_keep_prob_schedule(keep_prob: ArrayLike, total_steps: int) -> Callable[[ArrayLike], jax.Array]:
    """The paper's schedule: keep_prob falls linearly from 1 at step 0 to ``keep_prob`` at the last step.

    Returns an optax-style schedule, a function of the step number: 1 at step 0,
    ``keep_prob`` at step ``total_steps - 1`` (the last step of a run of ``total_steps``
    steps, so that the last step trains at the target) and at every step after it; a
    one-step run trains at ``keep_prob``. In between it is
    ``1 - (step / (total_steps - 1)) * (1 - keep_prob)``; a step before 0 counts as
    step 0. The step may be traced (an
    argument of the jitted train step), so one compiled step serves the whole schedule;
    hand its value to a layer at the call, or to
    :func:`dropblock_jax.nnx.set_keep_prob` or
    :meth:`dropblock_jax.models.ResNet.set_stage_keep_probs`.

    For ``total_steps >= 2`` it gives the bits of
    ``optax.linear_schedule(1.0, keep_prob, total_steps - 1)``.

    Args:
      keep_prob: the keep_prob the run ends with, a concrete number in [0, 1] (the
        paper: 0.9).
      total_steps: the number of steps of the run, an int >= 1; the last step is
        ``total_steps - 1``.

    Returns:
      ``schedule(step)``, a float32 array of ``step``'s shape (float64 under
      ``jax_enable_x64``).

    Raises:
      TypeError: for a ``keep_prob`` that is not a concrete real number, or a
        ``total_steps`` that is not an int.
      ValueError: for a ``keep_prob`` outside [0, 1] or a ``total_steps`` below 1.

    Examples:
      >>> import dropblock_jax as db
      >>> schedule = db.linear_keep_prob_schedule(0.9, total_steps=5)
      >>> [round(float(schedule(step)), 3) for step in range(6)]
      [1.0, 0.975, 0.95, 0.925, 0.9, 0.9]

    References:
      Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional networks",
      NeurIPS 2018 (arXiv 1810.12890), Section 3, "Scheduled DropBlock".
    """
    checked_probability("keep_prob", keep_prob)
    target = concrete_value(keep_prob)
    if target is None:
        raise TypeError(
            "keep_prob must be a concrete number, got a traced value; build the schedule outside jit "
            "and call it with the traced step."
        )
    last = check_int("total_steps", total_steps, low=1) - 1

    def schedule(step: ArrayLike) -> jax.Array:
        # The arithmetic of optax.linear_schedule, so that a run that used it keeps its bits.
        remaining = jnp.zeros(jnp.shape(step)) if last == 0 else 1 - jnp.clip(step, 0, last) / last
        return (1.0 - target) * remaining + target

    return schedule
