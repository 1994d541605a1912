"""What the training examples share to run on one process or one process per host of a pod slice.

``examples/imagenet/train.py`` (ResNet-50 on ImageNet) imports it as ``pod`` (its own
folder is the first entry of ``sys.path``); ``examples/train.py`` (a small ResNet on
digits) as ``imagenet.pod`` (``examples/`` is its first entry). One module a topic:

- :mod:`.sharding`, the data: :func:`host_records` (the contiguous slice of records a
  process reads), :func:`check_global_batch`, :func:`data_shardings` and
  :func:`global_batch` (every process's rows as one array on the ``"data"`` mesh), and
  :func:`replicate` (values every process holds alike as global arrays);
- :mod:`.checkpoints`, the train state: :func:`checkpoint_manager`, :func:`restore_or_keep`;
- :mod:`.preemption`: :class:`Preemption` (SIGTERM stops every process at the same step,
  after a checkpoint) and :func:`sigterm_ignored_by_new_processes` (worker processes
  that keep feeding the steps up to that checkpoint);
- :mod:`.processes`, joining the processes: :func:`initialize` (``jax.distributed``,
  gloo on CPU; under SLURM every GPU of a node for a task alone on it,
  :func:`slurm_local_device_ids`), on one machine :func:`simulate_hosts` (several local
  processes, SIGTERM forwarded to them), and :func:`check_hosts_agree` (a clear stop
  when the hosts' inputs differ); :func:`compiled_together` (a program compiled on every
  process before its first run) and :func:`shutdown` (leaving together at the end).

The DropBlock schedule is the library's: :func:`dropblock_jax.linear_keep_prob_schedule`.
"""

from .checkpoints import checkpoint_manager, restore_or_keep
from .preemption import Preemption, sigterm_ignored_by_new_processes
from .processes import (
    check_hosts_agree,
    compiled_together,
    free_port,
    initialize,
    shutdown,
    simulate_hosts,
    slurm_local_device_ids,
    without_option,
)
from .sharding import DATA_AXIS, check_global_batch, data_shardings, global_batch, host_records, replicate

__all__ = [
    "DATA_AXIS",
    "Preemption",
    "check_global_batch",
    "check_hosts_agree",
    "checkpoint_manager",
    "compiled_together",
    "data_shardings",
    "free_port",
    "global_batch",
    "host_records",
    "initialize",
    "replicate",
    "restore_or_keep",
    "shutdown",
    "sigterm_ignored_by_new_processes",
    "simulate_hosts",
    "slurm_local_device_ids",
    "without_option",
]
