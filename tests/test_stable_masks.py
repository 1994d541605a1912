"""Pinned masks: the bits a fixed key and fixed arguments give must not change silently.

Researchers rerun experiments across releases, so the mask of a given key and given
arguments is part of the contract: it is stable within a minor version line. Every case
below pins a digest of the bits (SHA-256 of the shape and the packed boolean mask). A
deliberate change of the bits bumps the minor version, says so in the CHANGELOG, and
then replaces the digests here: ``python tests/test_stable_masks.py`` prints the current
ones.

Arrays past ``2**32`` elements cannot be drawn whole in a test, but what decides their
bits can: the seed words such a mask draws from, and the random bits of positions past
``2**32``, are computed by a jitted slice that XLA fuses into the hash, so only the
slice is ever computed.
"""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dropblock_jax as db
from dropblock_jax import _geometry, _mask, _random
from helpers import available_key_impls, sliced_without_materializing

POLICY = (
    "Mask bits changed. Masks for a given key and arguments are stable within a minor version line: "
    "such a change must be deliberate, bump the minor version, be described in the CHANGELOG, and only "
    "then replace the pinned digests (python tests/test_stable_masks.py prints the current ones)."
)

# Keys are built from fixed key data, so the pins hold the library's bits only, not how
# JAX seeds its key implementations.
KEYS = {
    "threefry": lambda: jax.random.key(2018),
    # jax.random.key(n) has a first word of 0 for n < 2**32; this key's words are both nonzero.
    "threefry two words": lambda: jax.random.wrap_key_data(np.array([0xDEADBEEF, 7], np.uint32)),
    "legacy": lambda: jax.random.PRNGKey(1810),
    "rbg": lambda: jax.random.wrap_key_data(np.array([7, 1810, 12890, 2018], np.uint32), impl="rbg"),
    "unsafe_rbg": lambda: jax.random.wrap_key_data(np.array([3, 5, 8, 13], np.uint32), impl="unsafe_rbg"),
    "philox2x32": lambda: jax.random.wrap_key_data(np.array([2018], np.uint32), impl="philox2x32"),
    "philox4x32": lambda: jax.random.wrap_key_data(np.array([1810, 12890], np.uint32), impl="philox4x32"),
    "threefry4x32": lambda: jax.random.wrap_key_data(np.array([21, 34, 55, 89], np.uint32), impl="threefry4x32"),
}


# Key implementations newer than the minimum JAX (0.8.1 lacks them): pinned where JAX has them.
NEWER_KEYS = available_key_impls(["philox2x32", "philox4x32", "threefry4x32"])

# name: (key, shape, keep_prob, block_size, keyword arguments)
MASK_CASES = {
    "per-channel 2-D": ("threefry", (2, 12, 12, 8), 0.8, 3, {}),
    "shared across channels": ("threefry", (3, 12, 12, 8), 0.8, 3, {"broadcast_dims": (-1,)}),
    "shared across the batch": ("threefry", (3, 12, 12, 8), 0.8, 3, {"broadcast_dims": (0,)}),
    "1-D blocks": ("threefry", (3, 40, 6), 0.8, (5,), {}),
    "3-D blocks": ("threefry", (2, 6, 7, 8, 3), 0.7, (2, 3, 3), {}),
    "NCHW": ("threefry", (2, 5, 10, 9), 0.7, (3, 2), {"spatial_axes": (2, 3)}),
    "every axis spatial": ("threefry", (20, 30), 0.7, (3, 5), {"spatial_axes": (0, 1)}),
    "two words of 32 channels": ("threefry", (2, 9, 9, 64), 0.8, 3, {}),
    "prime channel count": ("threefry", (2, 9, 9, 37), 0.8, 3, {}),
    "block as large as the map": ("threefry", (4, 6, 5, 8), 0.5, (6, 5), {}),
    "seed_region everywhere": ("threefry", (2, 12, 12, 8), 0.8, 3, {"seed_region": "everywhere"}),
    "gamma calibrated": ("threefry", (2, 12, 12, 8), 0.8, 3, {"gamma": "calibrated"}),
    "legacy PRNGKey": ("legacy", (2, 12, 12, 8), 0.8, 3, {}),
    "threefry key with two nonzero words": ("threefry two words", (2, 12, 12, 8), 0.8, 3, {}),
    "rbg key": ("rbg", (2, 12, 12, 8), 0.8, 3, {}),
    "unsafe_rbg key": ("unsafe_rbg", (2, 12, 12, 8), 0.8, 3, {}),
    **{f"{impl} key": (impl, (2, 12, 12, 8), 0.8, 3, {}) for impl in NEWER_KEYS},
}

# name: (kept entries, SHA-256 of the shape and the packed mask): the masks of the 0.2 line.
PINNED_MASKS = {
    "per-channel 2-D": (1834, "8ea02bee0703b34b8736c15d1ed3932b43c399b7d74454d5b10bce37a53a157d"),
    "shared across channels": (2240, "082a9473cefcb33bbe8f8b8967f764bdb7c7e200f706bef6d9624870227a238b"),
    "shared across the batch": (2601, "9af9892c3e96dfa29ea0f047ff5c556da782608c427b52a25323c3d7e2381b75"),
    "1-D blocks": (542, "c893ea41d06342fc890de43a0e1f3e54bc0289b2f86bca5dce24f7e8bd6f6e8e"),
    "3-D blocks": (1510, "0307eae58e339dc18402d453827ddb37f765d9b3ebee881acea1927702ae7ba5"),
    "NCHW": (660, "57d1aff9df0e261367011a3921a571d3c87832d14ada87fe22f3715b281f99c7"),
    "every axis spatial": (383, "e9f3123db07360413b5f65c516c157601027ca59315234d91437f15a046b0e22"),
    "two words of 32 channels": (8492, "fcb71f05a3ca2ef8f984a7b22d87a1df3551b3ff4ed33298d403704a84749c37"),
    "prime channel count": (4830, "a9a0aff051bf47f9c22adddb4cbde948ba873c07d778686578d39a10fc14261b"),
    "block as large as the map": (360, "c488770b717337b3f65939d29688afe0a6fd2a3717488deeafccb5703637584f"),
    "seed_region everywhere": (1886, "432992dd23a8d6ae20b8a5e5bc26aab0a39dd40f05ef79b2ac25b5e4a8396344"),
    "gamma calibrated": (1776, "93220f7339ab87d657096e596dfcc8d66313a649daa304932b218dca330fe20e"),
    "legacy PRNGKey": (1898, "14b8266d246c24e75923e31aba85d1057381963c0e812c76b9c5fa30e03bd3ca"),
    "threefry key with two nonzero words": (1883, "b0bc5419741950ce3dd0595983ed696b95dd36b2a30e1b51c21861c99d9d1256"),
    "rbg key": (1882, "2676f4665e96f48df312a88545605cca6401ef16e3f0801c337037dc331439cf"),
    "unsafe_rbg key": (1927, "993baae7633f07eb94637b1bf856616bfe521361bc981c68f6f1499f9ec504cd"),
    "philox2x32 key": (1955, "5808f76f0d28a7adb657be04f21475f9f31064a067fa9ab6ecdba4f384784ef0"),
    "philox4x32 key": (1825, "6e04b3a7b134b0f63f892df9cae80806a47d0c29921732dbac6d587a615f28d2"),
    "threefry4x32 key": (1934, "2400214f676dda9169a948dd4fb28db4bc39d5dc1d21d246593fadf1b8c957e0"),
}

# The output of drop_block for one configuration, float32 bits ("batch" normalization is
# exact arithmetic: integer counts, one division, one product).
OUTPUT_CASE = ("threefry", (2, 12, 12, 8), 0.8, 3, {"broadcast_dims": (-1,)})
PINNED_OUTPUT = "4e8b415280575996c6b1e9c654fec3a641d7ef2623a8219cf88bf6acebb78cf0"

# Per-channel 56x56 maps of 512 channels at a global batch of 4096: 6.6e9 units, and 5.1e9 seed
# flags on its valid seed grid, more than 2**32, so positions are hashed as a row and a
# column. Pinned: the seed words of the last two rows of the grid of the last sample, for a
# key whose first word is 0 and for one whose first word seeds each row's hash.
HUGE_SHAPE = (4096, 56, 56, 512)
HUGE_KEEP_PROB = 0.9
HUGE_BLOCK = 7
PINNED_HUGE_SEEDS = {
    "threefry": (124, "682169d54347ed8f8a53852a13120785e86411d93b84c4cfebc6080841a6e10d"),
    "threefry two words": (120, "fee95c612cce5b1d2f087d0dd5f2ecb1316486d9e990cf470395e3885e9fc675"),
}

# position_bits at global positions past 2**32: (key, shape) -> (index of a slice, pinned bits).
# The first shape splits rows from columns after the batch axis; the second after two axes,
# with columns past 2**31.
POSITION_SLICES = {
    ("threefry", (4097, 1024, 1024)): (
        np.s_[4096, 1023, -8:],
        (3939170524, 1807255294, 3035093112, 3065713728, 3223365366, 2251903906, 1578088645, 3325407326),
    ),
    ("threefry", (2, 3, 2**31 + 5)): (
        np.s_[1, 2, 2**31 - 3 : 2**31 + 5],
        (2692538526, 742596033, 2034107042, 233982898, 1611836721, 1596567491, 2168814597, 2997131407),
    ),
    ("threefry two words", (4097, 1024, 1024)): (
        np.s_[4096, 1023, -8:],
        (1793646128, 2614173344, 2393350077, 3102043967, 2073408733, 1844048109, 2081046011, 1485681305),
    ),
    ("threefry two words", (2, 3, 2**31 + 5)): (
        np.s_[1, 2, 2**31 - 3 : 2**31 + 5],
        (4114993470, 1252806982, 2205543316, 1950969086, 3709409780, 674070816, 854682577, 2731694005),
    ),
}


def mask_digest(mask):
    mask = np.asarray(mask)
    assert mask.dtype == bool
    digest = hashlib.sha256(repr(mask.shape).encode())
    digest.update(np.packbits(mask, axis=None).tobytes())
    return digest.hexdigest()


def _case_mask(name):
    key, shape, keep_prob, block_size, kwargs = MASK_CASES[name]
    return np.asarray(db.block_mask(KEYS[key](), shape, keep_prob, block_size, **kwargs))


def _output():
    key, shape, keep_prob, block_size, kwargs = OUTPUT_CASE
    x = np.linspace(-3.0, 5.0, np.prod(shape), dtype=np.float32).reshape(shape)
    y = np.asarray(db.drop_block(KEYS[key](), x, keep_prob, block_size, **kwargs))
    assert y.dtype == np.float32
    return hashlib.sha256(y.tobytes()).hexdigest()


def _huge_seed_draw(monkeypatch):
    """The seed-word shape and flags per word that the mask of HUGE_SHAPE draws."""
    draws = []
    draw_words = _mask.bernoulli_seed_words

    def recording(key, shape, gamma, per_word=_mask.FLAGS_PER_WORD):
        draws.append((shape, per_word))
        return draw_words(key, shape, gamma, per_word)

    monkeypatch.setattr(_mask, "bernoulli_seed_words", recording)
    layout = _geometry.mask_layout(HUGE_SHAPE, HUGE_BLOCK, None, (), "valid")
    jax.eval_shape(lambda k: _mask.packed_block_mask(k, layout, jnp.float32(0.01)).dropped_bits, KEYS["threefry"]())
    monkeypatch.undo()
    (draw,) = draws
    return draw


def _huge_seeds(monkeypatch, key):
    shape, per_word = _huge_seed_draw(monkeypatch)
    assert np.prod(shape, dtype=np.int64) * per_word > 2**32
    gamma = db.seed_rate(HUGE_KEEP_PROB, HUGE_SHAPE[1:3], HUGE_BLOCK)
    words = sliced_without_materializing(
        lambda k, g: _mask.bernoulli_seed_words(k, shape, g, per_word)[-1, -2:], KEYS[key](), gamma
    )
    seeds = int(np.bitwise_count(words).sum())
    return seeds, hashlib.sha256(words.astype("<u4").tobytes()).hexdigest()


def _position_bits(key, shape):
    index, _ = POSITION_SLICES[key, shape]
    assert np.prod(shape, dtype=np.int64) > 2**32
    bits = sliced_without_materializing(lambda k: _random.position_bits(k, shape)[index], KEYS[key]())
    return tuple(int(b) for b in bits)


@pytest.mark.parametrize("name", list(MASK_CASES))
def test_mask_bits_are_pinned(name):
    mask = _case_mask(name)
    kept, digest = int(mask.sum()), mask_digest(mask)
    pinned_kept, pinned_digest = PINNED_MASKS[name]
    assert 0 < pinned_kept < mask.size, "a pinned mask must keep some units and drop others"
    assert (kept, digest) == (pinned_kept, pinned_digest), (
        f"{POLICY}\nCase {name!r}: kept {kept} of {mask.size}, digest {digest}; "
        f"pinned: kept {pinned_kept}, digest {pinned_digest}."
    )


def test_drop_block_output_bits_are_pinned():
    digest = _output()
    assert digest == PINNED_OUTPUT, f"{POLICY}\ndrop_block output digest {digest}; pinned: {PINNED_OUTPUT}."


@pytest.mark.parametrize("key", list(PINNED_HUGE_SEEDS))
def test_seeds_of_a_mask_past_2_to_the_32_flags_are_pinned(monkeypatch, key):
    seeds, digest = _huge_seeds(monkeypatch, key)
    pinned = PINNED_HUGE_SEEDS[key]
    assert pinned[0] > 0, "the pinned slice must hold seeds"
    assert (seeds, digest) == pinned, (
        f"{POLICY}\nSeeds of {HUGE_SHAPE} for the {key} key: {seeds} seeds, digest {digest}; pinned: {pinned}."
    )


@pytest.mark.parametrize("key,shape", list(POSITION_SLICES), ids=lambda value: str(value).replace(" ", ""))
def test_position_bits_past_2_to_the_32_are_pinned(key, shape):
    bits = _position_bits(key, shape)
    index, pinned = POSITION_SLICES[key, shape]
    assert bits == pinned, f"{POLICY}\nposition_bits of {shape} for the {key} key at {index}: {bits}; pinned: {pinned}."


if __name__ == "__main__":
    # Prints the current pins, to paste above after a deliberate, changelogged change.
    print("PINNED_MASKS = {")
    for case in MASK_CASES:
        case_mask = _case_mask(case)
        print(f"    {case!r}: ({int(case_mask.sum())}, {mask_digest(case_mask)!r}),")
    print("}")
    print(f"PINNED_OUTPUT = {_output()!r}")
    patch = pytest.MonkeyPatch()
    print(f"PINNED_HUGE_SEEDS = { ({huge_key: _huge_seeds(patch, huge_key) for huge_key in PINNED_HUGE_SEEDS}) }")
    for position_key, position_shape in POSITION_SLICES:
        print(position_key, position_shape, _position_bits(position_key, position_shape))
