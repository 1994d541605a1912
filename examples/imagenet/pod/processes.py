"""The processes of a run: one per host on a cluster, or several on this machine.

:func:`initialize` joins them (``jax.distributed``; gloo on CPU; under SLURM every GPU
of a node for a task alone on it, :func:`slurm_local_device_ids`); on one machine
:func:`simulate_hosts` starts several local processes (SIGTERM forwarded to them);
:func:`check_hosts_agree` stops every process with a clear message when the hosts'
inputs differ; :func:`compiled_together` waits for every process's compilation before a
program's first run; :func:`shutdown` leaves them together at the end.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


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


# How long a process waits for the others to compile a program (a slow host's ResNet-50).
COMPILE_WAIT_S = 3600


def compiled_together(jitted: Any, *args: Any, name: str) -> Any:
    """``jitted`` compiled for ``args``, returned once every process has compiled its own.

    The first run of a program whose collectives span several processes' devices opens
    their connection, which every process must join within a fixed time (30 s for gloo,
    JAX's CPU collectives): a process still compiling past it fails the others' first step
    (``DEADLINE_EXCEEDED``). The wait here is a barrier of the coordination service, which
    involves no device; with one process there is nothing to wait for.

    Args:
      jitted: a ``jax.jit`` function.
      *args: the arguments of its runs (their shapes, dtypes and shardings).
      name: the program's name, unique within the run (it names the barrier).
    """
    compiled = jitted.lower(*args).compile()
    ocp.multihost.get_barrier_sync_fn()(key=f"compiled {name}", timeout_ms=COMPILE_WAIT_S * 1000)
    return compiled


def shutdown() -> None:
    """Leaves the other processes together, at the end of a run that reached it on every process.

    ``jax.distributed.shutdown()`` waits at a barrier for every process, then process 0
    stops the coordination service. Left to JAX's exit handler, process 0 can stop the
    service while a peer is still tearing down its threads (a bucket client's, Grain's):
    the peer's next heartbeat then fails and aborts it, so that a complete run exits with
    an error and a scheduler restarts it. Called while every process is still running,
    the barrier comes first. A no-op for one process.
    """
    jax.distributed.shutdown()


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


# A host name is gathered as this many bytes (cut or zero-padded), one int32 each.
_HOST_NAME_BYTES = 64


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
