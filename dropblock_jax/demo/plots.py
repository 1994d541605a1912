"""The demo's pictures: a gallery of DropBlock masks and held-out accuracy curves.

matplotlib is imported inside the functions, so the package imports without it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import jax
import numpy as np

from dropblock_jax import block_mask

GALLERY_BLOCK_SIZES = (1, 3, 7)
GALLERY_KEEP_PROBS = (0.9, 0.7, 0.5)
GALLERY_GAMMAS = ("paper", "calibrated")
GALLERY_SHARING = (("per-channel", ()), ("shared", (-1,)))


def _pyplot() -> ModuleType:
    import matplotlib

    # A file backend: the demo runs in terminals, CI and notebooks' subprocesses alike.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mask_gallery_data(size: int = 32, channels: int = 3, batch: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """The masks the gallery shows, with the measured kept fraction of each setting.

    Args:
      size: height and width of the feature map.
      channels: channels per map; 3 so that a mask can be shown as an RGB picture.
      batch: maps drawn per setting; the kept fraction is measured over all of them.
      seed: PRNG seed.

    Returns:
      A list of dicts with keys ``block_size``, ``keep_prob``, ``gamma``, ``sharing``,
      ``mask`` (the first map, ``(size, size, channels)`` bool) and ``kept`` (the
      measured fraction of kept units).

    Examples:
      >>> from dropblock_jax.demo.plots import mask_gallery_data
      >>> cells = mask_gallery_data(size=8, batch=2)
      >>> len(cells), cells[0]["mask"].shape
      (36, (8, 8, 3))
    """
    key = jax.random.key(seed)
    cells = []
    for gamma in GALLERY_GAMMAS:
        for block_size in GALLERY_BLOCK_SIZES:
            for keep_prob in GALLERY_KEEP_PROBS:
                for sharing, broadcast_dims in GALLERY_SHARING:
                    key, sub = jax.random.split(key)
                    mask = np.asarray(
                        block_mask(
                            sub,
                            (batch, size, size, channels),
                            keep_prob,
                            block_size,
                            broadcast_dims=broadcast_dims,
                            gamma=gamma,
                        )
                    )
                    cells.append(
                        dict(
                            block_size=block_size,
                            keep_prob=keep_prob,
                            gamma=gamma,
                            sharing=sharing,
                            mask=mask[0],
                            kept=float(mask.mean()),
                        )
                    )
    return cells


def plot_mask_gallery(path: str | os.PathLike, size: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """Saves the mask gallery to ``path`` and returns its cells (see :func:`mask_gallery_data`).

    Rows: block size x gamma rule; columns: keep_prob x (per-channel | shared across
    channels). Each mask is drawn as an RGB picture of its 3 channels: white is kept
    in every channel, black dropped in every channel, a colour kept in some only.
    """
    plt = _pyplot()
    cells = mask_gallery_data(size=size, seed=seed)
    rows = [(g, k) for g in GALLERY_GAMMAS for k in GALLERY_BLOCK_SIZES]
    cols = [(p, s) for p in GALLERY_KEEP_PROBS for s, _ in GALLERY_SHARING]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.9 * len(cols), 2.0 * len(rows)))
    for cell in cells:
        r = rows.index((cell["gamma"], cell["block_size"]))
        c = cols.index((cell["keep_prob"], cell["sharing"]))
        ax = axes[r, c]
        ax.imshow(cell["mask"].astype(np.float32), interpolation="nearest")
        ax.set_title(f"keep {cell['keep_prob']}, {cell['sharing']}\nkept {cell['kept']:.3f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if c == 0:
            ax.set_ylabel(f"block {cell['block_size']}\n{cell['gamma']} gamma", fontsize=9)
    fig.suptitle(
        f"DropBlock masks on {size}x{size}x3 maps (white kept, black dropped, colour: dropped in some channels)\n"
        "'kept' is the fraction measured over 64 maps; the calibrated gamma makes it equal keep_prob on average",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return cells


def plot_curves(path: str | os.PathLike, results: dict, title: str = "") -> None:
    """Saves held-out accuracy per epoch per method: the mean over seeds and its min-max band.

    Args:
      path: the ``.png`` to write.
      results: method name -> list of run dicts with a ``curve`` of ``(epoch, accuracy)``.
      title: the figure title.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, runs in results.items():
        epochs = np.asarray([e for e, _ in runs[0]["curve"]])
        acc = np.asarray([[a for _, a in run["curve"]] for run in runs]) * 100
        mean = acc.mean(axis=0)
        (line,) = ax.plot(epochs, mean, label=f"{name} ({mean[-1]:.1f}%)")
        ax.fill_between(epochs, acc.min(axis=0), acc.max(axis=0), color=line.get_color(), alpha=0.15)
    # Zoom on the second half of training, where the methods differ.
    late = [a for runs in results.values() for run in runs for _, a in run["curve"][len(run["curve"]) // 2 :]]
    low = max(0.0, min(late) * 100 - 3)
    ax.set_ylim(low, 100)
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title or "held-out accuracy: mean over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_robustness(path: str | os.PathLike, results: dict, keep_probs: Sequence[float], title: str = "") -> None:
    """Saves held-out accuracy against inference keep_prob, one panel per inference block size.

    One line per method: the mean over seeds, with the min..max band.

    Args:
      path: the ``.png`` to write.
      results: method name -> list of run dicts with ``robustness``: str(block size) ->
        accuracy (0..1) per keep_prob.
      keep_probs: the inference keep_probs, descending from 1.
      title: the figure title.
    """
    plt = _pyplot()
    blocks = list(next(iter(results.values()))[0]["robustness"])
    fig, axes = plt.subplots(1, len(blocks), figsize=(5.2 * len(blocks), 4.4), sharey=True, squeeze=False)
    keeps = np.asarray(keep_probs)
    for ax, block in zip(axes[0], blocks):
        for name, runs in results.items():
            acc = np.asarray([run["robustness"][block] for run in runs]) * 100
            mean = acc.mean(axis=0)
            (line,) = ax.plot(keeps, mean, "o-", markersize=3, label=name)
            ax.fill_between(keeps, acc.min(axis=0), acc.max(axis=0), color=line.get_color(), alpha=0.15)
        ax.invert_xaxis()  # more is dropped to the right
        ax.set_xlabel("inference keep_prob (last stage)")
        ax.set_title(f"block size {block}" + (" (plain dropout)" if block == "1" else ""))
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("held-out accuracy (%)")
    axes[0, -1].legend(loc="lower left", fontsize=9)
    fig.suptitle(title or "DropBlock at inference: mean over seeds, band = min..max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
