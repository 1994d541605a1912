"""NumPy references of DropBlock's rates, written out from the paper and by brute force.

Tests take their expected values from here, not from the library's own ``seed_rate`` and
``expected_keep_fraction``: a bug in those would otherwise move the expectation with it.
Everything is float64 and loops over positions; keep the maps small.
"""

import numpy as np


def clipped_block(sizes, block):
    """The block as DropBlock uses it: an int is a cube over the map's axes, each size clipped to the map."""
    block = (block,) * len(sizes) if isinstance(block, int) else tuple(block)
    return tuple(min(b, s) for b, s in zip(block, sizes))


def paper_gamma(keep_prob, sizes, block, seed_region="valid"):
    """Eq. 1 of the paper, axis by axis: ``(1 - keep_prob) / prod(k) * prod(s) / prod(s - k + 1)``.

    With ``seed_region="everywhere"`` every position is a seed position, so the last
    factor is 1. Clipped to [0, 1]; ``keep_prob = 0`` drops everything (gamma 1).
    """
    if keep_prob == 0:
        return 1.0
    block = clipped_block(sizes, block)
    gamma = 1.0 - keep_prob
    for size, k in zip(sizes, block):
        gamma /= k
        if seed_region == "valid":
            gamma *= size / (size - k + 1)
    return min(max(gamma, 0.0), 1.0)


def cover_counts(sizes, block, seed_region="valid"):
    """How many seeds' blocks cover each position of the map, by marking every block.

    Valid seeds sit where the whole block fits, and seed ``q`` drops ``q .. q + k - 1``;
    everywhere seeds sit at every position ``p`` and drop ``p - (k - 1) // 2 ..
    p + k // 2``, cut at the border, except that a block as large as the map along an
    axis spans that whole axis.
    """
    sizes = tuple(sizes)
    block = clipped_block(sizes, block)
    counts = np.zeros(sizes, np.int64)
    seed_sizes = [s - k + 1 for s, k in zip(sizes, block)] if seed_region == "valid" else sizes
    for seed in np.ndindex(*seed_sizes):
        region = []
        for p, k, s in zip(seed, block, sizes):
            if seed_region == "valid":
                start, stop = p, p + k
            elif k == s:
                start, stop = 0, s
            else:
                start, stop = p - (k - 1) // 2, p + k // 2 + 1
            region.append(slice(max(start, 0), min(stop, s)))
        counts[tuple(region)] += 1
    return counts


def expected_keep_fraction(gamma, sizes, block, seed_region="valid"):
    """Mean over positions of ``(1 - gamma) ** covering_seeds``: a unit is kept when no covering seed fires."""
    return float(np.mean((1.0 - gamma) ** cover_counts(sizes, block, seed_region)))


def calibrated_gamma(keep_prob, sizes, block, seed_region="valid"):
    """The gamma whose expected keep fraction is ``keep_prob``, by bisection (the fraction falls as gamma grows)."""
    counts = cover_counts(sizes, block, seed_region)
    low, high = 0.0, 1.0
    for _ in range(200):
        middle = (low + high) / 2
        if np.mean((1.0 - middle) ** counts) > keep_prob:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def gamma(keep_prob, sizes, block, seed_region="valid", mode="paper"):
    """The reference gamma of either mode."""
    if mode == "paper":
        return paper_gamma(keep_prob, sizes, block, seed_region)
    return calibrated_gamma(keep_prob, sizes, block, seed_region)
