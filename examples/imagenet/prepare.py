"""Converts ImageNet, as downloaded or as folders, into the ArrayRecord shards the training example reads.

``--source`` holds the ILSVRC 2012 images in any of these forms, per split:

- the three archives of the official download, read in place (nothing is unpacked to
  disk)::

      SOURCE/ILSVRC2012_img_train.tar        one tar per class (n01440764.tar, ...), 1,281,167 images
      SOURCE/ILSVRC2012_img_val.tar          50,000 images, flat (ILSVRC2012_val_00000001.JPEG, ...)
      SOURCE/ILSVRC2012_devkit_t12.tar.gz    the validation labels (or its unpacked folder ILSVRC2012_devkit_t12/)

- folders::

      SOURCE/train/<wnid>/*.JPEG
      SOURCE/val/<wnid>/*.JPEG               the validation images sorted into class folders
      SOURCE/val/*.JPEG                      or flat, as in the archive, with the devkit beside

A ``train/`` or ``val/`` folder is used before the archive of its split. The labels
are the classes' positions in sorted wnid order of the train split (``n01440764`` is
0), the order of Flax's, TFDS's and torchvision's ImageNet; the devkit gives each
flat validation image its wnid (``data/ILSVRC2012_validation_ground_truth.txt``: the
ILSVRC2012_ID of each image in file order; ``data/meta.mat``: each ID's wnid). Each
split's records are written in an order shuffled with ``--seed``, so that the
contiguous slice each training process reads holds every class; a record is the label
and the image file's bytes, unchanged (see ``input_pipeline.encode_record``). Every
image is decoded once here, so that a broken file stops the preparation rather than a
training run. ``OUTPUT/info.json`` lists the classes and the record counts.

Run it once, on one machine (``--output`` can then be copied to a bucket or a shared
disk the hosts read)::

    python examples/imagenet/prepare.py --source /data/imagenet --output /data/imagenet-arrayrecord
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import io
import json
import pathlib
import re
import sys
import tarfile
from collections.abc import Sequence

import input_pipeline
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_FOLDER = "ILSVRC2012_devkit_t12"
DEVKIT_META = "data/meta.mat"
DEVKIT_VAL_LABELS = "data/ILSVRC2012_validation_ground_truth.txt"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")
# One record per chunk: every record can be read alone, which Grain's random access needs.
# JPEG bytes do not compress: compressing them would only cost time when writing and reading.
WRITER_OPTIONS = "group_size:1,uncompressed"


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """Where one image's bytes are: a whole file, or ``size`` bytes at ``offset`` in an uncompressed tar."""

    path: pathlib.Path
    name: str
    offset: int = 0
    size: int = -1

    def read(self) -> bytes:
        """The image file's bytes."""
        if self.size < 0:
            return self.path.read_bytes()
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            return file.read(self.size)


Labeled = list[tuple[ImageFile, int]]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


# ----------------------------------------------------------------------------------------
# The sources of each split.


def list_split(folder: pathlib.Path, classes: Sequence[str] | None) -> tuple[list[str], Labeled]:
    """The classes (sorted wnids) and every (image, label) of one split's class folders.

    ``classes`` None: the split's own folders are the classes (the train split);
    otherwise its folders must be among them, and each image's label is its wnid's
    position in ``classes``, whichever of them the split lacks.

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
        (ImageFile(path, str(path)), label[wnid])
        for wnid in wnids
        for path in sorted((folder / wnid).iterdir())
        if _is_image(path.name)
    ]
    if not images:
        raise FileNotFoundError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)} files in its class folders).")
    return list(classes), images


def _members(archive: pathlib.Path, base: int, tar: tarfile.TarFile) -> list[tuple[str, ImageFile]]:
    """(name, image) of every image in ``tar``, whose data starts at byte ``base`` of ``archive``."""
    return [
        (
            pathlib.PurePath(member.name).name,
            ImageFile(archive, f"{archive}:{member.name}", base + member.offset_data, member.size),
        )
        for member in tar
        if member.isfile() and _is_image(member.name)
    ]


def list_train_archive(archive: pathlib.Path) -> tuple[list[str], Labeled]:
    """The classes (sorted wnids) and every (image, label) of ``ILSVRC2012_img_train.tar``: one tar per wnid inside.

    Only the tar headers are read: each image is a span of the archive, read when it is written.
    """
    per_class: dict[str, list[ImageFile]] = {}
    with tarfile.open(archive, "r:") as outer:
        for member in outer:
            if member.isfile() and member.name.endswith(".tar"):
                with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                    images = [image for _, image in _members(archive, member.offset_data, inner)]
                per_class[pathlib.PurePath(member.name).stem] = sorted(images, key=lambda image: image.name)
    if not any(per_class.values()):
        raise FileNotFoundError(f"{archive} holds no class tars of images (<wnid>.tar of *.JPEG).")
    classes = sorted(per_class)
    return classes, [(image, label) for label, wnid in enumerate(classes) for image in per_class[wnid]]


def devkit_val_wnids(source: pathlib.Path) -> list[str]:
    """The wnid of each validation image, in file order (``ILSVRC2012_val_00000001.JPEG`` first), from the devkit.

    The devkit is ``source/ILSVRC2012_devkit_t12.tar.gz`` or its unpacked folder. Its
    ``meta.mat`` lists the synsets; the 1,000 classes are its leaves (no children),
    whose ILSVRC2012_IDs are not in wnid order.

    Raises:
      FileNotFoundError: when there is no devkit.
    """
    import scipy.io

    folder, archive = source / DEVKIT_FOLDER, source / DEVKIT_ARCHIVE
    if folder.is_dir():
        meta, truth = (folder / DEVKIT_META).read_bytes(), (folder / DEVKIT_VAL_LABELS).read_text()
    elif archive.is_file():
        with tarfile.open(archive, "r:gz") as tar:
            members = {m.name: m for m in tar if m.isfile()}
            meta = tar.extractfile(members[f"{DEVKIT_FOLDER}/{DEVKIT_META}"]).read()
            truth = tar.extractfile(members[f"{DEVKIT_FOLDER}/{DEVKIT_VAL_LABELS}"]).read().decode()
    else:
        raise FileNotFoundError(
            f"{source} holds neither {DEVKIT_ARCHIVE} nor {DEVKIT_FOLDER}/: the labels of flat validation images "
            "come from the ILSVRC 2012 devkit."
        )
    synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    wnid = {
        int(number): str(name)
        for number, name, children in zip(synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"])
        if int(children) == 0
    }
    return [wnid[int(line)] for line in truth.split()]


def label_flat_val(images: Sequence[tuple[str, ImageFile]], wnids: Sequence[str], classes: Sequence[str]) -> Labeled:
    """Each flat validation image (named ``ILSVRC2012_val_NNNNNNNN.JPEG``) with the label of its devkit wnid.

    Raises:
      ValueError: an image named otherwise, numbered past the devkit's list, or of a wnid train does not have.
    """
    label = {wnid: index for index, wnid in enumerate(classes)}
    labeled = []
    for name, image in sorted(images, key=lambda pair: pair[0]):
        match = VAL_NAME.fullmatch(name)
        if match is None or not 1 <= int(match.group(1)) <= len(wnids):
            raise ValueError(
                f"{image.name}: a flat validation image must be named ILSVRC2012_val_NNNNNNNN.JPEG with NNNNNNNN "
                f"from 1 to {len(wnids)} (the devkit's images)."
            )
        wnid = wnids[int(match.group(1)) - 1]
        if wnid not in label:
            raise ValueError(f"{image.name} is of class {wnid}, which the train split does not have.")
        labeled.append((image, label[wnid]))
    if not labeled:
        raise FileNotFoundError("no validation images (ILSVRC2012_val_*.JPEG) found.")
    return labeled


def train_images(source: pathlib.Path) -> tuple[list[str], Labeled]:
    """The train split's classes and labeled images: ``train/`` if it is a folder, else the train archive."""
    if (source / "train").is_dir() or not (source / TRAIN_ARCHIVE).is_file():
        return list_split(source / "train", None)
    return list_train_archive(source / TRAIN_ARCHIVE)


def val_images(source: pathlib.Path, classes: Sequence[str]) -> Labeled:
    """The validation split's labeled images: ``val/`` (class folders, or flat with the devkit), else its archive."""
    folder, archive = source / "val", source / VAL_ARCHIVE
    if folder.is_dir():
        entries = list(folder.iterdir())
        flat = [(p.name, ImageFile(p, str(p))) for p in entries if p.is_file() and _is_image(p.name)]
        if flat and not any(p.is_dir() for p in entries):
            return label_flat_val(flat, devkit_val_wnids(source), classes)
        return list_split(folder, classes)[1]
    if archive.is_file():
        with tarfile.open(archive, "r:") as tar:
            flat = _members(archive, 0, tar)
        return label_flat_val(flat, devkit_val_wnids(source), classes)
    raise FileNotFoundError(
        f"{folder} is not a folder (expected val/<wnid>/*.JPEG in --source, or a flat val/*.JPEG or {VAL_ARCHIVE} "
        f"with {DEVKIT_ARCHIVE})."
    )


# ----------------------------------------------------------------------------------------
# Writing.


def _read_checked(image: ImageFile) -> bytes:
    """The file's bytes, after Pillow has decoded them whole (a broken or cut file fails here, not in training)."""
    data = image.read()
    try:
        with Image.open(io.BytesIO(data)) as decoded:
            decoded.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{image.name} is not an image Pillow can decode: {error}") from error
    return data


def write_split(images: Labeled, output: pathlib.Path, split: str, shards: int, seed: int, threads: int) -> int:
    """Writes ``images`` in a shuffled order as ``shards`` ArrayRecord files; returns the record count."""
    order = np.random.default_rng(seed).permutation(len(images))
    shards = max(1, min(shards, len(images)))
    bounds = np.linspace(0, len(images), shards + 1).round().astype(int)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for shard in range(shards):
            chosen = [images[i] for i in order[bounds[shard] : bounds[shard + 1]]]
            writer = ArrayRecordWriter(str(output / input_pipeline.shard_name(split, shard, shards)), WRITER_OPTIONS)
            for (_, label), data in zip(chosen, pool.map(_read_checked, [image for image, _ in chosen])):
                writer.write(input_pipeline.encode_record(label, data))
            writer.close()
    return len(images)


def prepare(source: pathlib.Path, output: pathlib.Path, train_shards: int, val_shards: int, seed: int, threads: int):
    """Writes both splits and ``info.json`` into ``output``; returns the info."""
    classes, train = train_images(source)
    val = val_images(source, classes)
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
    parser.add_argument(
        "--source",
        type=pathlib.Path,
        required=True,
        help=f"folder with {TRAIN_ARCHIVE}, {VAL_ARCHIVE} and {DEVKIT_ARCHIVE}, or train/<wnid>/ and val/<wnid>/",
    )
    parser.add_argument("--output", type=pathlib.Path, required=True, help="folder for the shards and info.json")
    parser.add_argument("--train-shards", type=_positive_int, default=1024)
    parser.add_argument("--val-shards", type=_positive_int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the order the records are written in")
    parser.add_argument("--threads", type=_positive_int, default=16, help="threads reading and decoding the images")
    args = parser.parse_args(argv)
    try:
        info = prepare(args.source, args.output, args.train_shards, args.val_shards, args.seed, args.threads)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"{info['train']} train and {info['val']} val records of {len(info['classes'])} classes in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
