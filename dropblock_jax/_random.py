"""Counter-based random bits: XXH32 of each element's position, seeded by the key.

Why not ``jax.random.bits``: its threefry kernel is compiled again at every call site,
and XLA inlines every DropBlock layer of a network, so a ResNet-50 with DropBlock at the
authors' places paid more in compiling random bits than in the rest of the step
(``docs/performance.md`` gives the figures). A keyed hash of the position is
an elementwise function of an ``iota``: it compiles to a few integer instructions
inside the fusion that consumes it, needs no state, and, because an element's bits
depend on its global position only, a sharded array computes exactly the one-device
bits on every shard with no communication.

The hash is XXH32 (Y. Collet, xxHash, https://github.com/Cyan4973/xxHash) of the
12-byte message ``(index, key word 0, key word 1)``: the element's row-major index, then
64 bits of the key. The index is mixed before the key enters, so two keys give
unrelated bits, not shifted copies of one stream (which a key used as XXH32's seed
would give, since the seed and the index are then only added). An array of ``2 ** 32``
elements or more splits the index into a row (the leading axes) and a column (the
trailing axes, fewer than ``2 ** 32`` elements) and hashes ``(column, key word 0,
XXH32((row, key word 1), seed=key word 0))``. XXH32 is a full-avalanche hash whose use
as a counter-based generator was evaluated by Jarzynski and Olano, "Hash Functions for
GPU Rendering", JCGT 9(3), 2020. It is not a cryptographic generator; the tests check
the properties DropBlock relies on (rates, variances, uniformity over positions and
bits, independence of neighbouring flags, rows and keys, and no key's stream being a
shifted copy of another's).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

# The primes of XXH32 that short messages use.
_PRIME_2 = 0x85EBCA77
_PRIME_3 = 0xC2B2AE3D
_PRIME_4 = 0x27D4EB2F
_PRIME_5 = 0x165667B1
_WORD_BYTES = 4
_MAX_COLUMN = 1 << 32


def _u32(value: int) -> jax.Array:
    return jnp.uint32(value)


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
    return (x << _u32(bits)) | (x >> _u32(32 - bits))


def _absorb_word(accumulator: jax.Array, word: jax.Array) -> jax.Array:
    """XXH32's step for a 4-byte word of a short message."""
    accumulator = accumulator + word * _u32(_PRIME_3)
    return _rotate_left(accumulator, 17) * _u32(_PRIME_4)


def _avalanche(h: jax.Array) -> jax.Array:
    """XXH32's final mix: every input bit flips every output bit with probability ~1/2."""
    h = (h ^ (h >> _u32(15))) * _u32(_PRIME_2)
    h = (h ^ (h >> _u32(13))) * _u32(_PRIME_3)
    return h ^ (h >> _u32(16))


def xxh32_words(words: list[jax.Array], seed: jax.Array) -> jax.Array:
    """XXH32 of a message of fewer than 4 little-endian uint32 words (broadcasting)."""
    if len(words) >= 4:
        raise ValueError(f"messages of fewer than 4 words are supported, got {len(words)}.")
    accumulator = seed + _u32(_PRIME_5) + _u32(_WORD_BYTES * len(words))
    for word in words:
        accumulator = _absorb_word(accumulator, word)
    return _avalanche(accumulator)


def key_words(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """64 bits of a typed PRNG key (any impl) as two uint32 words.

    A threefry key is its two data words; a longer key (rbg: four) folds each half of
    its words into one with XXH32; a one-word key (philox2x32) is that word and 0.
    """
    words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    if words.shape[0] == 1:
        return words[0], _u32(0)
    halves = (words[: words.shape[0] // 2], words[words.shape[0] // 2 :])
    folded = []
    for half in halves:
        word = half[0]
        for start in range(1, half.shape[0], 2):
            word = xxh32_words([half[i] for i in range(start, min(start + 2, half.shape[0]))], word)
        folded.append(word)
    return folded[0], folded[1]


def flat_index(shape: tuple[int, ...], full_shape: tuple[int, ...], first_axis: int) -> jax.Array:
    """Row-major index over ``shape`` (axes ``first_axis ..`` of ``full_shape``), uint32."""
    index = _u32(0)
    stride = 1
    for offset in reversed(range(len(shape))):
        if shape[offset] > 1:
            iota = lax.broadcasted_iota(jnp.uint32, full_shape, first_axis + offset)
            index = index + iota * _u32(stride)
        stride *= shape[offset]
    return index


def position_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """32 random bits for every element of ``shape``, a function of the key and its position.

    The same key and shape give the same bits under ``jit``, ``vmap`` of the caller, or
    sharding; distinct positions get independent-looking bits.
    """
    split = next(s for s in range(len(shape) + 1) if math.prod(shape[s:]) < _MAX_COLUMN)
    if math.prod(shape[:split]) >= _MAX_COLUMN:
        raise ValueError(
            f"shape {shape} has too many elements to index with two 32-bit words "
            "(its leading axes and its trailing axes must each hold fewer than 2**32)."
        )
    first, second = key_words(key)
    column = jnp.broadcast_to(flat_index(shape[split:], shape, split), shape)
    if split > 0:
        # Past 2**32 elements each row gets its own key word, a hash of the row and the key.
        row = flat_index(shape[:split], shape, 0)
        second = jnp.broadcast_to(xxh32_words([row, second], first), shape)
    # The position comes first: it is mixed before the key words are added, so two keys
    # give unrelated bits rather than shifted copies of one stream.
    return xxh32_words([column, first, second], _u32(0))
