"""ResNet-50 with DropBlock (block 7, keep_prob 0.9 scheduled from 1, groups 3 and 4): the paper's Table 1 row."""

import ml_collections
from configs import baseline


def get_config(schedule: str = "90") -> ml_collections.ConfigDict:
    """The baseline with DropBlock at the authors' 36 places; ``schedule`` as in ``baseline.py`` (90 or 270 epochs)."""
    config = baseline.get_config(schedule)
    config.regularizer = "dropblock"
    return config
