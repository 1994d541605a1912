"""Orbax checkpoints of the train state, in a local directory or a bucket every host reaches."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def checkpoint_manager(directory: str | os.PathLike[str], max_to_keep: int = 2) -> ocp.CheckpointManager:
    """Orbax's manager, keeping the last ``max_to_keep`` checkpoints.

    ``directory`` is a local path or a URL orbax understands (``gs://bucket/run``): on
    several hosts, one place they all reach.
    """
    location = os.fspath(directory)
    if "://" not in location:
        location = os.path.abspath(location)
    return ocp.CheckpointManager(location, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))


def restore_or_keep(manager: ocp.CheckpointManager, state: Any) -> Any:
    """The latest checkpoint laid out like ``state`` (same shardings), or ``state`` when there is none."""
    latest = manager.latest_step()
    if latest is None:
        return state
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return manager.restore(latest, args=ocp.args.StandardRestore(target))
