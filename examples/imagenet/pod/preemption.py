"""Preemption: a SIGTERM makes every process save at the same step and exit cleanly."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import types
from collections.abc import Iterator
from typing import Any

import jax
from jax.experimental import multihost_utils


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
