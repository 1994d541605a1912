"""Converts an ImageNet folder into the ArrayRecord shards the training example reads.

The source is the usual layout of the ILSVRC 2012 images::

    SOURCE/train/<wnid>/*.JPEG     1,281,167 images of 1,000 classes
    SOURCE/val/<wnid>/*.JPEG       50,000 images (the validation set sorted into class folders)

The labels are the classes' positions in sorted wnid order (``n01440764`` is 0), the
order of Flax's, TFDS's and torchvision's ImageNet. Each split's records are written
in an order shuffled with ``--seed``, so that the contiguous slice each training
process reads holds every class; a record is the label and the image file's bytes,
unchanged (see ``input_pipeline.encode_record``). ``OUTPUT/info.json`` lists the
classes and the record counts.

Run it once, on one machine (``--output`` can then be copied to a bucket or a shared
disk the hosts read)::

    python examples/imagenet/prepare.py --source /data/imagenet --output /data/imagenet-arrayrecord
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import sys
from collections.abc import Sequence

import input_pipeline
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
# One record per chunk: every record can be read alone, which Grain's random access needs.
WRITER_OPTIONS = "group_size:1"


def list_split(folder: pathlib.Path, classes: Sequence[str] | None) -> tuple[list[str], list[tuple[pathlib.Path, int]]]:
    """The classes (sorted wnids) and every (image path, label) of one split's folder.

    ``classes`` None: the split's own folders are the classes (the train split);
    otherwise its folders must be among them.

    Raises:
      FileNotFoundError: the folder is missing or holds no class folder or no image.
      ValueError: a folder that is not one of ``classes``.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (expected {folder.name}/<wnid>/*.JPEG in --source).")
    wnids = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not wnids:
        raise FileNotFoundError(f"{folder} holds no class folders; expected {folder.name}/<wnid>/*.JPEG.")
    if classes is None:
        classes = wnids
    unknown = sorted(set(wnids) - set(classes))
    if unknown:
        raise ValueError(f"{folder} has class folders that train/ does not have: {unknown[:5]}.")
    label = {wnid: index for index, wnid in enumerate(classes)}
    images = [
        (path, label[wnid])
        for wnid in wnids
        for path in sorted((folder / wnid).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not images:
        raise FileNotFoundError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)} files in its class folders).")
    return list(classes), images


def _read_checked(path: pathlib.Path) -> bytes:
    """The file's bytes, after Pillow has read its header (a broken file fails here, not in training)."""
    data = path.read_bytes()
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{path} is not an image Pillow can read: {error}") from error
    return data


def write_split(
    images: Sequence[tuple[pathlib.Path, int]], output: pathlib.Path, split: str, shards: int, seed: int, threads: int
) -> int:
    """Writes ``images`` in a shuffled order as ``shards`` ArrayRecord files; returns the record count."""
    order = np.random.default_rng(seed).permutation(len(images))
    shards = max(1, min(shards, len(images)))
    bounds = np.linspace(0, len(images), shards + 1).round().astype(int)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for shard in range(shards):
            chosen = [images[i] for i in order[bounds[shard] : bounds[shard + 1]]]
            writer = ArrayRecordWriter(str(output / input_pipeline.shard_name(split, shard, shards)), WRITER_OPTIONS)
            for (_, label), data in zip(chosen, pool.map(_read_checked, [path for path, _ in chosen])):
                writer.write(input_pipeline.encode_record(label, data))
            writer.close()
    return len(images)


def prepare(source: pathlib.Path, output: pathlib.Path, train_shards: int, val_shards: int, seed: int, threads: int):
    """Writes both splits and ``info.json`` into ``output``; returns the info."""
    classes, train = list_split(source / "train", None)
    _, val = list_split(source / "val", classes)
    output.mkdir(parents=True, exist_ok=True)
    info = {
        "classes": classes,
        "train": write_split(train, output, "train", train_shards, seed, threads),
        "val": write_split(val, output, "val", val_shards, seed + 1, threads),
    }
    (output / input_pipeline.INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return info


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the command line and prepares the shards."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=pathlib.Path, required=True, help="folder with train/<wnid>/ and val/<wnid>/")
    parser.add_argument("--output", type=pathlib.Path, required=True, help="folder for the shards and info.json")
    parser.add_argument("--train-shards", type=_positive_int, default=1024)
    parser.add_argument("--val-shards", type=_positive_int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the order the records are written in")
    parser.add_argument("--threads", type=_positive_int, default=16, help="threads reading the image files")
    args = parser.parse_args(argv)
    try:
        info = prepare(args.source, args.output, args.train_shards, args.val_shards, args.seed, args.threads)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"{info['train']} train and {info['val']} val records of {len(info['classes'])} classes in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
