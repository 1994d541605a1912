"""DropBlock for JAX and Flax.

DropBlock (Ghiasi, Lin, Le, NeurIPS 2018, arXiv 1810.12890) is dropout for
convolutional feature maps: it drops contiguous blocks, so that spatially correlated
information cannot leak around the hole.
"""

from dropblock_jax._functional import block_mask, drop_block
from dropblock_jax._rates import expected_keep_fraction, seed_rate
from dropblock_jax._schedules import linear_keep_prob_schedule
from dropblock_jax._version import __version__
from dropblock_jax.linen import DropBlock

__all__ = [
    "DropBlock",
    "__version__",
    "block_mask",
    "drop_block",
    "expected_keep_fraction",
    "linear_keep_prob_schedule",
    "seed_rate",
]
