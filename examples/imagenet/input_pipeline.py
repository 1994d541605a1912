"""ImageNet for the training example: the record format, the authors' preprocessing, Grain datasets.

A prepared data directory (``prepare.py``) holds ``train-NNNNN-of-NNNNN.array_record``
and ``val-...`` shards and ``info.json`` (the class wnids in label order and the record
counts). A record is a label (4 bytes, little-endian int32) followed by the image
file's bytes, as found in the source folder: no TensorFlow is needed to write or read
it.

Preprocessing is the authors' (``tensorflow/tpu`` ``models/official/resnet/
resnet_preprocessing.py``), in NumPy and Pillow: for training an Inception-style
random crop (area 8%-100% of the image, aspect ratio 3/4-4/3, 10 tries, then the
evaluation crop), a horizontal flip with probability 1/2 and a bicubic resize to
``image_size``; for evaluation the central ``crop_fraction`` of the short side
(0.875 = 224/256: the crop of a 256-pixel short side to 224) resized to
``image_size``. Images leave the host as uint8; the train step normalizes them with
:data:`MEAN_RGB` and :data:`STDDEV_RGB` on the devices (four times less to transfer).

Every process reads a contiguous slice of the records (``pod.host_records``), which
``prepare.py`` wrote in a shuffled order, so that every slice holds every class.
Training data is a pure function of (seed, process, step): the slice is reshuffled
every epoch from the seed, each image's crop and flip come from a generator seeded by
the seed and the image's position in the stream, and a run resumed at step ``k``
starts at batch ``k`` of the same stream, so that it reads what an unbroken run would
have read without saving an iterator.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import pod

SPLITS = ("train", "val")
INFO_FILE = "info.json"
_LABEL_BYTES = 4
# ImageNet's per-channel mean and standard deviation of RGB pixel values (0..255).
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# The authors' Inception crop: sample_distorted_bounding_box's ranges and tries.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10

Box = tuple[int, int, int, int]  # top, left, height, width


# ----------------------------------------------------------------------------------------
# Records and the prepared directory.


def encode_record(label: int, image_bytes: bytes) -> bytes:
    """One record: ``label`` as 4 little-endian bytes, then the image file's bytes."""
    return int(label).to_bytes(_LABEL_BYTES, "little", signed=True) + image_bytes


def decode_record(record: bytes) -> tuple[int, bytes]:
    """(label, image file bytes) of a record written by :func:`encode_record`."""
    return int.from_bytes(record[:_LABEL_BYTES], "little", signed=True), record[_LABEL_BYTES:]


def shard_name(split: str, index: int, count: int) -> str:
    """``train-00003-of-01024.array_record``."""
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def read_info(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The prepared directory's ``info.json``: ``classes`` (wnids in label order), ``train`` and ``val`` counts.

    Raises:
      FileNotFoundError: when ``data_dir`` is not a directory ``prepare.py`` wrote.
    """
    path = pathlib.Path(data_dir) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"config.data_dir={os.fspath(data_dir)!r} holds no {INFO_FILE}: it must be a directory written by "
            "`python examples/imagenet/prepare.py --source IMAGENET_FOLDER --output DIR`."
        )
    return json.loads(path.read_text())


def shard_files(data_dir: str | os.PathLike[str], split: str) -> list[str]:
    """The ArrayRecord shards of ``split``, in order.

    Raises:
      FileNotFoundError: when there are none.
    """
    files = sorted(str(p) for p in pathlib.Path(data_dir).glob(f"{split}-*-of-*.array_record"))
    if not files:
        raise FileNotFoundError(f"config.data_dir={os.fspath(data_dir)!r} holds no {split}-*.array_record shards.")
    return files


def record_source(data_dir: str | os.PathLike[str], split: str) -> grain.sources.ArrayRecordDataSource:
    """Random access to the records of ``split``, indexed from 0 across its shards in order."""
    return grain.sources.ArrayRecordDataSource(shard_files(data_dir, split))


# ----------------------------------------------------------------------------------------
# Preprocessing.


def inception_crop_box(rng: np.random.Generator, height: int, width: int) -> Box | None:
    """A random crop of the Inception recipe, or None when :data:`CROP_ATTEMPTS` tries all fail.

    Each try draws the crop's area uniformly in :data:`CROP_AREA_RANGE` of the image's
    and its aspect ratio (width / height) uniformly in :data:`CROP_ASPECT_RANGE`, as
    TensorFlow's ``sample_distorted_bounding_box`` does, and keeps the first crop that
    fits in the image, at a uniformly drawn position.
    """
    for _ in range(CROP_ATTEMPTS):
        area = rng.uniform(*CROP_AREA_RANGE) * height * width
        aspect = rng.uniform(*CROP_ASPECT_RANGE)
        crop_w = round(math.sqrt(area * aspect))
        crop_h = round(math.sqrt(area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    return None


def center_crop_box(height: int, width: int, crop_fraction: float) -> Box:
    """The central square of side ``crop_fraction`` x the short side."""
    side = max(1, round(crop_fraction * min(height, width)))
    return (height - side) // 2, (width - side) // 2, side, side


def _decode(image_bytes: bytes) -> Image.Image:
    # ImageNet holds a few CMYK and grayscale JPEGs (and a PNG named .JPEG): all become RGB.
    return Image.open(io.BytesIO(image_bytes)).convert("RGB")


def _crop_and_resize(image: Image.Image, box: Box, size: int) -> np.ndarray:
    top, left, height, width = box
    resized = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + width, top + height))
    return np.asarray(resized, np.uint8)


def train_image(image_bytes: bytes, rng: np.random.Generator, size: int, crop_fraction: float) -> np.ndarray:
    """The training view of an image: random crop, bicubic resize to ``size``, random flip; uint8 HWC.

    When no random crop fits, the evaluation crop (``crop_fraction``) is used, as the authors do.
    """
    image = _decode(image_bytes)
    box = inception_crop_box(rng, image.height, image.width)
    if box is None:
        box = center_crop_box(image.height, image.width, crop_fraction)
    pixels = _crop_and_resize(image, box, size)
    return pixels[:, ::-1] if rng.random() < 0.5 else pixels


def eval_image(image_bytes: bytes, size: int, crop_fraction: float) -> np.ndarray:
    """The evaluation view of an image: the central crop resized to ``size``; uint8 HWC."""
    image = _decode(image_bytes)
    return _crop_and_resize(image, center_crop_box(image.height, image.width, crop_fraction), size)


# ----------------------------------------------------------------------------------------
# Datasets: each process its slice, batches of its rows of the global batch.


def _process_seed(seed: int, process_index: int, purpose: int) -> int:
    """A seed of its own for each (seed, process, purpose), so that hosts do not crop alike."""
    return int(np.random.SeedSequence([seed, process_index, purpose]).generate_state(1)[0])


def train_batches(
    data_dir: str | os.PathLike[str],
    *,
    seed: int,
    process_index: int,
    process_count: int,
    local_batch: int,
    image_size: int,
    crop_fraction: float,
    start_step: int = 0,
    threads: int = 16,
    workers: int = 0,
) -> grain.IterDataset:
    """This process's training batches from ``start_step`` on, endlessly.

    A batch is ``{"image": uint8 (local_batch, size, size, 3), "label": int32,
    "record": int64}`` (``record``: the index of each image among the train records).
    Batch ``k`` is the same whatever ``start_step`` is. ``threads`` read and decode in
    this process (Pillow releases the GIL), ``workers`` > 0 adds that many decoding
    processes (Grain's ``mp_prefetch``).
    """
    source = record_source(data_dir, "train")
    records = pod.host_records(len(source), process_index, process_count, drop_remainder=False)
    if len(records) < local_batch:
        raise ValueError(
            f"config.global_batch_size gives each of the {process_count} process(es) {local_batch} rows a step, "
            f"more than the {len(records)} train records of its slice."
        )

    def example(index: int, rng: np.random.Generator) -> dict[str, Any]:
        label, image_bytes = decode_record(source[index])
        image = train_image(image_bytes, rng, image_size, crop_fraction)
        return {"image": image, "label": np.int32(label), "record": np.int64(index)}

    dataset = (
        grain.MapDataset.range(records.start, records.stop)
        .shuffle(seed=_process_seed(seed, process_index, 0))
        .repeat()
        .random_map(example, seed=_process_seed(seed, process_index, 1))
        .batch(local_batch, drop_remainder=True)
    )[start_step:]
    return _reading(dataset, threads, workers, local_batch)


def eval_batches(
    data_dir: str | os.PathLike[str],
    *,
    process_index: int,
    process_count: int,
    local_batch: int,
    image_size: int,
    crop_fraction: float,
    threads: int = 16,
    workers: int = 0,
) -> tuple[grain.IterDataset, int]:
    """This process's evaluation batches and their number, the same on every process.

    Every val record is in exactly one process's slice; each slice is padded to the
    longest one's batch count with ``mask`` False rows (``record`` -1), so that every
    process runs as many steps and the masked sums count each image once (as
    big_vision pads and masks).
    """
    source = record_source(data_dir, "val")
    records = pod.host_records(len(source), process_index, process_count, drop_remainder=False)
    num_batches = math.ceil(math.ceil(len(source) / process_count) / local_batch)
    padding = {
        "image": np.zeros((image_size, image_size, 3), np.uint8),
        "label": np.int32(0),
        "record": np.int64(-1),
        "mask": np.bool_(False),
    }

    def example(position: int) -> dict[str, Any]:
        if position >= len(records):
            return padding
        label, image_bytes = decode_record(source[records.start + position])
        image = eval_image(image_bytes, image_size, crop_fraction)
        record = np.int64(records.start + position)
        return {"image": image, "label": np.int32(label), "record": record, "mask": np.bool_(True)}

    dataset = grain.MapDataset.range(num_batches * local_batch).map(example).batch(local_batch)
    return _reading(dataset, threads, workers, local_batch), num_batches


def _reading(dataset: grain.MapDataset, threads: int, workers: int, local_batch: int) -> grain.IterDataset:
    """``dataset`` read by ``threads`` threads, and ``workers`` processes if > 0."""
    options = grain.ReadOptions(num_threads=max(threads, 1), prefetch_buffer_size=max(2, threads // local_batch + 2))
    iterable = dataset.to_iter_dataset(options)
    if workers > 0:
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iterable


def on_devices(
    batches: Iterator[dict[str, np.ndarray]], sharding: Any, prefetch: int = 2
) -> Iterator[tuple[dict, dict]]:
    """(host part, device part) of each batch, ``prefetch`` global batches ahead on the devices.

    The device part is every array but ``record``, as a global array of the batch
    (``pod.global_batch``: this process's rows are its block); the host part keeps
    ``record``, which only the host uses.
    """
    queue: collections.deque[tuple[dict, dict]] = collections.deque()
    for batch in batches:
        host = {"record": batch["record"]}
        device = pod.global_batch(sharding, {k: v for k, v in batch.items() if k != "record"})
        queue.append((host, device))
        if len(queue) > prefetch:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
