"""What the training examples share to run on one process or one process per host of a pod slice.

``examples/train.py`` (a small ResNet on digits) and ``examples/imagenet/train.py``
(ResNet-50 on ImageNet) both use this module for:

- joining the processes: :func:`initialize` (``jax.distributed``, gloo on CPU) and, on one
  machine, :func:`simulate_hosts` (several local processes, SIGTERM forwarded to them);
- the data: :func:`host_records` (the contiguous slice of records a process reads) and
  :func:`global_batch` (every process's rows as one array on the ``"data"`` mesh);
- the train state: :func:`replicate`, :func:`checkpoint_manager`, :func:`restore_or_keep`;
- preemption: :class:`Preemption` (SIGTERM stops every process at the same step, after
  a checkpoint);
- the DropBlock schedule: :func:`linear_keep_prob`, which reaches its target at the last step.

A script outside this folder imports it after putting ``examples/`` on ``sys.path``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

DATA_AXIS = "data"

# ----------------------------------------------------------------------------------------
# Schedule.


def linear_keep_prob(step: ArrayLike, total_steps: int, target: float) -> jax.Array:
    """The paper's DropBlock schedule: keep_prob 1 at step 0, ``target`` at the last step.

    ``1 - (step / (total_steps - 1)) * (1 - target)``, held at ``target`` past the last
    step; a one-step run uses ``target``. ``step`` may be traced (one compile for the run).

    Args:
      step: the step number, from 0.
      total_steps: the number of steps of the run; its last step is ``total_steps - 1``.
      target: the keep_prob the run ends with.

    Returns:
      A float32 scalar.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}.")
    if total_steps == 1:
        return jnp.float32(target)
    fraction = jnp.minimum(jnp.asarray(step, jnp.float32) / (total_steps - 1), 1.0)
    return 1.0 - fraction * (1.0 - jnp.float32(target))


# ----------------------------------------------------------------------------------------
# Data: each process its slice, every slice a block of rows of the global batch.


def host_records(num_records: int, process_index: int, process_count: int, *, drop_remainder: bool) -> range:
    """The records process ``process_index`` of ``process_count`` reads: a contiguous slice.

    With ``drop_remainder`` every slice has ``num_records // process_count`` records (the
    remainder is read by nobody, as Grain's ``ShardByJaxProcess(drop_remainder=True)``);
    without, the slices cover every record and differ in length by at most one.
    """
    if drop_remainder:
        per_process = num_records // process_count
        return range(process_index * per_process, (process_index + 1) * per_process)
    base, extra = divmod(num_records, process_count)
    start = process_index * base + min(process_index, extra)
    return range(start, start + base + (process_index < extra))


def data_shardings() -> tuple[NamedSharding, NamedSharding]:
    """(replicated, batched) over a 1-D ``"data"`` mesh of every device of every process."""
    mesh = jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    return NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))


def check_global_batch(global_batch_size: int, field: str = "global_batch") -> int:
    """The rows each process reads; a clear error when the batch does not split evenly."""
    devices, processes = jax.device_count(), jax.process_count()
    if global_batch_size < 1 or global_batch_size % devices or global_batch_size % processes:
        raise ValueError(
            f"{field} must be a positive multiple of the device count ({devices}) and of the process "
            f"count ({processes}), got {global_batch_size}."
        )
    return global_batch_size // processes


def global_batch(sharding: NamedSharding, local: Any) -> Any:
    """One global batch from every process's rows (a tree of arrays): process ``p`` holds the ``p``-th block."""
    return jax.tree.map(lambda rows: jax.make_array_from_process_local_data(sharding, rows), local)


def replicate(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """``tree``, which every process holds alike, as global arrays: each process fills its own devices."""

    def one(value: Any) -> jax.Array:
        # Indexed on the host, not by one small compiled slice per shape (random keys have no NumPy dtype).
        host = value if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key) else np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------------------
# Checkpoints and preemption.


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


class Preemption:
    """Whether to save and stop now, after a SIGTERM (what a preempted TPU VM or a SLURM job receives).

    With several processes, JAX's preemption service (started by
    ``jax.distributed.initialize``) catches SIGTERM on any of them and
    :meth:`reached` turns true at the same step on every process, so that all take
    part in the last checkpoint. A single process catches SIGTERM itself. Use it as a
    context manager: the previous handler comes back on exit.
    """

    def __init__(self) -> None:
        self._coordinated = jax.distributed.is_initialized()
        self._received = False
        self._previous: Any = None

    def _catch(self, signum: int, frame: types.FrameType | None) -> None:
        self._received = True

    def __enter__(self) -> Preemption:
        """Catches SIGTERM (one process; JAX's service catches it for several)."""
        if not self._coordinated:
            self._previous = signal.signal(signal.SIGTERM, self._catch)
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Puts the previous SIGTERM handler back."""
        if not self._coordinated:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int) -> bool:
        """True when the run must save and stop after ``step``; call it at every step, on every process."""
        if self._coordinated:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._received


# ----------------------------------------------------------------------------------------
# Processes: one per host on a cluster, or several on this machine.


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None, distributed: bool) -> None:
    """Joins the other processes, if any, before anything touches a device.

    ``coordinator`` (``host:port`` of process 0, with ``num_processes`` and
    ``process_id``): explicit initialization, the CPU processes' collectives through
    gloo. ``distributed``: ``jax.distributed.initialize()`` with its own detection (TPU
    pod slices, SLURM, ...). Neither: one process.
    """
    if coordinator is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    elif distributed:
        jax.distributed.initialize()


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return int(probe.getsockname()[1])


def simulate_hosts(
    script: str | os.PathLike[str], count: int, devices_per_host: int, argv: Sequence[str], timeout: float
) -> int:
    """Runs ``script`` as ``count`` local processes, ``devices_per_host`` CPU devices each.

    Each gets ``argv`` and ``--coordinator localhost:PORT --num-processes N
    --process-id I``; they meet through ``jax.distributed`` on that free port and talk
    through gloo, the CPU collectives. A SIGTERM to this launcher goes to every process
    (as a preempted pod slice's hosts all receive it), which then save and exit.
    Returns the first non-zero exit status, or 0; when one process fails or the time
    runs out, the others are stopped.
    """
    port = free_port()
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices_per_host}".strip()
    cluster = ("--coordinator", f"localhost:{port}", "--num-processes", str(count))
    children: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, frame: types.FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    status = 0
    try:
        for index in range(count):
            command = [sys.executable, os.fspath(script), *argv, *cluster, "--process-id", str(index)]
            children.append(subprocess.Popen(command, env=env))
        deadline = time.monotonic() + timeout
        while any(child.poll() is None for child in children):
            failed = [child.returncode for child in children if child.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                status = failed[0] if failed else 124
                break
            time.sleep(0.1)
        else:
            status = next((child.returncode for child in children if child.returncode), 0)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    if status == 124:
        print(f"--simulate-hosts: the processes did not finish within {timeout:.0f} s", file=sys.stderr)
    return status


def without_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` less ``option`` and its value (``option VALUE`` or ``option=VALUE``)."""
    kept: list[str] = []
    skip_value = False
    for word in argv:
        if skip_value:
            skip_value = False
        elif word == option:
            skip_value = True
        elif not word.startswith(f"{option}="):
            kept.append(word)
    return kept
