"""What several test modules share: references written out from the paper, assertions, the layers' contract.

Test modules import from here (``from helpers import ...``) and never from each other.
Expected values come from the NumPy references below, not from the library's own
``seed_rate`` and ``expected_keep_fraction``: a bug in those would otherwise move the
expectation with it.
"""

import pathlib
import tomllib

import jax
import numpy as np
import pytest
from flax import nnx
from numpy.lib.stride_tricks import sliding_window_view

from dropblock_jax import drop_block
from dropblock_jax.models import ResNet

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# ---- assertions ----


def assert_mean_matches(samples, expected, standard_errors=5.0, slack=1e-6):
    """Asserts that the mean of independent ``samples`` equals ``expected``.

    The tolerance is ``standard_errors`` times the standard error measured from the
    samples themselves, plus a small slack for float32 rounding.
    """
    samples = np.asarray(samples, np.float64).ravel()
    mean = samples.mean()
    standard_error = samples.std(ddof=1) / np.sqrt(samples.size)
    tolerance = standard_errors * standard_error + slack
    assert abs(mean - expected) <= tolerance, (
        f"mean {mean:.6f} differs from expected {float(expected):.6f} by more than "
        f"{standard_errors} standard errors ({tolerance:.2e}); n={samples.size}"
    )


def bits(array):
    """The bit pattern of an array, so that NaN and -0.0 compare exactly."""
    array = np.asarray(array)
    return array.view(np.dtype(f"u{array.dtype.itemsize}"))


def sliced_without_materializing(fn, *args):
    """Runs ``fn`` under jit after checking XLA computes only its (small) result.

    The hash is elementwise in the position, so XLA fuses the slice into it; should that
    ever stop, this fails here instead of allocating an array of 2**32 elements.
    """
    compiled = jax.jit(fn).lower(*args).compile()
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    assert temp_bytes < 2**20, f"the sliced program would allocate {temp_bytes} bytes of temporaries"
    return np.asarray(compiled(*args))


def available_key_impls(names):
    """The PRNG key implementations among ``names`` that this JAX has (older ones lack philox, threefry4x32)."""
    available = []
    for name in names:
        try:
            jax.random.key(0, impl=name)
        except ValueError:
            continue
        available.append(name)
    return available


# ---- NumPy references of the rates, written out from the paper and by brute force ----
# Everything is float64 and loops over positions; keep the maps small.


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


# ---- NumPy references of the block geometry ----


def _first_offset(block, seed_region):
    """Offset from a seed's grid index to the first position of its block."""
    return 0 if seed_region == "valid" else -((block - 1) // 2)


def dilate_reference(seeds, blocks, sizes, seed_region):
    """Brute force: mark the (clipped) block of every seed."""
    dropped = np.zeros(sizes, bool)
    for index in zip(*np.nonzero(seeds)):
        region = tuple(
            slice(max(0, i + _first_offset(b, seed_region)), min(s, i + _first_offset(b, seed_region) + b))
            for i, b, s in zip(index, blocks, sizes)
        )
        dropped[region] = True
    return dropped


def is_union_of_blocks(dropped, blocks, seed_region):
    """True if ``dropped`` is exactly the union of the (clipped) blocks it contains."""
    blocks = tuple(min(b, s) for b, s in zip(blocks, dropped.shape))
    if seed_region == "valid":
        padded = dropped
    else:
        # Outside the map counts as dropped, so blocks cut at the border qualify.
        padded = np.pad(dropped, [((b - 1) // 2, b // 2) for b in blocks], constant_values=True)
    whole = sliding_window_view(padded, blocks).reshape(*np.array(padded.shape) - blocks + 1, -1).all(-1)
    return np.array_equal(dilate_reference(whole, blocks, dropped.shape, seed_region), dropped)


# ---- the layers: what every layer shares with drop_block ----

# The keyword options of drop_block and their defaults, as the public contract fixes them;
# every layer takes the same ones.
DROP_BLOCK_OPTION_DEFAULTS = {
    "spatial_axes": None,
    "broadcast_dims": (),
    "seed_region": "valid",
    "gamma": "paper",
    "normalize": "batch",
    "axis_name": None,
}

# What a port of a dropout layer passes: a positional rate (and block size), or another
# library's name for the rate. Spelt out here rather than read from dropblock_jax._layer_options,
# so that a name dropped there fails these tests.
PORTED_CALLS = [
    ((0.1,), {}, "the positional argument 0.1"),
    ((0.1, 7), {}, "the positional arguments 0.1, 7"),
    ((), {"rate": 0.1}, "rate=0.1"),
    ((), {"drop_prob": 0.1}, "drop_prob=0.1"),
    ((), {"p": 0.1}, "p=0.1"),
    ((), {"drop_rate": 0.1}, "drop_rate=0.1"),
]


def assert_keep_prob_conversion_error(build, layer_name, received):
    """``build()`` raises the TypeError that converts the ported ``received`` to keep_prob = 1 - rate."""
    with pytest.raises(TypeError) as info:
        build()
    message = str(info.value)
    assert message.startswith(f"{layer_name} got {received}, but it takes keep_prob"), message
    assert "by keyword" in message and "keep_prob = 1 - r" in message, message
    assert f"{layer_name}(keep_prob=0.9)" in message, message


# Layer arguments that are wrong for every input: each layer's DropBlock(keep_prob=0.9,
# block_size=3, **arguments) must refuse them at construction as drop_block refuses them
# at the call.
BAD_LAYER_ARGUMENTS = [
    {"keep_prob": 1.5},
    {"keep_prob": -0.1},
    {"keep_prob": float("nan")},
    {"keep_prob": "0.9"},
    {"keep_prob": np.full(2, 0.9)},
    {"keep_prob": jax.numpy.ones(2)},
    {"block_size": 0},
    {"block_size": (3, 0)},
    {"block_size": 2.5},
    {"block_size": (3, 3), "spatial_axes": (1,)},
    {"block_size": (3,), "spatial_axes": (1, 2)},
    {"spatial_axes": ()},
    {"spatial_axes": (1, 1)},
    {"spatial_axes": (1.0, 2)},
    {"spatial_axes": "hw"},
    {"broadcast_dims": ("c",)},
    {"broadcast_dims": (0, 0)},
    {"spatial_axes": (1, 2), "broadcast_dims": (2,)},
    {"seed_region": "same"},
    {"gamma": "exact"},
    {"normalize": "mean"},
    {"axis_name": 0},
]


def drop_block_error(x, arguments):
    """The exception type and message of drop_block on ``x`` with keep_prob 0.9, block 3 and ``arguments``."""
    try:
        drop_block(jax.random.key(0), x, **{"keep_prob": 0.9, "block_size": 3, **arguments})
    except (TypeError, ValueError) as error:
        return type(error), str(error)
    raise AssertionError(f"drop_block accepted {arguments}")


# ---- models ----


def small_resnet(regularizer="dropblock", keep_prob=0.8, **kwargs):
    """A three-stage ResNet of one basic block a stage, for 16x16 single-channel images."""
    return ResNet(
        10,
        widths=(4, 8, 8),
        regularizer=regularizer,
        keep_prob=keep_prob,
        block_size=3,
        rngs=nnx.Rngs(params=0, dropout=1),
        **kwargs,
    )


def layers_of(model, kind):
    """The layers of ``kind`` inside ``model``, by graph path."""
    return {path: node for path, node in nnx.iter_graph(model) if isinstance(node, kind)}
