"""``examples/imagenet/prepare.py`` from what users download: the three official archives, read in place.

Tiny archives of the official structure are made here: ``ILSVRC2012_img_train.tar``
(one tar per wnid inside), ``ILSVRC2012_img_val.tar`` (flat
``ILSVRC2012_val_NNNNNNNN.JPEG``) and ``ILSVRC2012_devkit_t12.tar.gz`` (``meta.mat``,
whose ILSVRC2012_IDs are not in wnid order and whose synsets include non-leaf ones, and
the ground truth: one ID a line). The expected records are each image's bytes with its
label, the position of its wnid among the train split's sorted wnids, worked out here
from the files made, and read back without the example's code.
"""

import io
import json
import tarfile

import grain
import numpy as np
import prepare
import pytest

import helpers

# examples/imagenet's own requirements, not the package's minimums: make test-min leaves it out.
pytestmark = pytest.mark.launches


# Made in this order, which is not their sorted order; their ILSVRC2012_IDs are in neither.
WNIDS = ["n00000300", "n00000100", "n00000400", "n00000200"]
IDS = {"n00000300": 2, "n00000100": 4, "n00000400": 1, "n00000200": 3}
LABELS = {wnid: index for index, wnid in enumerate(sorted(WNIDS))}
# The val images' classes, in file order: none of n00000200 (label 1), so that labels
# numbered from val's own classes would shift.
VAL_WNIDS = ["n00000400", "n00000100", "n00000300", "n00000400", "n00000100"]


def jpeg(seed):
    rng = np.random.default_rng(seed)
    return helpers.photo_jpeg(*(int(v) for v in rng.integers(20, 50, size=2)), seed=seed, quality=70)


def train_files():
    return {wnid: {f"{wnid}_{i}.JPEG": jpeg(10 * c + i) for i in range(2 + c % 2)} for c, wnid in enumerate(WNIDS)}


def val_files():
    return {f"ILSVRC2012_val_{i + 1:08d}.JPEG": jpeg(100 + i) for i in range(len(VAL_WNIDS))}


def add(tar, name, data):
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))


def tar_bytes(files, mode="w"):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            add(tar, name, data)
    return buffer.getvalue()


def meta_mat():
    """``meta.mat``'s ``synsets``: the four classes as leaves, and two synsets above them."""
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height"]
    rows = [(IDS[wnid], wnid, "a class", "", 0, np.zeros((1, 0)), 0) for wnid in WNIDS]
    rows += [(5, "n09999990", "a group", "", 2, np.array([[1, 2]]), 1), (6, "n09999991", "all", "", 1, [[5]], 2)]
    synsets = np.empty((len(rows), 1), dtype=[(name, "O") for name in fields])
    for index, row in enumerate(rows):
        synsets[index, 0] = tuple(np.array([[value]], np.float64) if isinstance(value, int) else value for value in row)
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"synsets": synsets})
    return buffer.getvalue()


def devkit_files():
    truth = "".join(f"{IDS[wnid]}\n" for wnid in VAL_WNIDS).encode()
    return {
        "ILSVRC2012_devkit_t12/data/meta.mat": meta_mat(),
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": truth,
        "ILSVRC2012_devkit_t12/COPYING": b"",
    }


def read_records(output, split):
    paths = sorted(str(p) for p in output.glob(f"{split}-*.array_record"))
    source = grain.sources.ArrayRecordDataSource(paths)
    return [(int.from_bytes(source[i][:4], "little", signed=True), source[i][4:]) for i in range(len(source))]


def expected_train(files):
    return sorted((LABELS[wnid], data) for wnid, images in files.items() for data in images.values())


def expected_val(files):
    return sorted((LABELS[wnid], data) for wnid, data in zip(VAL_WNIDS, files.values()))


def check_output(output, train, val):
    info = json.loads((output / "info.json").read_text())
    assert info == {"classes": sorted(WNIDS), "train": len(expected_train(train)), "val": len(VAL_WNIDS)}
    assert sorted(read_records(output, "train")) == expected_train(train)
    assert sorted(read_records(output, "val")) == expected_val(val)


def test_the_three_official_archives_are_read_in_place(tmp_path):
    source = tmp_path / "downloads"
    source.mkdir()
    train, val = train_files(), val_files()
    class_tars = {f"{wnid}.tar": tar_bytes(images) for wnid, images in train.items()}
    (source / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes(class_tars))
    (source / "ILSVRC2012_img_val.tar").write_bytes(tar_bytes(val))
    (source / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(tar_bytes(devkit_files(), "w:gz"))
    output = tmp_path / "prepared"
    assert prepare.main(["--source", str(source), "--output", str(output), "--train-shards", "2"]) == 0
    check_output(output, train, val)
    assert sorted(p.name for p in source.iterdir()) == [
        "ILSVRC2012_devkit_t12.tar.gz",
        "ILSVRC2012_img_train.tar",
        "ILSVRC2012_img_val.tar",
    ]


def write_folders(folder, files):
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def test_a_flat_val_folder_takes_its_labels_from_the_unpacked_devkit(tmp_path):
    train, val = train_files(), val_files()
    for wnid, images in train.items():
        write_folders(tmp_path / "train" / wnid, images)
    write_folders(tmp_path / "val", val)
    for name, data in devkit_files().items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    prepare.prepare(tmp_path, tmp_path / "prepared", 1, 1, 0, 2)
    check_output(tmp_path / "prepared", train, val)


def test_val_class_folders_are_labeled_by_the_train_classes_when_val_lacks_one(tmp_path):
    train, val = train_files(), val_files()
    for wnid, images in train.items():
        write_folders(tmp_path / "train" / wnid, images)
    for (name, data), wnid in zip(val.items(), VAL_WNIDS):
        (tmp_path / "val" / wnid).mkdir(parents=True, exist_ok=True)
        (tmp_path / "val" / wnid / name).write_bytes(data)
    prepare.prepare(tmp_path, tmp_path / "prepared", 1, 1, 0, 2)
    check_output(tmp_path / "prepared", train, val)


def test_a_cut_image_stops_the_preparation_naming_its_file(tmp_path):
    train = train_files()
    train[WNIDS[1]][f"{WNIDS[1]}_0.JPEG"] = train[WNIDS[1]][f"{WNIDS[1]}_0.JPEG"][:-200]
    for wnid, images in train.items():
        write_folders(tmp_path / "train" / wnid, images)
    for wnid, images in train.items():
        write_folders(tmp_path / "val" / wnid, dict(list(images.items())[1:]))
    with pytest.raises(ValueError, match=rf"{WNIDS[1]}_0\.JPEG is not an image Pillow can decode"):
        prepare.prepare(tmp_path, tmp_path / "prepared", 1, 1, 0, 2)


def test_flat_val_images_without_the_devkit_or_with_other_names_are_refused(tmp_path):
    for wnid, images in train_files().items():
        write_folders(tmp_path / "train" / wnid, images)
    write_folders(tmp_path / "val", val_files())
    with pytest.raises(FileNotFoundError, match=r"neither ILSVRC2012_devkit_t12\.tar\.gz nor ILSVRC2012_devkit_t12/"):
        prepare.prepare(tmp_path, tmp_path / "prepared", 1, 1, 0, 2)
    (tmp_path / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(tar_bytes(devkit_files(), "w:gz"))
    (tmp_path / "val" / "ILSVRC2012_val_00000009.JPEG").write_bytes(jpeg(9))
    with pytest.raises(ValueError, match=r"ILSVRC2012_val_00000009\.JPEG: .*NNNNNNNN from 1 to 5"):
        prepare.prepare(tmp_path, tmp_path / "prepared", 1, 1, 0, 2)


def test_without_any_val_source_the_message_lists_the_forms_accepted(tmp_path):
    for wnid, images in train_files().items():
        write_folders(tmp_path / "train" / wnid, images)
    with pytest.raises(FileNotFoundError, match=r"val/<wnid>/\*\.JPEG .* ILSVRC2012_img_val\.tar"):
        prepare.prepare(tmp_path, tmp_path / "prepared", 1, 1, 0, 2)
