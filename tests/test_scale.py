"""Arrays past 2**31 units: every mode traces, counts stay exact."""

import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dropblock_jax as db
import helpers
from dropblock_jax import _functional, _mask

# ResNet-50's first group at a global batch of 4096: 3.3e9 units.
BIG = jax.ShapeDtypeStruct((4096, 56, 56, 256), jnp.bfloat16)
LAYOUTS = {"per-channel": (), "shared": (-1,), "batch-shared": (0,)}
# A key whose first word is not 0, as jax.random.key(n)'s is for n < 2**32.
KEY = jax.random.wrap_key_data(jnp.array([0xDEADBEEF, 7], jnp.uint32))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("seed_region", ["valid", "everywhere"])
def test_every_mode_traces_past_2_to_the_31_units(layout, seed_region):
    assert BIG.size > 2**31
    key = KEY
    for normalize, gamma in itertools.product(["batch", "expected", "none"], ["paper", "calibrated"]):
        out = jax.eval_shape(
            lambda k, x, kp, gamma=gamma, normalize=normalize: db.drop_block(
                k, x, kp, 7, broadcast_dims=LAYOUTS[layout], seed_region=seed_region, gamma=gamma, normalize=normalize
            ),
            key,
            BIG,
            jnp.float32(0.9),
        )
        assert (out.shape, out.dtype) == (BIG.shape, BIG.dtype)
    mask = jax.eval_shape(
        lambda k: db.block_mask(k, BIG.shape, 0.9, 7, broadcast_dims=LAYOUTS[layout], seed_region=seed_region), key
    )
    assert (mask.shape, mask.dtype) == (BIG.shape, jnp.bool_)


def test_batch_normalization_past_2_to_the_31_units_counts_in_int32_parts_without_a_full_size_mask():
    lowered = jax.jit(lambda k, x, kp: db.drop_block(k, x, kp, 7)).lower(KEY, BIG, jnp.float32(0.9))
    # int32 sums are exact below 2**31 entries: 3.3e9 units need two parts, one full reduction each.
    parts = re.findall(
        r"applies stablehlo\.add across dimensions = \[0, 1, 2, 3\] : \(tensor<[0-9x]+xi32>", lowered.as_text()
    )
    assert len(parts) == math.ceil(BIG.size / (2**31 - 1)) == 2
    # The flags stay packed 32 to a word: the temporaries are a fraction of one byte a unit.
    temp_bytes = lowered.compile().memory_analysis().temp_size_in_bytes
    assert temp_bytes < BIG.size / 2, f"{temp_bytes} bytes of temporaries for {BIG.size} units"


def _count(packed):
    high, low = packed.count_kept()
    return int(high) * 2**16 + int(low)


def test_count_over_more_than_2_to_the_31_entries_is_exact():
    # 2.2e9 entries packed in 275 MB: 12 of 32 flags dropped in every word, and one
    # word with all 32, so the count is no multiple of anything convenient.
    bits = jnp.full((2100, 64, 64, 8), 0x2525_2525, jnp.uint32).at[7, 3, 5, 1].set(0xFFFF_FFFF)
    packed = _mask.PackedMask(bits, axis=3, size=256, mask_shape=(2100, 64, 64, 256))
    assert packed.num_entries > 2**31
    expected_kept = packed.num_entries - 12 * bits.size - 20
    assert _count(packed) == expected_kept
    scale = _functional._batch_scale(packed, None, jnp.float32)
    exact = packed.num_entries / expected_kept
    assert abs(float(scale) - exact) <= 3 * 2**-24 * exact


def test_parts_are_disjoint_and_cover_the_array():
    values = jnp.arange(5 * 3 * 4, dtype=jnp.int32).reshape(5, 3, 4)
    parts = _mask._parts_below(values, 25)
    assert len(parts) == 3  # two rows of 12 a part
    np.testing.assert_array_equal(sum(parts), values)
    assert all(int(jnp.count_nonzero(p)) <= 25 for p in parts)


def test_count_in_parts_equals_a_direct_count(monkeypatch):
    monkeypatch.setattr(_mask, "_MAX_PART_ENTRIES", 32 * 40)
    shape = (6, 9, 9, 13)
    mask = db.block_mask(KEY, shape, 0.6, 3)
    layout = _functional._layout(shape, 3, None, (), "valid", "paper")
    packed = _mask.packed_block_mask(KEY, layout, jnp.float32(helpers.paper_gamma(0.6, (9, 9), 3)))
    assert 0 < int(mask.sum()) < mask.size
    assert _count(packed) == int(mask.sum())


def test_masks_of_2_to_the_40_entries_are_refused():
    bits = jax.ShapeDtypeStruct((2**20, 2**15), jnp.uint32)
    packed = _mask.PackedMask(bits, axis=1, size=2**20, mask_shape=(2**20, 2**20))
    with pytest.raises(ValueError, match="2\\*\\*40"):
        packed.count_kept()
