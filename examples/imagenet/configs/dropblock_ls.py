"""ResNet-50 with DropBlock and label smoothing 0.1: the paper's Table 1 row with both."""

import ml_collections
from configs import dropblock


def get_config(schedule: str = "90") -> ml_collections.ConfigDict:
    """DropBlock's configuration with labels smoothed by 0.1; ``schedule`` as in ``baseline.py`` (90 or 270 epochs)."""
    config = dropblock.get_config(schedule)
    config.label_smoothing = 0.1
    return config
