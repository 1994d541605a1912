"""What the training examples share to run on one process or one process per host of a pod slice.

``examples/train.py`` (a small ResNet on digits) and ``examples/imagenet/train.py``
(ResNet-50 on ImageNet) both use this module for:

- joining the processes: :func:`initialize` (``jax.distributed``, gloo on CPU; under SLURM
  every GPU of a node for a task alone on it, :func:`slurm_local_device_ids`), on one
  machine :func:`simulate_hosts` (several local processes, SIGTERM forwarded to them), and
  :func:`check_hosts_agree` (a clear stop when the hosts' inputs differ);
- the data: :func:`host_records` (the contiguous slice of records a process reads) and
  :func:`global_batch` (every process's rows as one array on the ``"data"`` mesh);
- the train state: :func:`replicate`, :func:`checkpoint_manager`, :func:`restore_or_keep`;
- preemption: :class:`Preemption` (SIGTERM stops every process at the same step, after
  a checkpoint) and :func:`sigterm_ignored_by_new_processes` (worker processes that keep
  feeding the steps up to that checkpoint);
- the DropBlock schedule: :func:`linear_keep_prob`, which reaches its target at the last step.

A script outside this folder imports it after putting ``examples/`` on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterator, Mapping, Sequence
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


# The size of the C library's ``struct sigaction`` is at most this on the platforms JAX runs on.
_SIGACTION_BYTES = 1024


@contextlib.contextmanager
def sigterm_ignored_by_new_processes() -> Iterator[None]:
    """Processes started inside the block ignore SIGTERM, which their parent then still receives.

    A preempted TPU VM, or SLURM at a job's time limit, sends SIGTERM to every process
    of the run, the input pipeline's worker processes included. Killed, those could
    not feed the steps up to the checkpoint that :class:`Preemption` makes: the run
    would crash instead of saving. An ignored signal stays ignored in a child, even
    across ``exec``, so workers started inside this block keep working until the run
    closes them. The parent's own handler, a Python one or the C one of JAX's
    preemption service (which Python cannot restore), comes back when the block ends;
    a SIGTERM arriving within the block is lost, so keep it to starting the workers.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    saved = ctypes.create_string_buffer(_SIGACTION_BYTES)
    if libc.sigaction(signal.SIGTERM, None, saved) != 0:
        raise OSError(ctypes.get_errno(), "sigaction(SIGTERM) failed")
    python_handler = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        libc.sigaction(signal.SIGTERM, saved, None)
        if callable(python_handler):
            # Python's own bookkeeping of its handler, which the raw restore left at SIG_IGN.
            signal.signal(signal.SIGTERM, python_handler)


# ----------------------------------------------------------------------------------------
# Processes: one per host on a cluster, or several on this machine.


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None, distributed: bool) -> None:
    """Joins the other processes, if any, before anything touches a device.

    ``coordinator`` (``host:port`` of process 0, with ``num_processes`` and
    ``process_id``): explicit initialization, the CPU processes' collectives through
    gloo. ``distributed``: ``jax.distributed.initialize()`` with its own detection (TPU
    pod slices, SLURM, Open MPI, ...), under SLURM with the GPUs
    :func:`slurm_local_device_ids` gives. Neither: one process.
    """
    if coordinator is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    elif distributed:
        jax.distributed.initialize(local_device_ids=slurm_local_device_ids(os.environ))


_TASKS_PER_NODE = re.compile(r"(\d+)(?:\(x(\d+)\))?")
_VISIBLE_GPUS = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")


def _tasks_on_this_node(environ: Mapping[str, str]) -> int | None:
    """The tasks of this SLURM job step on this process's node; None when SLURM does not say."""
    layout = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if not layout:
        return None
    # "2(x3),1": three nodes with 2 tasks, then one with 1.
    counts: list[int] = []
    for part in layout.split(","):
        match = _TASKS_PER_NODE.fullmatch(part.strip())
        if match is None:
            return None
        counts += [int(match[1])] * int(match[2] or 1)
    if "SLURM_NODEID" in environ:
        node = int(environ["SLURM_NODEID"])
        return counts[node] if 0 <= node < len(counts) else None
    return counts[0] if len(set(counts)) == 1 else None


def slurm_local_device_ids(environ: Mapping[str, str]) -> list[int] | None:
    """The GPUs a SLURM task alone on its node drives: every GPU it sees; None leaves JAX's choice.

    ``jax.distributed.initialize()`` under SLURM (``SLURM_LOCALID`` set) restricts each
    process to one GPU, the one numbered ``SLURM_LOCALID``: right for one task per GPU,
    wrong for one task per node, which then trains on GPU 0 alone. A task that is the
    only one of its job step on its node (``srun --ntasks-per-node=1
    --gpus-per-node=8``) gets ``[0, ..., n - 1]`` instead, ``n`` the GPUs SLURM made
    visible to it (the entries of ``CUDA_VISIBLE_DEVICES`` or ``ROCR_VISIBLE_DEVICES``,
    else ``SLURM_GPUS_ON_NODE``); JAX numbers visible GPUs from 0.

    Returns None (JAX's own choice) outside SLURM, when the node runs several tasks of
    the step (one GPU each, as JAX picks them), when ``JAX_LOCAL_DEVICE_IDS`` is set
    (JAX reads it), or when SLURM names no GPU (then JAX keeps to GPU 0 of whatever it
    finds: a warning says how to choose).

    Args:
      environ: the process's environment (``os.environ``).
    """
    if "SLURM_LOCALID" not in environ or environ.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    if _tasks_on_this_node(environ) != 1:
        return None
    visible = next((environ[name] for name in _VISIBLE_GPUS if name in environ), None)
    if visible is not None:
        count = len([entry for entry in visible.split(",") if entry.strip()])
    elif environ.get("SLURM_GPUS_ON_NODE", "").isdigit():
        count = int(environ["SLURM_GPUS_ON_NODE"])
    else:
        print(
            "SLURM names no GPU for this task (no CUDA_VISIBLE_DEVICES, ROCR_VISIBLE_DEVICES or "
            "SLURM_GPUS_ON_NODE): JAX will drive GPU 0 only, if any; set JAX_LOCAL_DEVICE_IDS=0,1,... "
            "to drive more.",
            file=sys.stderr,
        )
        return None
    return list(range(count)) if count else None


def check_hosts_agree(facts: Mapping[str, int], what: str) -> None:
    """Raises on every process when a process's ``facts`` differ from process 0's.

    Every process passes the same names (small integers as values: counts, checksums);
    they are gathered from all processes (a collective: call it on every process),
    and the error names each process (and its host) whose values differ from process
    0's, with both values. One process: nothing to compare.

    Args:
      facts: name -> value, what this process found.
      what: what the facts describe, for the message (``config.data_dir=/data/x``).

    Raises:
      ValueError: when some process disagrees with process 0.
    """
    if jax.process_count() == 1:
        return
    names = sorted(facts)
    host = socket.gethostname().encode()[:_HOST_NAME_BYTES].ljust(_HOST_NAME_BYTES, b"\0")
    local = np.asarray([facts[name] for name in names] + list(host), np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(local))
    values, hosts = gathered[:, : len(names)], gathered[:, len(names) :]
    differences = []
    for process in range(1, len(values)):
        changed = [
            f"{name} {int(values[process, i])} where process 0 has {int(values[0, i])}"
            for i, name in enumerate(names)
            if values[process, i] != values[0, i]
        ]
        if changed:
            name = bytes(hosts[process].astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
            differences.append(f"process {process} ({name}): " + ", ".join(changed))
    if differences:
        first = bytes(hosts[0].astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
        raise ValueError(
            f"The hosts disagree about {what} (process 0 runs on {first}): " + "; ".join(differences) + "."
        )


_HOST_NAME_BYTES = 64


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
