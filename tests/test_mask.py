"""Geometry of block masks: alignment, regions, shapes, broadcasting."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dropblock_jax as db
from dropblock_jax import _checks, _geometry, _mask
from helpers import assert_mean_matches, dilate_reference, is_union_of_blocks


def _unpack(packed_words, axis, size, per_word=32):
    """Flag ``i`` of word ``j`` along ``axis`` is entry ``per_word * j + i``."""
    words = np.asarray(packed_words).astype("<u4")
    bits = np.unpackbits(words.view(np.uint8).reshape(*words.shape, 4), axis=-1, bitorder="little")
    bits = np.moveaxis(bits[..., :per_word], -1, axis + 1)
    shape = list(words.shape)
    shape[axis] *= per_word
    return np.take(bits.reshape(shape), np.arange(size), axis=axis)


@pytest.mark.parametrize("seed_region", ["valid", "everywhere"])
@pytest.mark.parametrize(
    "sizes,block,channels",
    [((9, 9), (3, 3), 2), ((8, 11), (2, 4), 12), ((12,), (5,), 40), ((5, 6, 7), (2, 3, 3), 3)],
)
def test_mask_is_the_dilation_of_its_seeds(seed_region, sizes, block, channels):
    # White box: rebuild the mask from the very seeds the mask draws, position by position.
    shape = (3, *sizes, channels)
    layout = _geometry.mask_layout(shape, block, tuple(range(1, 1 + len(sizes))), (), seed_region)
    key = jax.random.key(7)
    gamma = jnp.float32(0.08)
    axis = _mask._pack_axis(layout)
    packed_shape = list(layout.seed_shape)
    packed = _mask.packed_block_mask(key, layout, gamma)
    packed_shape[axis] = packed.dropped_bits.shape[axis]
    words = _mask.bernoulli_seed_words(key, tuple(packed_shape), gamma, packed.per_word)
    seeds = _unpack(words, axis, layout.mask_shape[axis], packed.per_word)
    kept = np.asarray(packed.kept())
    assert seeds.any() and kept.shape == shape
    for n, c in itertools.product(range(shape[0]), range(shape[-1])):
        expected = dilate_reference(seeds[n, ..., c], block, sizes, seed_region)
        np.testing.assert_array_equal(~kept[n, ..., c], expected)


@pytest.mark.parametrize("seed_region", ["valid", "everywhere"])
@pytest.mark.parametrize("sizes,block", [((14, 14), 5), ((9, 20), (3, 6)), ((20, 9), (6, 3)), ((10, 10), 4)])
def test_dropped_region_is_a_union_of_blocks(seed_region, sizes, block):
    mask = db.block_mask(jax.random.key(3), (8, *sizes, 4), 0.8, block, seed_region=seed_region)
    mask = np.asarray(mask)
    blocks = _checks.parse_block_size(block)
    for n, c in itertools.product(range(8), range(4)):
        assert is_union_of_blocks(~mask[n, ..., c], blocks, seed_region)


def test_valid_blocks_stay_inside_and_everywhere_blocks_are_cut():
    sizes, block = (12, 12), 5
    valid = ~np.asarray(db.block_mask(jax.random.key(0), (64, *sizes, 1), 0.7, block, gamma="calibrated"))
    everywhere = ~np.asarray(
        db.block_mask(jax.random.key(0), (64, *sizes, 1), 0.7, block, seed_region="everywhere", gamma="calibrated")
    )

    def border_run_lengths(dropped):
        # Length of dropped runs that start at the top border, for every column.
        runs = []
        for map_ in dropped[..., 0]:
            for column in map_.T:
                if column[0]:
                    runs.append(np.argmin(np.append(column, False)))
        return np.array(runs)

    # A valid block touching the border is whole: runs from the border are >= block.
    assert border_run_lengths(valid).min() >= block
    # Everywhere: some blocks are cut by the border, shorter than the block.
    assert border_run_lengths(everywhere).min() < block


@pytest.mark.parametrize("seed_region", ["valid", "everywhere"])
@pytest.mark.parametrize("sizes,block", [((5, 13), (2, 3)), ((13, 5), (3, 2)), ((7, 3), (7, 3)), ((4, 17), 3)])
def test_blocks_reach_every_row_and_column(seed_region, sizes, block):
    mask = np.asarray(db.block_mask(jax.random.key(1), (256, *sizes, 1), 0.6, block, seed_region=seed_region))
    ever_dropped = (~mask).any(axis=(0, -1))
    assert ever_dropped.all(), np.argwhere(~ever_dropped)


@pytest.mark.parametrize("seed_region", ["valid", "everywhere"])
@pytest.mark.parametrize("block", [(6, 5), (9, 9), 50])
def test_block_as_large_as_the_map_drops_whole_maps(seed_region, block):
    mask = np.asarray(db.block_mask(jax.random.key(2), (64, 6, 5, 8), 0.5, block, seed_region=seed_region))
    per_map = mask.reshape(64, 30, 8)
    assert (per_map.all(axis=1) | (~per_map).all(axis=1)).all()
    dropped_maps = (~per_map).all(axis=1).mean()
    assert 0.0 < dropped_maps < 1.0


def test_block_size_one_is_elementwise():
    mask = np.asarray(db.block_mask(jax.random.key(0), (4, 16, 16, 8), 0.5, 1))
    assert 0.4 < mask.mean() < 0.6
    # Neighbouring units are independent: the pair agreement is ~ p^2 + (1-p)^2.
    agreement = (mask[:, 1:] == mask[:, :-1]).mean()
    assert 0.45 < agreement < 0.55


@pytest.mark.parametrize(
    "shape,block,spatial_axes",
    [
        ((4, 40, 6), (5,), None),  # 1-D (N, T, C)
        ((2, 9, 10, 11, 3), (3, 3, 3), None),  # 3-D (N, D, H, W, C)
        ((4, 3, 16, 12), (5, 3), (2, 3)),  # NCHW
        ((2, 3, 8, 8, 8, 2), (2, 3, 4), (1, 2, 3)),  # leading spatial axes, two channel axes
    ],
)
def test_dimensions_and_layouts(shape, block, spatial_axes):
    mask = np.asarray(db.block_mask(jax.random.key(4), shape, 0.7, block, spatial_axes=spatial_axes))
    assert mask.shape == shape and mask.dtype == bool
    axes = spatial_axes or tuple(range(len(shape) - 1 - len(block), len(shape) - 1))
    others = [a for a in range(len(shape)) if a not in axes]
    maps = np.moveaxis(mask, others, list(range(len(others)))).reshape(-1, *[shape[a] for a in axes])
    assert (~maps).any()
    for dropped in ~maps:
        assert is_union_of_blocks(dropped, block, "valid")


def test_unbatched_input_under_vmap():
    x = jax.random.normal(jax.random.key(0), (5, 12, 12, 3))
    keys = jax.random.split(jax.random.key(1), 5)
    batched = jax.vmap(lambda k, xi: db.drop_block(k, xi, 0.8, (3, 3)))(keys, x)
    for i in range(5):
        np.testing.assert_array_equal(batched[i], db.drop_block(keys[i], x[i], 0.8, (3, 3)))


def test_broadcast_dims():
    shape = (6, 12, 12, 5)
    independent = np.asarray(db.block_mask(jax.random.key(0), shape, 0.7, 3))
    # The paper: every sample and channel has its own mask.
    flat = independent.transpose(0, 3, 1, 2).reshape(30, -1)
    assert len({m.tobytes() for m in flat}) == 30
    shared_channels = np.asarray(db.block_mask(jax.random.key(0), shape, 0.7, 3, broadcast_dims=(-1,)))
    assert (shared_channels == shared_channels[..., :1]).all()
    assert len({shared_channels[n].tobytes() for n in range(6)}) == 6
    shared_batch = np.asarray(db.block_mask(jax.random.key(0), shape, 0.7, 3, broadcast_dims=(0,)))
    assert (shared_batch == shared_batch[:1]).all()
    assert len({shared_batch[0, ..., c].tobytes() for c in range(5)}) == 5


@pytest.mark.parametrize("gamma", [0.0004, 0.003, 0.05, 0.4])
def test_seed_flags_are_independent_bernoulli_over_positions_bits_and_keys(gamma):
    shape = (64, 256)  # words: 64 rows of 8192 flags
    flags = 256 * 32
    keys = jax.random.split(jax.random.key(5), 16)
    packed = jax.vmap(lambda k: _mask.bernoulli_seed_words(k, shape, jnp.float32(gamma)))(keys)
    seeds = _unpack(packed, 2, flags).reshape(-1, flags).astype(np.float64)
    assert_mean_matches(seeds.mean(axis=1), np.float32(gamma))
    # Variance of a row's seed count is binomial: flags * gamma * (1 - gamma).
    ratio = seeds.sum(axis=1).var(ddof=1) / (flags * gamma * (1 - gamma))
    assert 0.8 < ratio < 1.25, ratio
    # Uniform over positions: every bit of a word, and both ends of a row, see gamma.
    standard_error = np.sqrt(gamma * (1 - gamma) / (seeds.size / 32))
    per_bit = seeds.reshape(seeds.shape[0], -1, 32).mean(axis=(0, 1))
    assert np.abs(per_bit - gamma).max() < 5 * standard_error, per_bit
    first, last = seeds[:, : flags // 8].mean(), seeds[:, -flags // 8 :].mean()
    end_standard_error = np.sqrt(gamma * (1 - gamma) / (seeds.size / 8))
    assert abs(first - last) < 5 * np.sqrt(2) * end_standard_error
    # Independent neighbours (next flag, next row) and keys: pairs fire at gamma ** 2.
    by_key = seeds.reshape(len(keys), -1, flags)
    pairs = {
        "next flag": (by_key[:, :, 1:], by_key[:, :, :-1]),
        "next row": (by_key[:, 1:], by_key[:, :-1]),
        "next key": (by_key[1:], by_key[:-1]),
    }
    for name, (a, b) in pairs.items():
        both = (a * b).ravel()
        expected = np.float32(gamma) ** 2
        tolerance = 5 * np.sqrt(expected * (1 - expected) / both.size) + 1e-6
        assert abs(both.mean() - expected) < tolerance, (name, both.mean(), expected)


@pytest.mark.parametrize("channels,per_word", [(13, 13), (45, 15), (37, 1), (96, 32)])
def test_words_tile_the_packed_axis_and_the_count_is_exact(channels, per_word):
    # Words hold the largest divisor of the axis up to 32 flags, a prime axis one each.
    shape = (4, 9, 9, channels)
    layout = _geometry.mask_layout(shape, 3, None, (), "valid")
    packed = _mask.packed_block_mask(jax.random.key(0), layout, jnp.float32(0.1))
    assert _mask._pack_axis(layout) == 3 and packed.per_word == per_word
    assert packed.dropped_bits.shape == (4, 9, 9, channels // per_word)
    x = jnp.ones(shape)
    for keep in [0.5, 0.0]:
        y = db.drop_block(jax.random.key(0), x, keep, 3)
        mask = db.block_mask(jax.random.key(0), shape, keep, 3)
        kept = int(mask.sum())
        if kept:
            np.testing.assert_allclose(np.asarray(y)[np.asarray(mask)], x.size / kept, rtol=1e-6)
        else:
            assert not np.asarray(y).any()


def test_every_axis_spatial():
    x = jnp.ones((20, 30))
    mask = np.asarray(db.block_mask(jax.random.key(0), x.shape, 0.7, (3, 5), spatial_axes=(0, 1)))
    assert mask.shape == (20, 30) and (~mask).any()
    assert is_union_of_blocks(~mask, (3, 5), "valid")
    y = db.drop_block(jax.random.key(0), x, 0.7, (3, 5), spatial_axes=(0, 1))
    np.testing.assert_allclose(np.sum(np.asarray(y, np.float64)), x.size, rtol=1e-6)
