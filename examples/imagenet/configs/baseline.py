"""ResNet-50 on ImageNet without DropBlock: the baseline row of the paper's Table 1.

The authors' recipe (``tensorflow/tpu`` ``models/official/resnet``: ``resnet_main.py``,
``configs/resnet_config.py``): batch 1024, SGD with Nesterov momentum 0.9, learning rate
0.1 x batch / 256 after a 5-epoch linear warm-up, x0.1 at epochs 30, 60 and 80 of 90
(stretched to the run's length), weight decay 1e-4 on every weight but the batch norms',
batch norm statistics over each TPU core's 128 samples, bfloat16 compute, 224-pixel
images. ``dropblock.py`` and ``dropblock_ls.py`` change only the regularizer and the
label smoothing.

Two run lengths, chosen after the file name (``--config configs/baseline.py:270``):
``90`` epochs, the authors' code's default (the default here), and ``270``, the paper's
Table 1 schedule: decays at epochs 125, 200 and 250, the best evaluation over the run
reported.
"""

import ml_collections

# Run lengths: the epochs, and the learning rate's decays in epochs of that run.
SCHEDULES = {
    "90": {"num_epochs": 90.0, "lr_schedule_epochs": 90, "lr_decay_epochs": (30, 60, 80)},
    "270": {"num_epochs": 270.0, "lr_schedule_epochs": 270, "lr_decay_epochs": (125, 200, 250)},
}


def get_config(schedule: str = "90") -> ml_collections.ConfigDict:
    """The baseline's configuration; every field can be overridden with ``--config.FIELD=VALUE``.

    Args:
      schedule: ``"90"`` or ``"270"``, the run's epochs (:data:`SCHEDULES`).
    """
    if schedule not in SCHEDULES:
        allowed = tuple(SCHEDULES)
        raise ValueError(f"the schedule after the config file's name must be one of {allowed}, got {schedule!r}.")
    config = ml_collections.ConfigDict()
    # Data: a directory written by prepare.py (required, but with synthetic_data).
    config.data_dir = ""
    # True: one batch of random images made on the devices at every step, 1000 classes, no
    # evaluation; the devices' images/s, measured before preparing ImageNet.
    config.synthetic_data = False
    config.image_size = 224
    config.eval_crop_fraction = 0.875  # the central 224 of a 256-pixel short side
    config.data_threads = 16  # threads reading and decoding, per process
    config.data_workers = 0  # decoding processes per host (Grain's mp_prefetch), on top of the threads
    config.prefetch_batches = 2  # global batches transferred ahead to the devices

    # Model: resnet(model_depth) of dropblock_jax.models.
    config.model_depth = 50
    config.model_width = 64  # channels of the stem and of group 1 (64: the authors' ResNet-50)
    config.dtype = "bfloat16"  # computation; parameters, batch statistics and logits are float32
    # Batch norm statistics over groups of this many samples of the global batch; 0: the whole batch.
    # 128: the authors' TPUEstimator normalizes on each of a TPU's 8 cores, 1024 / 8 samples each.
    config.batch_norm_group_size = 128
    config.regularizer = "none"  # "none" or "dropblock"
    config.keep_prob = 0.9  # DropBlock's keep_prob in group 4 at the end of the schedule
    config.keep_prob_schedule = "linear"  # "linear" (1 at step 0 to keep_prob at the last step) or "constant"
    config.block_size = 7
    config.regularized_shortcuts = "all"  # "all" (the authors': 36 places) or "projection" (29)

    # Optimization.
    config.global_batch_size = 1024
    config.num_epochs = SCHEDULES[schedule]["num_epochs"]
    config.num_train_steps = -1  # -1: num_epochs of the train split
    config.base_learning_rate = 0.1  # per 256 images: the rate is base_learning_rate * global_batch_size / 256
    # Epochs of an lr_schedule_epochs-epoch run, each moved to floor(e / lr_schedule_epochs * run's epochs).
    config.warmup_epochs = 5.0
    config.lr_decay_epochs = SCHEDULES[schedule]["lr_decay_epochs"]
    config.lr_schedule_epochs = SCHEDULES[schedule]["lr_schedule_epochs"]
    config.lr_decay_factor = 0.1
    config.momentum = 0.9
    config.nesterov = True
    config.weight_decay = 1e-4  # L2 on every parameter but the batch norms' scales and offsets
    config.label_smoothing = 0.0
    config.seed = 0

    # Logging, evaluation, checkpoints (process 0 writes metrics.jsonl and TensorBoard events).
    config.log_every_steps = 100
    config.eval_every_steps = 2500  # 0: only at the end
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2
    # "": WORKDIR/checkpoints. On several hosts, a place they all reach (gs://bucket/run, a shared disk).
    config.checkpoint_dir = ""
    config.profile_first_step = 20  # jax.profiler trace of profile_steps steps from this step
    config.profile_steps = 0  # 0: no trace
    config.debug_dumps = False  # record ids read and eval predictions, in WORKDIR/debug (for checks)
    return config
