"""ImageNet for the training example: the record format, the authors' preprocessing, Grain datasets.

A prepared data directory (``prepare.py``) holds ``train-NNNNN-of-NNNNN.array_record``
and ``val-...`` shards and ``info.json`` (the class wnids in label order and the record
counts). A record is a label (4 bytes, little-endian int32) followed by the image
file's bytes, as found in the source: no TensorFlow is needed to write or read it.

Preprocessing is the authors' (``tensorflow/tpu`` ``models/official/resnet/
resnet_preprocessing.py``), without TensorFlow: for training the Inception crop of
TensorFlow's ``sample_distorted_bounding_box`` with their arguments (area 8%-100% of
the image, at least 10% covered, aspect ratio 3/4-4/3, 10 tries; the central crop when
the draw is the whole image), a horizontal flip with probability 1/2 and a bicubic
resize to ``image_size``; for evaluation the central ``crop_fraction`` of the short
side (0.875 = 224/256: the crop of a 256-pixel short side to 224) resized to
``image_size``. OpenCV decodes (its wheel bundles libjpeg-turbo) and resizes, each
image on one thread: a crop at least twice the output size is decoded at 1/2, 1/4
or 1/8 scale in the JPEG's DCT domain, so that large images cost less. Images leave
the host as uint8; the train step normalizes them with :data:`MEAN_RGB` and
:data:`STDDEV_RGB` on the devices (four times less to transfer).

Every process reads a contiguous slice of the records (``pod.host_records``), which
``prepare.py`` wrote in a shuffled order, so that every slice holds every class.
Training data is a pure function of (seed, process, step): the slice is reshuffled
every epoch from the seed, each image's crop and flip come from a generator seeded by
the seed and the image's position in the stream, and a run resumed at step ``k``
starts at batch ``k`` of the same stream, so that it reads what an unbroken run would
have read without saving an iterator. The number of threads and worker processes
changes how fast the batches come, never what they hold.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import grain
import numpy as np
import pod

SPLITS = ("train", "val")
INFO_FILE = "info.json"
_LABEL_BYTES = 4
# ImageNet's per-channel mean and standard deviation of RGB pixel values (0..255).
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# The authors' Inception crop: the arguments of their sample_distorted_bounding_box call.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
CROP_MIN_OBJECT_COVERED = 0.1
CROP_ATTEMPTS = 10

Box = tuple[int, int, int, int]  # top, left, height, width

# Each image is decoded and resized by one of the pipeline's threads: OpenCV's own thread
# pool would only have them compete for the same cores.
cv2.setNumThreads(1)


class CorruptRecordError(ValueError):
    """A record that cannot be read, or whose label or image is unusable."""


# ----------------------------------------------------------------------------------------
# Records and the prepared directory.


def encode_record(label: int, image_bytes: bytes) -> bytes:
    """One record: ``label`` as 4 little-endian bytes, then the image file's bytes."""
    return int(label).to_bytes(_LABEL_BYTES, "little", signed=True) + image_bytes


def decode_record(record: bytes) -> tuple[int, bytes]:
    """(label, image file bytes) of a record written by :func:`encode_record`.

    Raises:
      CorruptRecordError: when the record is too short to hold a label.
    """
    if len(record) < _LABEL_BYTES:
        raise CorruptRecordError(f"{len(record)} bytes, fewer than the {_LABEL_BYTES} of a label")
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


def locate_record(data_dir: str | os.PathLike[str], split: str, index: int) -> tuple[str, int]:
    """The shard holding record ``index`` of ``split`` (counted across the shards in order), and its index there."""
    remaining = index
    for path in shard_files(data_dir, split):
        count = len(grain.sources.ArrayRecordDataSource([path]))
        if remaining < count:
            return path, remaining
        remaining -= count
    raise IndexError(f"{split} has no record {index}: its shards hold {index - remaining}.")


def _record_reader(
    data_dir: str | os.PathLike[str], split: str, num_classes: int
) -> tuple[Callable[[int, Callable[[bytes], np.ndarray]], tuple[int, np.ndarray]], int]:
    """``read(index, view)``, record ``index``'s label and ``view`` of its image, checked; and the record count.

    A record that cannot be read, a label outside the classes or an image that cannot be
    decoded stops the run with a :class:`CorruptRecordError` naming the record and its
    shard: skipping it would silently change the data of every later step.
    """
    source = record_source(data_dir, split)

    def read(index: int, view: Callable[[bytes], np.ndarray]) -> tuple[int, np.ndarray]:
        try:
            try:
                record = source[index]
            except (OSError, RuntimeError, ValueError) as error:
                raise CorruptRecordError(f"it cannot be read ({error})") from error
            label, image_bytes = decode_record(record)
            if not 0 <= label < num_classes:
                raise CorruptRecordError(f"its label {label} is not one of the {num_classes} classes")
            return label, view(image_bytes)
        except CorruptRecordError as error:
            shard, position = locate_record(data_dir, split, index)
            raise CorruptRecordError(
                f"{split} record {index} (record {position} of {shard}) is corrupt: {error}. Prepare the data "
                "again (prepare.py decodes every image), or copy the shard again if it was damaged since."
            ) from error

    return read, len(source)


# ----------------------------------------------------------------------------------------
# Preprocessing.

_F32 = np.float32
# The kernel's tolerance when it shrinks the largest height to fit the width.
_FIT_EPSILON = float(_F32(1e-7))


def _lrint(value: np.float32) -> int:
    """C's ``lrintf``: to the nearest integer, ties to even (as Python's ``round``)."""
    return round(float(value))


def _random_crop(
    rng: np.random.Generator, height: int, width: int, min_area: np.float32, max_area: np.float32, aspect: np.float32
) -> Box | None:
    """One try of TensorFlow's ``GenerateRandomCrop``, in its float32 arithmetic; None when it fails.

    The crop's height is drawn uniformly between the heights that the area range gives
    at this aspect ratio (the largest one shrunk to fit the image), its width is the
    height times the aspect ratio rounded, and its corner is uniform over the positions
    that keep it inside the image (``Uniform(n)`` draws from 0 to n - 1, so a crop
    shorter than the image never touches its bottom row).
    """
    crop_height = _lrint(np.sqrt(min_area / aspect))
    max_height = _lrint(np.sqrt(max_area / aspect))
    if _lrint(_F32(max_height) * aspect) > width:
        max_height = int((width + 0.5 - _FIT_EPSILON) / float(aspect))
        if _lrint(_F32(max_height) * aspect) > width:
            max_height -= 1
    max_height = min(max_height, height)
    crop_height = min(crop_height, max_height)
    if crop_height < max_height:
        crop_height += int(rng.integers(max_height - crop_height + 1))
    crop_width = _lrint(_F32(crop_height) * aspect)
    # Rounding may leave the area just outside the range: one pixel taller, or shorter, first.
    if _F32(crop_width * crop_height) < min_area:
        crop_height += 1
        crop_width = _lrint(_F32(crop_height) * aspect)
    if _F32(crop_width * crop_height) > max_area:
        crop_height -= 1
        crop_width = _lrint(_F32(crop_height) * aspect)
    area = _F32(crop_width * crop_height)
    if not (min_area <= area <= max_area and 0 < crop_width <= width and 0 < crop_height <= height):
        return None
    top = int(rng.integers(height - crop_height)) if crop_height < height else 0
    left = int(rng.integers(width - crop_width)) if crop_width < width else 0
    return top, left, crop_height, crop_width


def inception_crop_box(rng: np.random.Generator, height: int, width: int) -> Box | None:
    """The authors' random crop of an image, or None where they take the central crop instead.

    TensorFlow's ``sample_distorted_bounding_box`` with the authors' arguments
    (``resnet_preprocessing.py``: the whole image as the bounding box,
    ``min_object_covered=0.1``, ``aspect_ratio_range=(3/4, 4/3)``,
    ``area_range=(0.08, 1.0)``, ``max_attempts=10``), as its kernel draws
    (``sample_distorted_bounding_box_op.cc``, ``GenerateRandomCrop``): each try draws
    the aspect ratio (width / height) uniformly, then the height uniformly (not the
    area), rounds and clamps as the kernel does, and keeps the first crop that covers
    at least 10% of the image. After 10 failed tries the kernel returns the whole
    image; the authors then decode the central crop, and so they do when a try happens
    to draw the whole image: both are None here.

    Args:
      rng: the generator the draws come from.
      height: the image's height in pixels.
      width: the image's width in pixels.

    Returns:
      ``(top, left, height, width)`` of the crop, or None.

    Example:
      >>> box = inception_crop_box(np.random.default_rng(0), 375, 500)
      >>> top, left, h, w = box
      >>> 0.1 <= h * w / (375 * 500) <= 1 and top + h <= 375 and left + w <= 500
      True
    """
    min_area = _F32(CROP_AREA_RANGE[0]) * _F32(width) * _F32(height)
    max_area = _F32(CROP_AREA_RANGE[1]) * _F32(width) * _F32(height)
    low, high = _F32(CROP_ASPECT_RANGE[0]), _F32(CROP_ASPECT_RANGE[1])
    image_area = _F32(height * width)
    for _ in range(CROP_ATTEMPTS):
        aspect = rng.random(dtype=np.float32) * (high - low) + low
        box = _random_crop(rng, height, width, min_area, max_area, aspect)
        if box is not None and _F32(box[2] * box[3]) / image_area >= _F32(CROP_MIN_OBJECT_COVERED):
            return None if box[2:] == (height, width) else box
    return None


def center_crop_box(height: int, width: int, crop_fraction: float) -> Box:
    """The central square of side ``crop_fraction`` x the short side, as the authors' ``_decode_and_center_crop``.

    The side is truncated to a whole pixel and the offsets rounded up (their
    ``((image_height - padded_center_crop_size) + 1) // 2``).
    """
    side = max(1, int(_F32(crop_fraction) * _F32(min(height, width))))
    return (height - side + 1) // 2, (width - side + 1) // 2, side, side


# JPEG frame headers (ITU-T T.81, B.1.1.3): SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC).
_START_OF_FRAME = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_START_OF_SCAN = 0xDA
# Markers that stand alone, without a length: TEM, RST0-RST7, SOI, EOI.
_STANDALONE = frozenset([0x01, *range(0xD0, 0xDA)])


def jpeg_size(image_bytes: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, without decoding it; None for anything else.

    Example:
      >>> import io
      >>> from PIL import Image
      >>> file = io.BytesIO()
      >>> Image.new("RGB", (40, 30)).save(file, "JPEG")
      >>> jpeg_size(file.getvalue())
      (30, 40)
    """
    if image_bytes[:2] != b"\xff\xd8":
        return None
    offset, end = 2, len(image_bytes)
    while offset + 4 <= end:
        if image_bytes[offset] != 0xFF:
            return None
        marker = image_bytes[offset + 1]
        if marker == 0xFF:  # a fill byte before the marker
            offset += 1
        elif marker in _STANDALONE:
            offset += 2
        elif marker == _START_OF_SCAN:
            return None
        elif marker in _START_OF_FRAME:
            if offset + 9 > end:
                return None
            height = int.from_bytes(image_bytes[offset + 5 : offset + 7], "big")
            width = int.from_bytes(image_bytes[offset + 7 : offset + 9], "big")
            # A height of 0 is given later, by a DNL marker: decode to learn it.
            return (height, width) if height and width else None
        else:
            offset += 2 + int.from_bytes(image_bytes[offset + 2 : offset + 4], "big")
    return None


# OpenCV's flags for each DCT scaling: three BGR channels whatever the file holds (grayscale,
# CMYK, a PNG named .JPEG), in its stored orientation, as TensorFlow's and Pillow's decoders
# give it (ImageNet's labels were made on the stored pixels).
_DECODE_FLAGS = {
    scale: flag | cv2.IMREAD_IGNORE_ORIENTATION
    for scale, flag in [
        (1, cv2.IMREAD_COLOR),
        (2, cv2.IMREAD_REDUCED_COLOR_2),
        (4, cv2.IMREAD_REDUCED_COLOR_4),
        (8, cv2.IMREAD_REDUCED_COLOR_8),
    ]
}


def _decode(image_bytes: bytes, scale: int = 1) -> np.ndarray:
    """The image's BGR pixels, decoded at 1/``scale`` of its size (a JPEG's DCT scaling)."""
    try:
        pixels = cv2.imdecode(np.frombuffer(image_bytes, np.uint8), _DECODE_FLAGS[scale])
    except cv2.error as error:
        raise CorruptRecordError(f"its image cannot be decoded ({error.msg.strip()})") from error
    if pixels is None:
        raise CorruptRecordError("its image is not a JPEG, PNG or other format OpenCV decodes")
    return pixels


def _dct_scale(crop_height: int, crop_width: int, size: int) -> int:
    """The largest DCT scaling (1/2, 1/4, 1/8) that leaves the crop at least ``size`` pixels a side; else 1."""
    for scale in (8, 4, 2):
        if min(crop_height, crop_width) >= scale * size:
            return scale
    return 1


def _size_or_pixels(image_bytes: bytes) -> tuple[int, int, np.ndarray | None]:
    """(height, width, None) from a JPEG's header; (height, width, pixels) of anything else, decoded."""
    size = jpeg_size(image_bytes)
    if size is not None:
        return *size, None
    pixels = _decode(image_bytes)
    return pixels.shape[0], pixels.shape[1], pixels


def _crop_resized(image_bytes: bytes, pixels: np.ndarray | None, box: Box, size: int) -> np.ndarray:
    """The ``box`` of the image resized to ``size`` x ``size``, RGB.

    Without ``pixels`` the JPEG is decoded at the DCT scaling the box allows. Pixel ``i``
    of a 1/s decode covers the image's pixels ``s*i .. s*i + s - 1``: the box is rounded
    to that grid. The resize is bicubic without antialiasing (OpenCV's ``INTER_CUBIC``:
    the cubic kernel with a = -0.75 of the authors' ``tf.image.resize_bicubic``, at
    pixel centres).
    """
    top, left, height, width = box
    scale = 1
    if pixels is None:
        scale = _dct_scale(height, width, size)
        pixels = _decode(image_bytes, scale)
    rows, columns = pixels.shape[:2]
    first_row, first_column = min(round(top / scale), rows - 1), min(round(left / scale), columns - 1)
    end_row = min(max(round((top + height) / scale), first_row + 1), rows)
    end_column = min(max(round((left + width) / scale), first_column + 1), columns)
    crop = pixels[first_row:end_row, first_column:end_column]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_CUBIC)[..., ::-1]


def train_image(image_bytes: bytes, rng: np.random.Generator, size: int, crop_fraction: float) -> np.ndarray:
    """The training view of an image: the authors' random crop, bicubic resize to ``size``, random flip; uint8 HWC.

    Where :func:`inception_crop_box` gives None, the evaluation crop (``crop_fraction``)
    is used, as the authors do. The flip is horizontal, with probability 1/2.

    Raises:
      CorruptRecordError: when the bytes are not an image OpenCV decodes.
    """
    height, width, pixels = _size_or_pixels(image_bytes)
    box = inception_crop_box(rng, height, width)
    if box is None:
        box = center_crop_box(height, width, crop_fraction)
    image = _crop_resized(image_bytes, pixels, box, size)
    return image[:, ::-1] if rng.random() < 0.5 else image


def eval_image(image_bytes: bytes, size: int, crop_fraction: float) -> np.ndarray:
    """The evaluation view of an image: the central crop resized to ``size``; uint8 HWC.

    Raises:
      CorruptRecordError: when the bytes are not an image OpenCV decodes.
    """
    height, width, pixels = _size_or_pixels(image_bytes)
    return _crop_resized(image_bytes, pixels, center_crop_box(height, width, crop_fraction), size)


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
    Batch ``k`` is the same whatever ``start_step``, ``threads`` and ``workers`` are.
    Each image is read and decoded by one of ``threads`` threads (OpenCV releases the
    GIL) through this module's :func:`train_image`, looked up at every call; batches
    are assembled after. ``workers`` > 0 runs that many processes of ``threads``
    threads each (Grain's ``mp_prefetch``, which needs absl's flags parsed, as
    ``train.py`` does), for hosts where one Python process cannot keep the cores busy.

    Raises:
      ValueError: when the slice holds fewer records than a batch.
      CorruptRecordError: while iterating, at a record that cannot be used.
    """
    read, count = _record_reader(data_dir, "train", len(read_info(data_dir)["classes"]))
    records = pod.host_records(count, process_index, process_count, drop_remainder=False)
    if len(records) < local_batch:
        raise ValueError(
            f"config.global_batch_size gives each of the {process_count} process(es) {local_batch} rows a step, "
            f"more than the {len(records)} train records of its slice."
        )

    def example(index: int, rng: np.random.Generator) -> dict[str, Any]:
        label, image = read(index, lambda image_bytes: train_image(image_bytes, rng, image_size, crop_fraction))
        return {"image": image, "label": np.int32(label), "record": np.int64(index)}

    stream = (
        grain.MapDataset.range(records.start, records.stop)
        .shuffle(seed=_process_seed(seed, process_index, 0))
        .repeat()
        .random_map(example, seed=_process_seed(seed, process_index, 1))
    )[start_step * local_batch :]
    return _batched(stream, local_batch, threads, workers)


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
    read, count = _record_reader(data_dir, "val", len(read_info(data_dir)["classes"]))
    records = pod.host_records(count, process_index, process_count, drop_remainder=False)
    # The longest slice, of ceil(count / processes) records, sets every process's number of batches.
    num_batches = math.ceil(math.ceil(count / process_count) / local_batch)
    padding = {
        "image": np.zeros((image_size, image_size, 3), np.uint8),
        "label": np.int32(0),
        "record": np.int64(-1),
        "mask": np.bool_(False),
    }

    def example(position: int) -> dict[str, Any]:
        if position >= len(records):
            return padding
        index = records.start + position
        label, image = read(index, lambda image_bytes: eval_image(image_bytes, image_size, crop_fraction))
        return {"image": image, "label": np.int32(label), "record": np.int64(index), "mask": np.bool_(True)}

    # Whole rounds of batches for the worker processes; the padding batches past num_batches are dropped.
    rounds = math.ceil(num_batches / max(workers, 1)) * max(workers, 1)
    batches = _batched(grain.MapDataset.range(rounds * local_batch).map(example), local_batch, threads, workers)
    if rounds > num_batches:
        batches = grain.experimental.LimitIterDataset(batches, num_batches)
    return batches, num_batches


def _batched(stream: grain.MapDataset, batch: int, threads: int, workers: int) -> grain.IterDataset:
    """The batches of ``stream``'s consecutive elements, each element made by one of ``threads`` threads.

    With ``workers`` > 1, Grain's ``mp_prefetch`` gives worker ``w`` the elements ``w,
    w + workers, ...`` of its input to batch, and takes the workers' batches in turn:
    worker ``w``'s ``j``-th batch is the output's batch ``j * workers + w``. The input is
    ``stream`` reordered so that this batch holds ``stream``'s batch ``j * workers + w``,
    whatever the number of workers.
    """
    if workers > 1:
        ordered = stream

        def element(position: int) -> Any:
            worker, rank = position % workers, position // workers
            return ordered[((rank // batch) * workers + worker) * batch + rank % batch]

        stream = grain.MapDataset.range(len(stream)).map(element)
    threads = max(threads, 1)
    # Every thread busy with one image, and a batch's worth more ready for when the loop asks.
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=batch + threads)
    batches = stream.to_iter_dataset(options).batch(batch, drop_remainder=True)
    if workers > 0:
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return batches


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
