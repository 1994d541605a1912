"""Data for the demo: scikit-learn's bundled digits, or the user's own ``.npz`` file."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

from dropblock_jax._checks import check_int

NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


class DataError(ValueError):
    """A data file that cannot be used, with a message that says why and what is expected."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and held-out images (NHWC float32, standardized) and integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    def describe(self) -> str:
        """One line naming the data set, its sizes, image shape and number of classes."""
        _, h, w, c = self.x_train.shape
        return (
            f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} held-out images, "
            f"{h}x{w}x{c}, {self.num_classes} classes"
        )


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear upscaling of NHWC images by an integer ``factor``.

    Bilinear (not nearest) interpolation makes neighbouring pixels correlated, as in
    natural images: the situation DropBlock is designed for.

    Examples:
      >>> import numpy as np
      >>> from dropblock_jax.demo.data import upscale
      >>> upscale(np.zeros((2, 8, 8, 1), np.float32), 2).shape
      (2, 16, 16, 1)
    """
    factor = check_int("scale", factor, low=1)
    if factor == 1:
        return np.asarray(images, np.float32)
    n, h, w, c = images.shape
    resized = jax.image.resize(jnp.asarray(images, jnp.float32), (n, h * factor, w * factor, c), "bilinear")
    return np.asarray(resized)


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of ``size`` samples with the classes as balanced as the data allows."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    # Round-robin over shuffled classes: balanced, and deterministic for a seed.
    order = [idx[i] for i in range(max(map(len, per_class))) for idx in per_class if i < len(idx)]
    return np.sort(np.asarray(order[:size], np.int64))


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x_train.mean(axis=(0, 1, 2), keepdims=True)
    std = x_train.std(axis=(0, 1, 2), keepdims=True) + 1e-6
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def load_digits(train_size: int = 300, scale: int = 2, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, shipped with the package).

    Args:
      train_size: images in the training set, drawn class-balanced; all others are
        held out.
      scale: integer upscaling factor (bilinear); 2 gives 16x16 images.
      split_seed: seed of the train/held-out split.

    Returns:
      A :class:`Dataset`.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = digits.images.astype(np.float32)[..., None] / 16.0
    labels = digits.target.astype(np.int32)
    train_size = check_int("train_size", train_size, 10, len(labels) - 10, f" for the digits ({len(labels)} images)")
    train = stratified_subset(labels, train_size, split_seed)
    test = np.setdiff1d(np.arange(len(labels)), train)
    images = upscale(images, scale)
    x_train, x_test = _standardize(images[train], images[test])
    return Dataset(x_train, labels[train], x_test, labels[test], 10, f"digits (sklearn, upscaled x{scale})")


def _labels(name: str, y: npt.ArrayLike, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{name} must be 1-D with one label per image ({n}), got shape {y.shape}.")
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))):
        raise DataError(f"{name} must hold integer class labels, got dtype {y.dtype}.")
    if n and y.min() < 0:
        raise DataError(f"{name} must hold class labels >= 0, got {int(y.min())}.")
    return y.astype(np.int32)


def load_npz(path: str | os.PathLike, train_size: int | None = None, scale: int = 1, split_seed: int = 0) -> Dataset:
    """One's own data: an ``.npz`` with ``x_train, y_train, x_test, y_test``.

    Images are NHWC (``(N, H, W, C)``, any real dtype); labels are integer classes
    0..K-1. Images are standardized with the training set's per-channel mean and std.

    Args:
      path: the ``.npz`` file.
      train_size: if given, a class-balanced subset of the training images.
      scale: integer upscaling factor (bilinear).
      split_seed: seed of the subset.

    Returns:
      A :class:`Dataset`.

    Raises:
      FileNotFoundError: when ``path`` does not exist.
      DataError: for missing arrays, wrong shapes or non-integer labels.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path!r}: no such file; give an .npz with arrays {', '.join(NPZ_ARRAYS)}.")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"--data {path!r} is not a readable .npz file ({error}).") from error
    with archive:
        missing = [name for name in NPZ_ARRAYS if name not in archive.files]
        if missing:
            raise DataError(
                f"--data {path!r} lacks array(s) {', '.join(missing)}; it has {sorted(archive.files)} "
                f"and needs {', '.join(NPZ_ARRAYS)}."
            )
        arrays = {name: np.asarray(archive[name]) for name in NPZ_ARRAYS}
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    for name, x in (("x_train", x_train), ("x_test", x_test)):
        if x.ndim != 4:
            raise DataError(f"{name} must be 4-D NHWC images (N, H, W, C), got shape {x.shape}.")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise DataError(f"{name} must hold real numbers, got dtype {x.dtype}.")
        if len(x) == 0:
            raise DataError(f"{name} must hold at least one image, got shape {x.shape}.")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"x_train and x_test must have the same (H, W, C), got {x_train.shape[1:]} and {x_test.shape[1:]}."
        )
    y_train = _labels("y_train", arrays["y_train"], len(x_train))
    y_test = _labels("y_test", arrays["y_test"], len(x_test))
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if train_size is not None:
        train_size = check_int("train_size", train_size, 1, len(x_train), " for this file")
        keep = stratified_subset(y_train, train_size, split_seed)
        x_train, y_train = x_train[keep], y_train[keep]
    x_train, x_test = _standardize(
        upscale(x_train.astype(np.float32), scale), upscale(x_test.astype(np.float32), scale)
    )
    return Dataset(x_train, y_train, x_test, y_test, num_classes, os.path.basename(path))


def occlusion_corners(count: int, height: int, width: int, side: int, seed: int = 0) -> np.ndarray:
    """Top-left corners of ``count`` random ``side x side`` squares inside an image.

    Uniform over the positions where the whole square lies inside the image; the same
    ``seed`` gives the same squares, so every model is scored on the same occlusions.

    Returns:
      An int array ``(count, 2)`` of (row, column).

    Raises:
      TypeError: when ``side`` is not an int.
      ValueError: when it is not in [1, min(height, width)].
    """
    side = check_int("side", side, 1, min(height, width), " (the image's smaller side)")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, height - side + 1, count)
    cols = rng.integers(0, width - side + 1, count)
    return np.stack([rows, cols], axis=1)


def occlude(images: np.ndarray, side: int, fill: npt.ArrayLike, seed: int = 0) -> np.ndarray:
    """A copy of NHWC ``images`` with one random ``side x side`` square each set to ``fill``.

    The squares are :func:`occlusion_corners` for ``seed``. The demo fills with the
    training set's per-channel mean, so an occluded region carries no information and
    no out-of-range value.

    Args:
      images: ``(N, H, W, C)`` images.
      side: the square's side, in pixels.
      fill: a scalar or one value per channel.
      seed: seed of the squares' positions.

    Raises:
      TypeError: for a ``side`` that is not an int.
      ValueError: for images that are not 4-D, a bad ``side`` or a ``fill`` that is
        neither a scalar nor one value per channel.

    Examples:
      >>> import numpy as np
      >>> from dropblock_jax.demo.data import occlude
      >>> out = occlude(np.ones((3, 16, 16, 1), np.float32), side=8, fill=0.0)
      >>> (out == 0).sum(axis=(1, 2, 3)).tolist()  # a quarter of each image
      [64, 64, 64]
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D NHWC (N, H, W, C), got shape {images.shape}.")
    n, h, w, c = images.shape
    fill = np.asarray(fill, images.dtype)
    if fill.shape not in ((), (c,), (1, 1, c), (1, 1, 1, c)):
        raise ValueError(f"fill must be a scalar or one value per channel ({c}), got shape {fill.shape}.")
    out = images.copy()
    for i, (row, col) in enumerate(occlusion_corners(n, h, w, side, seed)):
        out[i, row : row + side, col : col + side, :] = fill.reshape(-1)
    return out
