"""The position-keyed generator: XXH32 exactly, distinct keys, any size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xxhash

from dropblock_jax import _random
from helpers import sliced_without_materializing


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


def _key_words(key):
    return tuple(int(word) for word in _random.key_words(key))


# jax.random.key(n) for n < 2**32 has a first word of 0, which would hide a hash that drops
# the first word, or seeds with 0 where it should seed with that word.
KEY_WITH_TWO_WORDS = jax.random.wrap_key_data(jnp.array([0xDEADBEEF, 7], jnp.uint32))


def test_the_test_key_has_two_nonzero_words():
    assert _key_words(KEY_WITH_TWO_WORDS) == (0xDEADBEEF, 7)


def test_position_bits_hash_the_flat_index_then_the_key_words():
    key = KEY_WITH_TWO_WORDS
    shape = (3, 5, 7)
    bits = np.asarray(_random.position_bits(key, shape))
    first, second = _key_words(key)
    expected = [_reference([index, first, second], 0) for index in range(np.prod(shape))]
    np.testing.assert_array_equal(bits, np.asarray(expected, np.uint32).reshape(shape))


def test_position_bits_past_2_to_the_32_elements_give_each_row_its_key_word(monkeypatch):
    # A small column limit forces the row/column split that arrays past 2**32 use.
    monkeypatch.setattr(_random, "_MAX_COLUMN", 64)
    key = KEY_WITH_TWO_WORDS
    shape = (3, 5, 4, 8)
    bits = np.asarray(_random.position_bits(key, shape))
    first, second = _key_words(key)
    flat = np.arange(np.prod(shape)).reshape(shape)
    # Trailing axes (4, 8) hold 32 < 64 elements, (5, 4, 8) would not: rows are (3, 5).
    rows, columns = flat // 32, flat % 32
    expected = np.vectorize(lambda r, c: _reference([c, first, _reference([r, second], first)], 0))(rows, columns)
    np.testing.assert_array_equal(bits, expected.astype(np.uint32))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_every_key_word_matters(impl):
    key = jax.random.key(0, impl=impl)
    data = jax.random.key_data(key)
    words = {_key_words(key)}
    for index in np.ndindex(data.shape):
        changed = jax.random.wrap_key_data(data.at[index].add(1), impl=impl)
        words.add(_key_words(changed))
    assert len(words) == data.size + 1


def test_split_keys_give_distinct_bits():
    keys = jax.random.split(jax.random.key(0), 64)
    bits = np.asarray(jax.vmap(lambda k: _random.position_bits(k, (16,)))(keys))
    assert len({row.tobytes() for row in bits}) == 64


def _shifts_with_equal_words(x, y, max_shift=64):
    """Shifts s for which some x[i] == y[i + s]; equal 32-bit words by chance have probability 2**-32."""
    n = len(x)
    shifts = range(-max_shift, max_shift + 1)
    return [s for s in shifts if (x[max(0, -s) : n - max(0, s)] == y[max(0, s) : n - max(0, -s)]).any()]


def test_the_shift_check_finds_the_streams_of_a_seeded_hash():
    # Keys used as XXH32's seed: seeds that differ by the multiplier of the index give the
    # same stream, one position apart. This is what position_bits must not do.
    prime_3 = 0xC2B2AE3D
    index = jnp.arange(4096, dtype=jnp.uint32)
    x = np.asarray(_random.xxh32_words([index], jnp.uint32(7)))
    y = np.asarray(_random.xxh32_words([index], jnp.uint32(7 + prime_3)))
    assert _shifts_with_equal_words(x, y) == [-1]


def test_no_key_gives_a_shifted_copy_of_another_keys_bits():
    # Key words that differ by one or by XXH32's multipliers, and split keys.
    prime_3 = 0xC2B2AE3D
    crafted = [[0, 0], [0, 1], [1, 0], [0, prime_3], [prime_3, 0], [1, 1], [0, 2 * prime_3 % 2**32]]
    split = jax.random.key_data(jax.random.split(jax.random.key(0), 8))
    keys = jax.random.wrap_key_data(jnp.concatenate([jnp.asarray(crafted, jnp.uint32), split]))
    bits = np.asarray(jax.vmap(lambda k: _random.position_bits(k, (4096,)))(keys))
    for a in range(len(bits)):
        for b in range(len(bits)):
            shifts = _shifts_with_equal_words(bits[a], bits[b])
            assert shifts == ([0] if a == b else []), (a, b, shifts)


@pytest.mark.parametrize(
    "shape,leading,index",
    [
        # Rows are the batch axis; columns the 2**20 positions of a sample.
        ((4097, 1024, 1024), 1, np.s_[4096, 1023, -8:]),
        # Rows are the two leading axes; columns run past 2**31.
        ((2, 3, 2**31 + 5), 2, np.s_[1, 2, 2**31 - 3 : 2**31 + 5]),
    ],
)
def test_position_bits_past_2_to_the_32_elements_are_xxh32_of_column_and_row_hash(shape, leading, index):
    # The real split, not a patched limit: a slice of the program computes only its elements.
    bits = sliced_without_materializing(lambda k: _random.position_bits(k, shape)[index], KEY_WITH_TWO_WORDS)
    first, second = _key_words(KEY_WITH_TWO_WORDS)
    *fixed, last = index
    expected = []
    for position in range(*last.indices(shape[-1])):
        multi_index = (*fixed, position)
        row = int(np.ravel_multi_index(multi_index[:leading], shape[:leading]))
        column = int(np.ravel_multi_index(multi_index[leading:], shape[leading:]))
        # The row's own key word is XXH32 of (row, key word 1) seeded with key word 0.
        expected.append(_reference([column, first, _reference([row, second], first)], 0))
    np.testing.assert_array_equal(bits, np.asarray(expected, np.uint32))


def test_shapes_past_2_to_the_32_elements_trace():
    out = jax.eval_shape(lambda k: _random.position_bits(k, (8, 2**30)), jax.random.key(0))
    assert out.shape == (8, 2**30) and out.dtype == jnp.uint32


def test_too_many_elements_is_a_value_error():
    with pytest.raises(ValueError, match="two 32-bit words"):
        jax.eval_shape(lambda k: _random.position_bits(k, (2**33,)), jax.random.key(0))
