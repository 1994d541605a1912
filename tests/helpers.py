# ---- examples/imagenet ----
# For the tests of examples/imagenet's input side: natural-looking images, prepared data
# directories written without the example's code, and NumPy references of the decoding
# and of the bicubic resize. Imports stay inside the functions, so that this section can
# sit below others in this file.


def imagenet_example_folder():
    """``examples/imagenet`` of this checkout."""
    import pathlib

    return pathlib.Path(__file__).resolve().parents[1] / "examples" / "imagenet"


def imagenet_trainer():
    """``examples/imagenet/train.py`` as the module ``imagenet_train``, its folder and ``examples/`` on the path.

    ``examples/train.py`` is imported as ``train`` by other test modules: this one gets a name of its own.
    """
    import importlib.util
    import sys

    folder = imagenet_example_folder()
    for path in (str(folder), str(folder.parent)):
        if path not in sys.path:
            sys.path.insert(0, path)
    if "imagenet_train" not in sys.modules:
        spec = importlib.util.spec_from_file_location("imagenet_train", folder / "train.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["imagenet_train"] = module
        spec.loader.exec_module(module)
    return sys.modules["imagenet_train"]


def photo(height, width, seed=0):
    """A ``height`` x ``width`` RGB uint8 view of one of scikit-learn's two sample photos (natural content)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    source = Image.fromarray(load_sample_images().images[seed % 2])
    scale = min(source.width / width, source.height / height) * rng.uniform(0.5, 1.0)
    left = rng.uniform(0, source.width - width * scale)
    top = rng.uniform(0, source.height - height * scale)
    box = (left, top, left + width * scale, top + height * scale)
    return np.asarray(source.resize((width, height), Image.Resampling.BICUBIC, box=box))


def encode(pixels, format="JPEG", mode=None, **options):
    """``pixels`` (uint8 HWC or HW) saved by Pillow in ``format`` (converted to ``mode`` first, if given)."""
    import io

    from PIL import Image

    image = Image.fromarray(pixels)
    if mode is not None:
        image = image.convert(mode)
    file = io.BytesIO()
    image.save(file, format, **options)
    return file.getvalue()


def photo_jpeg(height, width, seed=0, quality=90, **options):
    """A JPEG of :func:`photo`."""
    return encode(photo(height, width, seed), quality=quality, **options)


def pillow_rgb(image_bytes, dct_scale=1):
    """The image decoded by Pillow as RGB uint8; a JPEG at 1/``dct_scale`` of its size (libjpeg's DCT scaling)."""
    import io

    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(image_bytes))
    if dct_scale > 1:
        # Pillow picks the largest scaling whose floor-divided size still covers the request.
        image.draft("RGB", (image.width // dct_scale, image.height // dct_scale))
    return np.asarray(image.convert("RGB"))


def cubic_weights(source_size, output_size, a=-0.75):
    """The (output_size, source_size) matrix of a bicubic resize without antialiasing, at pixel centres.

    Output pixel ``i`` samples the source at ``(i + 0.5) * source_size / output_size - 0.5``
    with Keys' cubic kernel of parameter ``a`` (-0.75: OpenCV's ``INTER_CUBIC`` and
    TensorFlow's ``resize_bicubic``); taps past an edge take the edge pixel.
    """
    import numpy as np

    def kernel(t):
        t = abs(t)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a if t < 2 else 0.0

    weights = np.zeros((output_size, source_size))
    for i in range(output_size):
        position = (i + 0.5) * source_size / output_size - 0.5
        first = int(np.floor(position))
        for tap in range(first - 1, first + 3):
            weights[i, min(max(tap, 0), source_size - 1)] += kernel(position - tap)
    return weights


def cubic_resize(pixels, size):
    """``pixels`` (uint8 HWC) resized to ``size`` x ``size`` by :func:`cubic_weights`, rounded to uint8."""
    import numpy as np

    rows = cubic_weights(pixels.shape[0], size)
    columns = cubic_weights(pixels.shape[1], size)
    resized = np.tensordot(np.tensordot(rows, pixels.astype(np.float64), axes=(1, 0)), columns, axes=(1, 1))
    resized = resized.transpose(0, 2, 1)
    return np.clip(np.round(resized), 0, 255).astype(np.uint8)


def write_prepared(directory, classes, splits):
    """A prepared data directory written without the example's code; returns it.

    ``splits`` maps a split to its shards, each a list of records ``(label, image
    bytes)``; a record is the label as 4 little-endian bytes, then the bytes.
    """
    import json
    import pathlib

    from array_record.python.array_record_module import ArrayRecordWriter

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = {"classes": list(classes)}
    for split, shards in splits.items():
        for index, records in enumerate(shards):
            path = directory / f"{split}-{index:05d}-of-{len(shards):05d}.array_record"
            writer = ArrayRecordWriter(str(path), "group_size:1")
            for label, data in records:
                writer.write(int(label).to_bytes(4, "little", signed=True) + data)
            writer.close()
        info[split] = sum(len(records) for records in shards)
    (directory / "info.json").write_text(json.dumps(info))
    return directory
