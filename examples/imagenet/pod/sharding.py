"""The data of a pod: each process its slice of the records, the slices one global batch.

Every process reads a contiguous slice of the records (:func:`host_records`); the
rows each process batches (:func:`check_global_batch`) become one global array on a 1-D
``"data"`` mesh of every device of every process (:func:`data_shardings`,
:func:`global_batch`), process ``p`` holding the ``p``-th block of rows. Values that every
process holds alike (the initial train state) become global arrays with
:func:`replicate`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


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
