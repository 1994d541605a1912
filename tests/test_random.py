"""The position-keyed generator: XXH32 exactly, distinct keys, any size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xxhash

from dropblock_jax import _random


def _reference(words, seed):
    message = np.asarray(words, "<u4").tobytes()
    return xxhash.xxh32_intdigest(message, seed=int(seed))


def test_hash_is_xxh32_of_the_little_endian_words():
    rng = np.random.default_rng(0)
    for length in (1, 2, 3):
        words = rng.integers(0, 2**32, size=(length, 50), dtype=np.uint64).astype(np.uint32)
        seeds = rng.integers(0, 2**32, size=50, dtype=np.uint64).astype(np.uint32)
        ours = np.asarray(_random.xxh32_words([jnp.asarray(w) for w in words], jnp.asarray(seeds)))
        expected = [_reference(words[:, i], seeds[i]) for i in range(50)]
        np.testing.assert_array_equal(ours, np.asarray(expected, np.uint32))


def test_position_bits_hash_row_and_column_with_the_key_seed(monkeypatch):
    # A small column limit forces the row/column split that arrays past 2**32 use.
    monkeypatch.setattr(_random, "_MAX_COLUMN", 64)
    key = jax.random.key(3)
    shape = (3, 5, 4, 8)
    bits = np.asarray(_random.position_bits(key, shape))
    seed = int(_random.key_seed(key))
    flat = np.arange(np.prod(shape)).reshape(shape)
    # Trailing axes (4, 8) hold 32 < 64 elements, (5, 4, 8) would not: rows are (3, 5).
    rows, columns = flat // 32, flat % 32
    expected = np.vectorize(lambda r, c: _reference([r, c], seed))(rows, columns)
    np.testing.assert_array_equal(bits, expected.astype(np.uint32))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_every_key_word_matters(impl):
    key = jax.random.key(0, impl=impl)
    data = jax.random.key_data(key)
    seeds = {int(_random.key_seed(key))}
    for index in np.ndindex(data.shape):
        changed = jax.random.wrap_key_data(data.at[index].add(1), impl=impl)
        seeds.add(int(_random.key_seed(changed)))
    assert len(seeds) == data.size + 1


def test_split_keys_give_distinct_bits():
    keys = jax.random.split(jax.random.key(0), 64)
    bits = np.asarray(jax.vmap(lambda k: _random.position_bits(k, (16,)))(keys))
    assert len({row.tobytes() for row in bits}) == 64


def test_position_bits_hash_the_flat_index_below_2_to_the_32_elements():
    key = jax.random.key(4)
    shape = (3, 5, 7)
    bits = np.asarray(_random.position_bits(key, shape))
    seed = int(_random.key_seed(key))
    expected = [_reference([index], seed) for index in range(np.prod(shape))]
    np.testing.assert_array_equal(bits, np.asarray(expected, np.uint32).reshape(shape))


def test_shapes_past_2_to_the_32_elements_trace():
    out = jax.eval_shape(lambda k: _random.position_bits(k, (8, 2**30)), jax.random.key(0))
    assert out.shape == (8, 2**30) and out.dtype == jnp.uint32


def test_too_many_elements_is_a_value_error():
    with pytest.raises(ValueError, match="two 32-bit words"):
        jax.eval_shape(lambda k: _random.position_bits(k, (2**33,)), jax.random.key(0))
