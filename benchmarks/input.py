"""The ImageNet example's input side: images/s per core of its views and of its Grain pipeline.

On ImageNet-like JPEGs generated here (see :func:`imagenet_like_jpegs`), every row is
measured in the same run, round-robin (each round times every row once, so that a slow
phase of a shared machine falls on all rows alike), and reported as the best and the
median images/s over ``--rounds`` rounds, with its ratio to a reference row:

- the train and eval views of ``examples/imagenet/input_pipeline.py``
  (``train_image``, ``eval_image``: OpenCV, DCT-scaled decode of large crops), one
  thread, against Flax's tf.data path (``examples/imagenet/input_pipeline.py`` of Flax:
  ``sample_distorted_bounding_box`` + ``decode_and_crop_jpeg`` + bicubic
  ``tf.image.resize`` + ``random_flip_left_right``; eval ``decode_and_center_crop``),
  one tf.data thread, when TensorFlow is installed (normalization left out of both: the
  example normalizes on the devices), and against the 0.3.0 views (Pillow decoding the
  whole image, antialiased bicubic resize);
- ``train_batches`` (ArrayRecord shards written here, 224-pixel train views) at 2
  threads against 1 thread;
- ``train_batches`` at 16 threads with ``train_image`` replaced by a 20 ms sleep,
  against the ideal 16 / 20 ms = 800 images/s: how many images the pipeline keeps in
  flight, whatever the cores.

When TensorFlow is installed, a second table compares the Inception crop boxes of
``inception_crop_box`` with ``tf.image.sample_distorted_bounding_box`` (the authors'
arguments) on ImageNet's most common size.

Stdout holds a header line and the tables in Markdown; progress goes to stderr.

Usage:
  python benchmarks/input.py                 # 400 images, 7 rounds
  python benchmarks/input.py --quick         # a few images, 1 round: checks that it runs
  python benchmarks/input.py --images 1000 --rounds 11 --json input.json
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import io
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

IMAGENET_EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "imagenet"


def example_module(name: str):
    """``examples/imagenet``'s module or package ``name``, imported as its scripts import it, ``sys.path`` untouched.

    The example's modules import their neighbours by name (``input_pipeline`` imports
    ``pod``): load those first.
    """
    spec = importlib.machinery.PathFinder.find_spec(name, [str(IMAGENET_EXAMPLE)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


example_module("pod")
input_pipeline = example_module("input_pipeline")

IMAGE_SIZE = 224
CROP_FRACTION = 0.875
BATCH = 32
SLEEP_S, SLEEP_THREADS = 0.02, 16


# ----------------------------------------------------------------------------------------
# ImageNet-like JPEGs.


def _photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(photo) for photo in load_sample_images().images]


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): ImageNet's mix, most images 500 pixels on the long side, some smaller or larger."""
    if rng.random() < 0.8:
        long_side = 500
        short_side = int(rng.choice([375, 333, 500, 281], p=[0.7, 0.15, 0.1, 0.05]))
    else:
        long_side = int(rng.choice([160, 250, 300, 400, 640, 800, 1024]))
        short_side = round(long_side * rng.uniform(0.56, 1.0))
    return (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)


def _view(rng: np.random.Generator, photo: Image.Image, width: int, height: int) -> Image.Image:
    """A region of ``photo`` at 1 to 1.4 of its pixels per output pixel (upscaled only where it is too small)."""
    scale = min(photo.width / width, photo.height / height, rng.uniform(1.0, 1.4))
    region_w, region_h = width * scale, height * scale
    left, top = rng.uniform(0, photo.width - region_w), rng.uniform(0, photo.height - region_h)
    view = photo.resize((width, height), Image.Resampling.LANCZOS, box=(left, top, left + region_w, top + region_h))
    return view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view


def imagenet_like_jpegs(count: int, seed: int) -> list[bytes]:
    """``count`` JPEGs of natural content at ImageNet's sizes and file sizes.

    Each is a region of one of scikit-learn's two sample photos (427 x 640), with a
    region of either pasted over part of it half of the time, at the size
    :func:`_image_size` draws, plus camera-like noise (standard deviation 2), saved at
    quality 96 with 4:2:0 chroma subsampling: about 100 KB and 200,000 pixels on
    average (ImageNet's train set: about 110 KB; random-noise JPEGs are several times
    slower to decode than photos).
    """
    rng = np.random.default_rng(seed)
    photos = _photos()
    files = []
    for _ in range(count):
        width, height = _image_size(rng)
        image = _view(rng, photos[rng.integers(len(photos))], width, height)
        if rng.random() < 0.5:
            inset_w, inset_h = int(width * rng.uniform(0.3, 0.7)), int(height * rng.uniform(0.3, 0.7))
            inset = _view(rng, photos[rng.integers(len(photos))], inset_w, inset_h)
            image.paste(inset, (int(rng.integers(width - inset_w + 1)), int(rng.integers(height - inset_h + 1))))
        noisy = np.asarray(image, np.float32) + rng.normal(0, 2, (height, width, 3))
        file = io.BytesIO()
        Image.fromarray(np.clip(noisy.round(), 0, 255).astype(np.uint8)).save(file, "JPEG", quality=96)
        files.append(file.getvalue())
    return files


# ----------------------------------------------------------------------------------------
# The rows.


def _pillow_views() -> tuple[Callable[[bytes, np.random.Generator], np.ndarray], Callable[[bytes], np.ndarray]]:
    """The 0.3.0 views: Pillow decodes the whole image, then an antialiased bicubic resize of the box."""

    def resized(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
        top, left, height, width = box
        size = (IMAGE_SIZE, IMAGE_SIZE)
        return np.asarray(image.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + width, top + height)))

    def train(image_bytes: bytes, rng: np.random.Generator) -> np.ndarray:
        image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        box = None
        for _ in range(10):  # 0.3.0's crop: the area, not the height, drawn uniformly
            area = rng.uniform(0.08, 1.0) * image.height * image.width
            aspect = rng.uniform(3 / 4, 4 / 3)
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= image.width and 0 < h <= image.height:
                box = int(rng.integers(image.height - h + 1)), int(rng.integers(image.width - w + 1)), h, w
                break
        if box is None:
            side = round(CROP_FRACTION * min(image.size))
            box = (image.height - side) // 2, (image.width - side) // 2, side, side
        pixels = resized(image, box)
        return pixels[:, ::-1] if rng.random() < 0.5 else pixels

    def evaluate(image_bytes: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        side = round(CROP_FRACTION * min(image.size))
        return resized(image, ((image.height - side) // 2, (image.width - side) // 2, side, side))

    return train, evaluate


def _tensorflow():
    """TensorFlow, on one thread, or None when it is not installed."""
    if importlib.util.find_spec("tensorflow") is None:
        return None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    return tf


def _tf_datasets(tf, files: list[bytes]) -> dict[str, object]:
    """Flax's train and eval preprocessing as one-thread tf.data pipelines over ``files``."""
    whole = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])

    def resize(image):
        return tf.image.resize([image], [IMAGE_SIZE, IMAGE_SIZE], method="bicubic")[0]

    def center(image_bytes):
        shape = tf.image.extract_jpeg_shape(image_bytes)
        side = tf.cast(IMAGE_SIZE / (IMAGE_SIZE + 32) * tf.cast(tf.minimum(shape[0], shape[1]), tf.float32), tf.int32)
        window = tf.stack([(shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side])
        return resize(tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3))

    def train(image_bytes):
        shape = tf.image.extract_jpeg_shape(image_bytes)
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            shape, whole, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
            max_attempts=10, use_image_if_no_bounding_boxes=True, seed=1,
        )  # fmt: skip
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        cropped = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
        whole_image = tf.reduce_all(tf.equal(tf.shape(cropped)[:2], shape[:2]))
        image = tf.cond(whole_image, lambda: center(image_bytes), lambda: resize(cropped))
        return tf.image.random_flip_left_right(image, seed=2)

    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    source = tf.data.Dataset.from_tensor_slices(files)
    return {"train": source.map(train).with_options(options), "eval": source.map(center).with_options(options)}


def _rate(run: Callable[[], int]) -> float:
    start = time.perf_counter()
    images = run()
    return images / (time.perf_counter() - start)


def _write_data(directory: pathlib.Path, files: list[bytes], records: int) -> None:
    """A prepared directory of one train shard of ``records`` records (``files`` in turn, labels 0..9)."""
    writer = ArrayRecordWriter(str(directory / input_pipeline.shard_name("train", 0, 1)), "group_size:1")
    for index in range(records):
        writer.write(input_pipeline.encode_record(index % 10, files[index % len(files)]))
    writer.close()
    info = {"classes": [f"n{i:08d}" for i in range(10)], "train": records, "val": 0}
    (directory / input_pipeline.INFO_FILE).write_text(json.dumps(info))


def _pipeline_rate(data_dir: pathlib.Path, threads: int, batches: int) -> Callable[[], float]:
    """The images/s of ``batches`` batches of ``train_batches``, after a first one (start-up, threads filling)."""

    def rate() -> float:
        iterator = iter(
            input_pipeline.train_batches(
                data_dir, seed=0, process_index=0, process_count=1, local_batch=BATCH, image_size=IMAGE_SIZE,
                crop_fraction=CROP_FRACTION, threads=threads, workers=0,
            )
        )  # fmt: skip
        next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        return batches * BATCH / (time.perf_counter() - start)

    return rate


def _sleeping_train_image(image_bytes: bytes, rng: np.random.Generator, size: int, crop_fraction: float) -> np.ndarray:
    time.sleep(SLEEP_S)
    return np.zeros((size, size, 3), np.uint8)


# ----------------------------------------------------------------------------------------
# The crop boxes against TensorFlow's.


def crop_statistics(boxes: np.ndarray, height: int, width: int) -> dict[str, float]:
    """Share of central-crop fallbacks, and over the random crops: mean area, shares under 10% and 25%, mean aspect."""
    random = boxes[:, 0] >= 0
    area = boxes[random, 2] * boxes[random, 3] / (height * width)
    return {
        "central crop": float(1 - random.mean()),
        "mean area": float(area.mean()),
        "area < 10%": float((area < 0.1).mean()),
        "area < 25%": float((area < 0.25).mean()),
        "mean width / height": float((boxes[random, 3] / boxes[random, 2]).mean()),
    }


def compare_crops(tf, draws: int, height: int, width: int) -> dict[str, dict[str, float]]:
    """Statistics of ``draws`` boxes from inception_crop_box and from TensorFlow's kernel (-1 offsets: central crop)."""
    rng = np.random.default_rng(0)
    ours = np.array([input_pipeline.inception_crop_box(rng, height, width) or (-1, -1, 0, 0) for _ in range(draws)])
    whole = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])
    theirs = []
    for seed in range(draws):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            [height, width, 3], whole, seed=[seed, 1], min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True,
        )  # fmt: skip
        box = (int(begin[0]), int(begin[1]), int(size[0]), int(size[1]))
        theirs.append((-1, -1, 0, 0) if box[2:] == (height, width) else box)
    return {
        "inception_crop_box": crop_statistics(ours, height, width),
        "TensorFlow": crop_statistics(np.array(theirs), height, width),
    }


# ----------------------------------------------------------------------------------------
# The run.


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400, help="JPEGs generated and decoded by each view row")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=8, help="batches of 32 timed per train_batches row")
    parser.add_argument("--crop-draws", type=int, default=20000)
    parser.add_argument("--quick", action="store_true", help="a few images and one round: checks that it runs")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.images, args.rounds, args.batches, args.crop_draws = 12, 1, 2, 200

    files = imagenet_like_jpegs(args.images, seed=0)
    pixels = [input_pipeline.jpeg_size(data) for data in files]
    tf = _tensorflow()
    pillow_train, pillow_eval = _pillow_views()
    print(
        f"{len(files)} ImageNet-like JPEGs, {np.mean([len(f) for f in files]) / 1e3:.0f} KB and "
        f"{np.mean([h * w for h, w in pixels]) / 1e3:.0f} kilopixels on average; {args.rounds} round(s); "
        f"OpenCV {input_pipeline.cv2.__version__}, TensorFlow {tf.__version__ if tf else 'not installed'}; "
        f"Python {platform.python_version()}, {os.cpu_count()} CPU cores",
        flush=True,
    )

    def views(train: Callable, evaluate: Callable) -> dict[str, Callable[[], int]]:
        def run_train() -> int:
            rng = np.random.default_rng(0)
            for data in files:
                train(data, rng)
            return len(files)

        def run_eval() -> int:
            for data in files:
                evaluate(data)
            return len(files)

        return {"train": run_train, "eval": run_eval}

    rows = {
        "example": views(
            lambda data, rng: input_pipeline.train_image(data, rng, IMAGE_SIZE, CROP_FRACTION),
            lambda data: input_pipeline.eval_image(data, IMAGE_SIZE, CROP_FRACTION),
        ),
        "0.3.0": views(pillow_train, pillow_eval),
    }
    if tf is not None:
        datasets = _tf_datasets(tf, files)

        def tf_run(view: str) -> Callable[[], int]:
            def run() -> int:
                return sum(1 for _ in datasets[view])

            return run

        rows["tf.data"] = {view: tf_run(view) for view in ("train", "eval")}

    with tempfile.TemporaryDirectory() as directory:
        data_dir = pathlib.Path(directory)
        # The timed batches and the first one within one epoch, so that no row pays for a reshuffle.
        _write_data(data_dir, files, max(len(files), BATCH * (args.batches + 1)))
        pipelines = {threads: _pipeline_rate(data_dir, threads, args.batches) for threads in (1, 2)}
        # A warm-up round, not counted: tf.data traces its functions, the caches fill.
        for runs in rows.values():
            for run in runs.values():
                run()
        rates: dict[str, list[float]] = {}
        for round_index in range(args.rounds):
            print(f"round {round_index + 1} of {args.rounds}", file=sys.stderr, flush=True)
            # Each view's rows one after the other, so that what they are compared with ran next to them.
            for view in ("train", "eval"):
                for path, runs in rows.items():
                    rates.setdefault(f"{path} {view}", []).append(_rate(runs[view]))
            for threads, pipeline_rate in pipelines.items():
                rates.setdefault(f"train_batches {threads}", []).append(pipeline_rate())
            original = input_pipeline.train_image
            input_pipeline.train_image = _sleeping_train_image
            try:
                rates.setdefault("sleep probe", []).append(_pipeline_rate(data_dir, SLEEP_THREADS, args.batches)())
            finally:
                input_pipeline.train_image = original

    ideal = SLEEP_THREADS / SLEEP_S
    rates["ideal"] = [ideal]
    comparisons = [
        ("train view, 1 thread", "example train", "tf.data, 1 thread", "tf.data train"),
        ("train view, 1 thread", "example train", "0.3.0 (Pillow, whole image)", "0.3.0 train"),
        ("eval view, 1 thread", "example eval", "tf.data, 1 thread", "tf.data eval"),
        ("eval view, 1 thread", "example eval", "0.3.0 (Pillow, whole image)", "0.3.0 eval"),
        ("train_batches, 2 threads", "train_batches 2", "train_batches, 1 thread", "train_batches 1"),
        (f"train_batches, {SLEEP_THREADS} threads, 20 ms sleep", "sleep probe", "ideal 16 / 20 ms", "ideal"),
    ]
    print()
    print("| measured | images/s best | images/s median | against | images/s best | images/s median | ratio best "
          "| ratio median |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    table = []
    for name, key, against, reference in comparisons:
        if reference not in rates:
            continue
        best, median = max(rates[key]), statistics.median(rates[key])
        reference_best, reference_median = max(rates[reference]), statistics.median(rates[reference])
        row = [name, best, median, against, reference_best, reference_median, best / reference_best]
        row.append(median / reference_median)
        table.append(row)
        print(f"| {name} | {best:.0f} | {median:.0f} | {against} | {reference_best:.0f} | {reference_median:.0f} "
              f"| {best / reference_best:.2f} | {median / reference_median:.2f} |")  # fmt: skip

    crops = None
    if tf is not None:
        height, width = 375, 500
        crops = compare_crops(tf, args.crop_draws, height, width)
        print()
        print(f"Inception crop boxes of a {height} x {width} image, {args.crop_draws} draws each:")
        print()
        names = list(crops["TensorFlow"])
        print("| sampler | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for sampler, values in crops.items():
            print(f"| {sampler} | " + " | ".join(f"{values[n]:.4f}" for n in names) + " |")
    if args.json:
        results = {"images": len(files), "rounds": args.rounds, "rates": rates, "table": table, "crops": crops}
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
