"""A few steps of the DropBlock recipe on a CPU: small images, a narrow ResNet-50, a small batch.

Still ResNet-50's structure (bottleneck blocks 3, 4, 6, 3 and DropBlock's 36 places) at
``model_width`` 8 instead of 64; at 32 pixels groups 3 and 4 see 2x2 and 1x1 maps, where
a block of 7 covers the whole map. Batch norm statistics over groups of 2 samples: one
group a device with ``--simulate-hosts 2`` (4 devices), as the authors' one a TPU core.
The learning rate's marks are whole epochs of the run (the authors' rule): 8 steps of 8
images over the tests' 35 are two epochs, a warm-up over the first and a decay at its
end. For trying the pipeline, the checkpoints and the processes, not for accuracy.
"""

import ml_collections
from configs import dropblock


def get_config() -> ml_collections.ConfigDict:
    """The DropBlock configuration shrunk for a CPU."""
    config = dropblock.get_config()
    config.image_size = 32
    config.model_width = 8
    config.global_batch_size = 8
    config.num_train_steps = 8
    config.batch_norm_group_size = 2
    config.lr_schedule_epochs = 2
    config.warmup_epochs = 1.0
    config.lr_decay_epochs = (1, 2)
    config.data_threads = 2
    config.log_every_steps = 1
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 4
    return config
