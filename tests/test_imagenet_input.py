"""``examples/imagenet/input_pipeline.py``: the authors' crop, the views, and the Grain pipeline.

Expected values come from references written here, not from the code under test: a
NumPy transcription of TensorFlow's ``sample_distorted_bounding_box`` kernel
(``tensorflow/core/kernels/image/sample_distorted_bounding_box_op.cc``), the authors'
central-crop arithmetic (``resnet_preprocessing.py``), Pillow's decoder with a bicubic
resize in NumPy (``helpers.cubic_resize``), and data directories written without the
example's code (``helpers.write_prepared``).
"""

import json
import subprocess
import sys
import textwrap
import threading

import input_pipeline
import numpy as np
import pytest

import helpers

# examples/imagenet's own requirements, not the package's minimums: make test-min leaves it out.
pytestmark = pytest.mark.launches


F32 = np.float32


# ----------------------------------------------------------------------------------------
# The authors' crop: TensorFlow's kernel, transcribed.


def kernel_generate_random_crop(rng, original_width, original_height, min_area, max_area, aspect_ratio):
    """``GenerateRandomCrop`` of ``sample_distorted_bounding_box_op.cc``, line by line, in float32.

    ``random->Uniform(n)`` draws an integer in [0, n); ``lrintf`` rounds half to even.
    Returns (x, y, width, height) or None where the kernel returns false.
    """

    def lrintf(value):
        return int(np.rint(F32(value)))

    height = lrintf(np.sqrt(min_area / aspect_ratio))
    max_height = lrintf(np.sqrt(max_area / aspect_ratio))
    if lrintf(F32(max_height) * aspect_ratio) > original_width:
        k_eps = F32(0.0000001)
        max_height = int((original_width + 0.5 - np.float64(k_eps)) / np.float64(aspect_ratio))
        if lrintf(F32(max_height) * aspect_ratio) > original_width:
            max_height -= 1
    if max_height > original_height:
        max_height = original_height
    if height >= max_height:
        height = max_height
    if height < max_height:
        height += int(rng.integers(0, max_height - height + 1))
    width = lrintf(F32(height) * aspect_ratio)
    area = F32(width * height)
    if area < min_area:
        height += 1
        width = lrintf(F32(height) * aspect_ratio)
        area = F32(width * height)
    if area > max_area:
        height -= 1
        width = lrintf(F32(height) * aspect_ratio)
        area = F32(width * height)
    if area < min_area or area > max_area or width > original_width or height > original_height:
        return None
    if width <= 0 or height <= 0:
        return None
    y = int(rng.integers(0, original_height - height)) if height < original_height else 0
    x = int(rng.integers(0, original_width - width)) if width < original_width else 0
    return x, y, width, height


def kernel_crop(rng, height, width):
    """The kernel's ``DoCompute`` with the authors' arguments and the whole image as the bounding box.

    Returns (top, left, height, width), or None where the authors decode the central
    crop instead: when 10 tries fail (the kernel returns the whole image) or a try is the
    whole image (``_at_least_x_are_equal(original_shape, tf.shape(image), 3)``).
    """
    min_area = F32(0.08) * F32(width) * F32(height)
    max_area = F32(1.0) * F32(width) * F32(height)
    min_aspect, max_aspect = F32(3 / 4), F32(4 / 3)
    object_area = F32(width * height)
    for _ in range(10):
        aspect = F32(rng.random(dtype=np.float32)) * (max_aspect - min_aspect) + min_aspect
        crop = kernel_generate_random_crop(rng, width, height, min_area, max_area, aspect)
        if crop is None:
            continue
        x, y, crop_width, crop_height = crop
        crop_area = F32(crop_width * crop_height)
        if crop_area >= F32(1.0) and crop_area / object_area >= F32(0.1):
            return None if (crop_height, crop_width) == (height, width) else (y, x, crop_height, crop_width)
    return None


def draw_boxes(sampler, height, width, draws, seed):
    rng = np.random.default_rng(seed)
    return [sampler(rng, height, width) for _ in range(draws)]


def box_statistics(boxes, height, width):
    """Per-draw values whose means the two samplers must share: (name, values) pairs."""
    random = [box for box in boxes if box is not None]
    top, left, h, w = (np.array(values, np.float64) for values in zip(*random))
    area = h * w / (height * width)
    values = {
        "central crop": np.array([box is None for box in boxes], np.float64),
        "area": area,
        "width / height": w / h,
        "height": h / height,
        "width": w / width,
        "top": top / height,
        "left": left / width,
        "full height": (h == height).astype(np.float64),
        "full width": (w == width).astype(np.float64),
    }
    for threshold in (0.15, 0.25, 0.4, 0.6, 0.8):
        values[f"area < {threshold}"] = (area < threshold).astype(np.float64)
    return values


# ImageNet's two usual shapes, extreme ones where the clamps and the full-side crops
# matter, and a small square where the rounding does.
CROP_SHAPES = [(375, 500), (500, 375), (100, 1000), (1000, 100), (33, 33)]


@pytest.mark.parametrize(("height", "width"), CROP_SHAPES)
def test_inception_crops_are_distributed_as_tensorflows_kernel_draws_them(height, width):
    draws = 10_000
    ours = box_statistics(draw_boxes(input_pipeline.inception_crop_box, height, width, draws, 1), height, width)
    kernel = box_statistics(draw_boxes(kernel_crop, height, width, draws, 2), height, width)
    for name, values in ours.items():
        reference = kernel[name]
        # Five standard errors of the difference of two independent means, measured on the draws.
        spread = np.sqrt(values.var(ddof=1) / values.size + reference.var(ddof=1) / reference.size)
        assert abs(values.mean() - reference.mean()) <= 5 * spread + 1e-12, (name, values.mean(), reference.mean())


@pytest.mark.parametrize(("height", "width"), [*CROP_SHAPES, (60, 90), (224, 224), (17, 300)])
def test_every_inception_crop_has_the_kernels_exact_properties(height, width):
    rng = np.random.default_rng(3)
    for _ in range(2000):
        box = input_pipeline.inception_crop_box(rng, height, width)
        if box is None:
            continue
        top, left, h, w = box
        assert top >= 0 and top + h <= height and left >= 0 and left + w <= width
        # min_object_covered=0.1 on the whole image: never under 10% of it; never all of it.
        assert 0.1 * height * width <= h * w < height * width
        # The width is the height times an aspect ratio in [3/4, 4/3], rounded to a pixel.
        assert F32(3 / 4) * h - 0.5 <= w <= F32(4 / 3) * h + 0.5
        # Uniform(n) draws from 0 to n - 1: a crop shorter (narrower) than the image never
        # touches its last row (column).
        assert h == height or top + h < height
        assert w == width or left + w < width


@pytest.mark.parametrize(("height", "width"), [*CROP_SHAPES, (60, 90), (224, 224), (17, 300)])
def test_every_draw_is_the_kernels_crop_from_the_same_random_stream(height, width):
    # The transcription takes its numbers from the generator in the example's order (the
    # aspect ratio, the height, then the corner): from one seed both give the same box at
    # every draw, so a crop the example refuses or shapes otherwise fails at its draw, not
    # only through a mean.
    ours, kernel = np.random.default_rng(5), np.random.default_rng(5)
    boxes = []
    for draw in range(2000):
        box = input_pipeline.inception_crop_box(ours, height, width)
        assert box == kernel_crop(kernel, height, width), (draw, box)
        boxes.append(box)
    crops = [box for box in boxes if box is not None]
    # On a long thin image most crops span the short side, where the kernel's bounds are `<=`.
    if height * 10 == width:
        assert sum(h == height for _, _, h, _ in crops) > 100
    if width * 10 == height:
        assert sum(w == width for _, _, _, w in crops) > 100


def test_an_image_no_crop_fits_always_takes_the_central_crop():
    # 10 x 1000: a crop of 8% of the area at aspect <= 4/3 is at least 25 pixels high.
    rng = np.random.default_rng(0)
    assert all(input_pipeline.inception_crop_box(rng, 10, 1000) is None for _ in range(100))


@pytest.mark.parametrize(("height", "width"), [(375, 500), (500, 375), (10, 1000), (33, 34), (256, 320), (1, 1)])
def test_the_central_crop_is_the_authors_arithmetic(height, width):
    # resnet_preprocessing.py: int(224 / (224 + 32) * min(h, w)), offsets ((h - side) + 1) // 2.
    side = max(1, int(F32(224 / 256) * F32(min(height, width))))
    expected = ((height - side) + 1) // 2, ((width - side) + 1) // 2, side, side
    assert input_pipeline.center_crop_box(height, width, 0.875) == expected


# ----------------------------------------------------------------------------------------
# Decoding and the views.


@pytest.mark.parametrize(
    ("mode", "options"),
    [("RGB", {}), ("L", {}), ("CMYK", {}), ("RGB", {"progressive": True}), ("RGB", {"exif": b"Exif\0\0" + bytes(300)})],
)
def test_the_jpeg_header_gives_the_size_without_decoding(mode, options):
    data = helpers.encode(helpers.photo(37, 53), mode=mode, quality=80, **options)
    assert input_pipeline.jpeg_size(data) == (37, 53)


def test_what_is_not_a_jpeg_has_no_jpeg_size():
    png = helpers.encode(helpers.photo(37, 53), "PNG")
    jpeg = helpers.photo_jpeg(37, 53)
    # A JPEG cut before its frame header, and one without its start-of-image marker.
    for data in (png, b"", b"\xff\xd8", jpeg[:20], jpeg[2:], b"not an image at all"):
        assert input_pipeline.jpeg_size(data) is None


def expected_view(image_bytes, box, size, flip=False):
    """The reference view: Pillow's decode at the DCT scaling the box allows, the box on that grid, a NumPy resize."""
    top, left, height, width = box
    # The largest of libjpeg's scalings 1/2, 1/4, 1/8 that leaves the box at least size a side.
    scale = max([s for s in (1, 2, 4, 8) if min(height, width) >= s * size] or [1])
    pixels = helpers.pillow_rgb(image_bytes, scale)
    first_row, first_column = round(top / scale), round(left / scale)
    end_row, end_column = round((top + height) / scale), round((left + width) / scale)
    view = helpers.cubic_resize(pixels[first_row:end_row, first_column:end_column], size)
    return view[:, ::-1] if flip else view


def assert_close_to(actual, expected):
    # OpenCV's resize weighs 8-bit pixels with 11-bit fixed-point weights: at most one level from the exact values.
    assert actual.shape == expected.shape and actual.dtype == np.uint8
    assert np.abs(actual.astype(int) - expected.astype(int)).max() <= 1


def central_box(height, width):
    side = max(1, int(F32(0.875) * F32(min(height, width))))
    return ((height - side) + 1) // 2, ((width - side) + 1) // 2, side, side


@pytest.mark.parametrize(
    # Sizes whose central crop is decoded at full size, at 1/2 and at 1/4 of it.
    ("height", "width", "size"),
    [(375, 500, 224), (500, 333, 224), (90, 60, 32), (1024, 768, 224), (375, 500, 64)],
)
def test_the_eval_view_is_the_central_crop_resized(height, width, size):
    data = helpers.photo_jpeg(height, width, seed=height)
    view = input_pipeline.eval_image(data, size, 0.875)
    assert_close_to(view, expected_view(data, central_box(height, width), size))


@pytest.mark.parametrize(("height", "width"), [(375, 500), (1000, 750)])
def test_the_train_view_is_the_random_crop_resized_and_flipped_left_right_half_the_time(height, width):
    data = helpers.photo_jpeg(height, width, seed=width)
    flips = []
    for seed in range(8):
        # The same generator's draws: the crop (checked against the kernel above), then the flip.
        replay = np.random.default_rng(seed)
        box = input_pipeline.inception_crop_box(replay, height, width) or central_box(height, width)
        flip = replay.random() < 0.5
        view = input_pipeline.train_image(data, np.random.default_rng(seed), 96, 0.875)
        assert_close_to(view, expected_view(data, box, 96, flip))
        flips.append(flip)
    assert any(flips) and not all(flips)


def test_the_train_view_of_an_image_no_crop_fits_is_the_central_crop():
    data = helpers.photo_jpeg(30, 1000)
    for seed in range(4):
        replay = np.random.default_rng(seed)
        assert input_pipeline.inception_crop_box(replay, 30, 1000) is None
        flip = replay.random() < 0.5
        view = input_pipeline.train_image(data, np.random.default_rng(seed), 32, 0.875)
        assert_close_to(view, expected_view(data, central_box(30, 1000), 32, flip))


@pytest.mark.parametrize(
    ("encoding", "tolerance"),
    [
        ({"format": "JPEG", "mode": "L"}, 1),
        ({"format": "PNG"}, 1),
        ({"format": "PNG", "mode": "RGBA"}, 1),
        # OpenCV's CMYK to RGB conversion rounds differently from Pillow's: one level more.
        ({"format": "JPEG", "mode": "CMYK"}, 2),
    ],
)
def test_grayscale_cmyk_and_png_images_become_rgb(encoding, tolerance):
    data = helpers.encode(helpers.photo(60, 80), **encoding)
    view = input_pipeline.eval_image(data, 48, 0.875)
    reference = helpers.cubic_resize(helpers.pillow_rgb(data)[4:56, 14:66], 48)
    assert view.shape == (48, 48, 3) and view.dtype == np.uint8
    assert np.abs(view.astype(int) - reference.astype(int)).max() <= tolerance


def test_bytes_that_are_no_image_are_a_corrupt_record():
    for data in (b"", b"not an image", helpers.photo_jpeg(40, 40)[:30]):
        with pytest.raises(input_pipeline.CorruptRecordError, match="image"):
            input_pipeline.eval_image(data, 32, 0.875)
        with pytest.raises(input_pipeline.CorruptRecordError, match="image"):
            input_pipeline.train_image(data, np.random.default_rng(0), 32, 0.875)


# ----------------------------------------------------------------------------------------
# The Grain pipeline.

CLASSES = ["n01", "n02", "n03"]
SIZE = 16


def records(count, seed):
    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        height, width = (int(v) for v in rng.integers(20, 60, size=2))
        out.append((index % len(CLASSES), helpers.photo_jpeg(height, width, seed=seed + index, quality=75)))
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    # Train: 25 records in two shards; val: 9 records, an odd count.
    shards = {"train": [records(13, 0), records(12, 100)], "val": [records(9, 200)]}
    return helpers.write_prepared(tmp_path_factory.mktemp("prepared"), CLASSES, shards)


def train(data_dir, count, **options):
    settings = {"seed": 0, "process_index": 0, "process_count": 1, "local_batch": 4, "image_size": SIZE}
    settings |= {"crop_fraction": 0.875, "threads": 2, "workers": 0} | options
    iterator = iter(input_pipeline.train_batches(data_dir, **settings))
    return [next(iterator) for _ in range(count)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for one, other in zip(a, b):
        assert one.keys() == other.keys()
        for name in one:
            assert np.array_equal(one[name], other[name]), name


def test_batches_do_not_depend_on_the_threads_or_the_start_step(prepared):
    # 10 batches of 4 cross the end of the first epoch (25 records).
    reference = train(prepared, 10, threads=1)
    assert_same_batches(train(prepared, 10, threads=4), reference)
    assert_same_batches(train(prepared, 7, threads=3, start_step=3), reference[3:])
    first_epoch = [r for batch in reference[:7] for r in batch["record"].tolist()]
    assert sorted(first_epoch[:25]) == list(range(25))


def test_every_thread_decodes_an_image_of_its_own_at_once(prepared, monkeypatch):
    # Four threads and batches of eight: only images decoded one a thread fill all four at once.
    threads, started = 4, []
    # Each of the first four decodes waits for the others: this fails (the barrier breaks
    # after its timeout) only if four decodes are never in flight together.
    barrier = threading.Barrier(threads, timeout=60)

    def train_image(image_bytes, rng, size, crop_fraction):
        started.append(None)
        if len(started) <= threads:
            barrier.wait()
        return np.zeros((size, size, 3), np.uint8)

    monkeypatch.setattr(input_pipeline, "train_image", train_image)
    batches = train(prepared, 2, threads=threads, local_batch=8)
    assert [batch["image"].shape for batch in batches] == [(8, SIZE, SIZE, 3)] * 2


def test_worker_processes_give_the_same_batches(prepared):
    # Grain's worker processes need absl's flags parsed; they run in a child process of their own.
    script = textwrap.dedent(
        f"""
        import json
        from absl import flags
        flags.FLAGS(["workers"])
        import input_pipeline
        out = {{}}
        for workers in (0, 2):
            batches = input_pipeline.train_batches(
                {str(prepared)!r}, seed=0, process_index=0, process_count=1, local_batch=3, image_size={SIZE},
                crop_fraction=0.875, start_step=1, threads=2, workers=workers)
            iterator = iter(batches)
            out[workers] = [
                [next(iterator)[name].tolist() for name in ("record", "label", "image")] for _ in range(5)]
            if workers:
                iterator.close()
        evaluation, count = input_pipeline.eval_batches(
            {str(prepared)!r}, process_index=0, process_count=1, local_batch=2, image_size={SIZE},
            crop_fraction=0.875, threads=2, workers=2)
        out["eval"] = [batch["record"].tolist() for batch in evaluation]
        out["eval_count"] = count
        print(json.dumps(out))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=helpers.python_path_environment(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["2"] == out["0"]
    # 9 val records in batches of 2: 5 batches (the last padded), not a sixth from the workers' round of 2.
    assert out["eval_count"] == 5 and len(out["eval"]) == 5
    assert [r for batch in out["eval"] for r in batch] == [*range(9), -1]


@pytest.mark.parametrize("processes", [2, 3, 4])
def test_every_process_runs_as_many_eval_batches_and_each_val_record_is_counted_once(prepared, processes):
    # 9 records: slices of 5 and 4 on 2 processes; batches of 2 make 3 steps on each.
    seen, counts = [], set()
    for process in range(processes):
        batches, count = input_pipeline.eval_batches(
            prepared, process_index=process, process_count=processes, local_batch=2, image_size=SIZE,
            crop_fraction=0.875, threads=2,
        )  # fmt: skip
        batches = list(batches)
        assert len(batches) == count
        counts.add(count)
        for batch in batches:
            assert np.array_equal(batch["mask"], batch["record"] >= 0)
            assert not batch["image"][~batch["mask"]].any()
            seen += batch["record"][batch["mask"]].tolist()
    longest_slice = -(-9 // processes)
    assert counts == {-(-longest_slice // 2)}
    assert sorted(seen) == list(range(9))


def test_a_corrupt_record_mid_epoch_stops_the_run_naming_it_and_its_shard(tmp_path):
    good = records(8, 300)
    corrupt_shard = [*good[:2], (1, b"\xff\xd8 half a JPEG"), *good[2:4]]
    data_dir = helpers.write_prepared(tmp_path, CLASSES, {"train": [good[4:], corrupt_shard, good[:3]], "val": [good]})
    # Train records 0-3 are shard 0's, 4-8 shard 1's: the corrupt one is record 6, the third of shard 1.
    with pytest.raises(input_pipeline.CorruptRecordError) as error:
        train(data_dir, 4)
    message = str(error.value)
    assert "train record 6 (record 2 of " in message and "train-00001-of-00003.array_record) is corrupt" in message
    assert "image" in message


@pytest.mark.parametrize(
    ("record", "cause"),
    [((7, b""), r"its label 7 is not one of the 3 classes"), ((-1, b""), r"its label -1 is not one of the 3 classes")],
)
def test_a_val_record_with_a_label_outside_the_classes_is_corrupt(tmp_path, record, cause):
    val = [*records(3, 400), record]
    data_dir = helpers.write_prepared(tmp_path, CLASSES, {"train": [records(4, 500)], "val": [val]})
    batches, _ = input_pipeline.eval_batches(
        data_dir, process_index=0, process_count=1, local_batch=2, image_size=SIZE, crop_fraction=0.875
    )
    with pytest.raises(input_pipeline.CorruptRecordError, match=r"val record 3 \(record 3 of .*val-00000-of-00001"):
        list(batches)
    with pytest.raises(input_pipeline.CorruptRecordError, match=cause):
        list(batches)


def test_a_record_too_short_for_a_label_is_corrupt():
    with pytest.raises(input_pipeline.CorruptRecordError, match="3 bytes, fewer than the 4 of a label"):
        input_pipeline.decode_record(b"abc")
