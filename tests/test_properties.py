"""Properties every legal input keeps, and a named error for every illegal one (Hypothesis).

The generators draw arrays of rank 1 to 5 with 1 to 3 spatial axes anywhere (given
explicitly, negative or not, or the default layout), blocks up to larger than the map,
``broadcast_dims`` among the other axes, every mode, float16/bfloat16/float32, every key
kind, and ``keep_prob`` in [0, 1] with both ends. Sizes stay tiny: XLA's compile time is
what each example costs. The example budget is a Hypothesis profile (conftest.py):
``HYPOTHESIS_PROFILE=thorough`` draws many more.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dropblock_jax as db
from helpers import available_key_impls, is_union_of_blocks

DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


# Every key implementation this JAX has (philox and threefry4x32 are newer than the minimum), and legacy keys.
KEY_KINDS = (
    "legacy",
    *available_key_impls(["threefry2x32", "rbg", "unsafe_rbg", "philox2x32", "philox4x32", "threefry4x32"]),
)
SEED_REGIONS = ("valid", "everywhere")
GAMMAS = ("paper", "calibrated")
NORMALIZE_MODES = ("batch", "expected", "none")
MAX_SIZE = 5
MAX_BLOCK = 7  # past MAX_SIZE: blocks larger than the map


@dataclasses.dataclass
class Case:
    """One legal call of drop_block and block_mask, as the user would write it."""

    key: object
    x: jax.Array
    shape: tuple  # the block_mask shape argument: x.shape, possibly with NumPy ints
    keep_prob: object
    block_size: object
    options: dict  # spatial_axes, broadcast_dims, seed_region, gamma
    normalize: str
    spatial: tuple  # the spatial axes in block order, normalized
    block: tuple  # one block size per spatial axis
    broadcast: tuple  # the broadcast axes, normalized

    def drop_block(self, keep_prob=None):
        keep_prob = self.keep_prob if keep_prob is None else keep_prob
        return db.drop_block(self.key, self.x, keep_prob, self.block_size, normalize=self.normalize, **self.options)

    def block_mask(self):
        return db.block_mask(self.key, self.shape, self.keep_prob, self.block_size, **self.options)


def _maybe_numpy_int(draw, value):
    """``value`` as a Python int or a NumPy integer: both are legal wherever a size or an axis is."""
    return draw(st.sampled_from([int, np.int64, np.int32]))(value)


def _as_given_axis(draw, axis, rank):
    """An axis as the user may write it: non-negative or negative."""
    return _maybe_numpy_int(draw, axis - rank if draw(st.booleans()) else axis)


def _key(kind, seed):
    if kind == "legacy":
        return jax.random.PRNGKey(seed)
    return jax.random.key(seed, impl=kind)


@st.composite
def keep_probs(draw):
    # Mostly inside (0, 1), where masks have both kept and dropped units; the ends, and floats
    # a hair away from them, the rest of the time.
    value = draw(
        st.one_of(st.floats(0.05, 0.95), st.floats(0.05, 0.95), st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
    )
    as_written = [float, np.float32, np.float64, jnp.float32]
    if value in (0.0, 1.0):
        as_written.append(int)
    return draw(st.sampled_from(as_written))(value)


@st.composite
def legal_cases(draw, empty=False):
    """A legal call; ``empty=True`` sets one or more axes to size 0."""
    rank = draw(st.integers(1, 5))
    default_layout = rank >= 3 and draw(st.booleans())
    if default_layout:
        # The default layout: the len(block_size) axes just before the last one.
        num_spatial = draw(st.integers(1, min(3, rank - 1)))
        spatial = tuple(range(rank - 1 - num_spatial, rank - 1))
    else:
        num_spatial = draw(st.integers(1, min(3, rank)))
        spatial = tuple(draw(st.permutations(range(rank)))[:num_spatial])
    shape = [draw(st.integers(1, MAX_SIZE)) for _ in range(rank)]
    if empty:
        for axis in draw(st.sets(st.integers(0, rank - 1), min_size=1)):
            shape[axis] = 0
    shape = tuple(shape)
    block = tuple(draw(st.integers(1, MAX_BLOCK)) for _ in spatial)
    # An int block is the same size along every spatial axis when they are given; by default
    # it is the square over H and W of a rank-4 (N, H, W, C) input, and refused on other ranks.
    square = len(set(block)) == 1 and ((num_spatial == 2 and rank == 4) or not default_layout)
    if square and draw(st.booleans()):
        block_size = _maybe_numpy_int(draw, block[0])
    else:
        block_size = tuple(_maybe_numpy_int(draw, b) for b in block)
    options = {
        "spatial_axes": None if default_layout else tuple(_as_given_axis(draw, a, rank) for a in spatial),
        "seed_region": draw(st.sampled_from(SEED_REGIONS)),
        "gamma": draw(st.sampled_from(GAMMAS)),
    }
    others = [a for a in range(rank) if a not in spatial]
    broadcast = tuple(sorted(draw(st.sets(st.sampled_from(others))) if others else ()))
    if broadcast or draw(st.booleans()):
        options["broadcast_dims"] = tuple(_as_given_axis(draw, a, rank) for a in broadcast)
    dtype = draw(st.sampled_from(DTYPES))
    # No zeros, so that a zero of the output is a dropped unit, and small enough that a float16
    # unit scaled by count / kept ("batch": at most MAX_SIZE**5) stays finite.
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.uniform(0.25, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    return Case(
        key=_key(draw(st.sampled_from(KEY_KINDS)), draw(st.integers(0, 2**32 - 1))),
        x=jnp.asarray(np.asarray(values, dtype)),
        shape=tuple(_maybe_numpy_int(draw, n) for n in shape),
        keep_prob=draw(keep_probs()),
        block_size=block_size,
        options=options,
        normalize=draw(st.sampled_from(NORMALIZE_MODES)),
        spatial=spatial,
        block=block,
        broadcast=broadcast,
    )


def _bits(array):
    return np.asarray(array).tobytes()


def _relative_tolerance(dtype):
    """Rounding of ``x * scale``: the scale and the product each rounded once in float32, then to ``dtype``."""
    final_rounding = 0.0 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps) / 2
    return 2 * 2.0**-24 + final_rounding


def _expected_scale(case, mask):
    """What the kept units are multiplied by, in float64, from the mask or the public rate functions."""
    if not mask.any():
        return 0.0
    if case.normalize == "batch":
        return mask.size / mask.sum()
    if case.normalize == "none":
        return 1.0
    sizes = tuple(case.x.shape[a] for a in case.spatial)
    kwargs = {"seed_region": case.options["seed_region"]}
    gamma = db.seed_rate(case.keep_prob, sizes, case.block, gamma=case.options["gamma"], **kwargs)
    return 1.0 / float(db.expected_keep_fraction(gamma, sizes, case.block, **kwargs))


def _maps(array, spatial):
    """The maps of ``array``, one per index of its other axes, spatial axes in block order."""
    others = [a for a in range(array.ndim) if a not in spatial]
    moved = np.moveaxis(array, [*others, *spatial], range(array.ndim))
    return moved.reshape(-1, *moved.shape[len(others) :])


@given(case=legal_cases())
def test_drop_block_zeroes_the_blocks_of_its_mask_and_scales_the_rest(case):
    y = case.drop_block()
    mask = case.block_mask()
    assert (y.shape, y.dtype) == (case.x.shape, case.x.dtype), "drop_block must keep x's shape and dtype"
    assert (mask.shape, mask.dtype) == (case.x.shape, jnp.bool_)
    y, mask = np.asarray(y).astype(np.float64), np.asarray(mask)
    np.testing.assert_array_equal(y == 0, ~mask, err_msg="drop_block's zeros must be block_mask's False entries")
    for axis in case.broadcast:
        np.testing.assert_array_equal(
            mask, np.take(mask, [0], axis=axis).repeat(mask.shape[axis], axis), err_msg=f"not shared along {axis}"
        )
    x = np.asarray(case.x).astype(np.float64)
    expected = np.where(mask, x * _expected_scale(case, mask), 0.0)
    rtol = _relative_tolerance(case.x.dtype)
    # x * scale past the dtype's largest value (a float16 unit kept at a tiny keep_prob with
    # "expected" normalization) overflows honestly; everything else is finite and exact.
    largest = float(jnp.finfo(case.x.dtype).max)
    representable = np.abs(expected) * (1 + rtol) <= largest
    assert np.isfinite(y[representable]).all(), "a finite x must give a finite output"
    error = np.abs(y - expected)[representable]
    assert (error <= rtol * np.abs(expected[representable])).all(), (
        f"{case.normalize!r} scale: kept units differ from x * scale by up to {error.max()}"
    )
    overflowing = ~representable
    assert (np.abs(y[overflowing]) >= largest / (1 + rtol)).all() and (np.sign(y) == np.sign(x))[overflowing].all()
    for dropped in _maps(~mask, case.spatial):
        assert is_union_of_blocks(dropped, case.block, case.options["seed_region"])


@given(case=legal_cases())
def test_traced_keep_prob_gives_the_bits_of_a_concrete_one(case):
    options = {"normalize": case.normalize, **case.options}
    # A schedule passes a float32 array; one type, so one compile per example.
    compiled = jax.jit(lambda key, x, p: db.drop_block(key, x, p, case.block_size, **options))

    def traced(keep_prob):
        return compiled(case.key, case.x, jnp.asarray(keep_prob, jnp.float32))

    assert _bits(traced(case.keep_prob)) == _bits(case.drop_block()), "traced and concrete keep_prob differ"
    for one in [1, 1.0, np.float32(1.0), jnp.float32(1.0)]:
        assert _bits(case.drop_block(one)) == _bits(case.x), "keep_prob 1 must return x bit for bit"
    assert _bits(traced(1.0)) == _bits(case.x), "a traced keep_prob of 1 must return x bit for bit"
    for zero in [0, 0.0, np.float32(0.0), jnp.float32(0.0)]:
        assert not np.asarray(case.drop_block(zero)).any(), "keep_prob 0 must drop every unit"
    assert not np.asarray(traced(0.0)).any(), "a traced keep_prob of 0 must drop every unit"


@given(case=legal_cases(empty=True))
def test_empty_arrays_give_empty_results(case):
    y = case.drop_block()
    assert (y.shape, y.dtype) == (case.x.shape, case.x.dtype)
    mask = case.block_mask()
    assert (mask.shape, mask.dtype) == (case.x.shape, jnp.bool_)


@pytest.mark.parametrize("kind", KEY_KINDS)
def test_every_key_implementation_draws_a_mask(kind):
    # The generators pick key kinds at random; this covers each one on every run.
    x = jnp.ones((2, 8, 8, 4), jnp.float32)
    y = np.asarray(db.drop_block(_key(kind, 3), x, 0.7, 3))
    mask = np.asarray(db.block_mask(_key(kind, 3), x.shape, 0.7, 3))
    assert 0.2 < mask.mean() < 0.95
    np.testing.assert_array_equal(y == 0, ~mask)
    assert not np.array_equal(mask, np.asarray(db.block_mask(_key(kind, 4), x.shape, 0.7, 3)))


# Illegal arguments: each corruption changes one argument of a legal case and says which.

_BAD_KEYS = [
    0,
    1.5,
    "key",
    None,
    np.array([1, 2], np.int32),
    np.zeros(2, np.float32),
    np.zeros(3, np.uint32),
    np.zeros((2, 2), np.uint32),
]
_NON_FLOATING = [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_, jnp.complex64]
_NOT_A_PROBABILITY = ["0.9", None, True, [0.9], np.bool_(True), np.complex64(0.5), 0.5j]
_NOT_AN_AXIS = ["h", 1.5, None, True, np.float32(1.0)]
_NOT_A_BLOCK = [2.5, "3", True, None, (), np.float32(3.0)]
_NOT_A_MODE = [None, 1, b"valid", "", "Valid", " paper", "mean"]
_NOT_AN_AXIS_NAME = [3, 0, -1, 2.5, True, np.int32(1), ["batch"], (), ("batch", 3), {"batch"}]
_NOT_A_SHAPE = ["shape", 5, None, 2.5]


@dataclasses.dataclass
class Bad:
    """An illegal argument: its name, the text of the value the message must show (if any), who takes it."""

    argument: str
    shown: str | None
    functions: tuple = ("drop_block", "block_mask")


@st.composite
def _bad_axes(draw, case, name):
    """spatial_axes or broadcast_dims made illegal; spatial axes then take an int block (always the right length)."""
    rank = case.x.ndim
    spatial = case.options["spatial_axes"] or case.spatial
    given = list(spatial if name == "spatial_axes" else case.options.get("broadcast_dims", ()))
    kind = draw(
        st.sampled_from(["out of range", "repeated", "not ints"] + (["empty"] if name == "spatial_axes" else []))
    )
    if kind == "out of range":
        wrong = draw(st.sampled_from([rank + draw(st.integers(0, 3)), -rank - 1 - draw(st.integers(0, 3))]))
        given.insert(draw(st.integers(0, len(given))), wrong)
    elif kind == "repeated":
        axis = draw(st.sampled_from(list(spatial) if name == "spatial_axes" else range(rank)))
        given += [axis, draw(st.sampled_from([axis % rank, axis % rank - rank]))]
    elif kind == "not ints":
        given.insert(draw(st.integers(0, len(given))), draw(st.sampled_from(_NOT_AN_AXIS)))
    else:
        given = []
    return tuple(given)


@st.composite
def illegal_calls(draw):
    argument = draw(
        st.sampled_from(
            [
                "key",
                "x",
                "keep_prob",
                "block_size",
                "spatial_axes",
                "broadcast_dims",
                "broadcast_dims with a spatial axis",
                "seed_region",
                "gamma",
                "normalize",
                "axis_name",
                "axis_name not bound",
                "shape",
            ]
        )
    )
    # An empty array needs no counts, so only a non-empty one can tell an unbound axis_name.
    case = draw(legal_cases(empty=argument != "axis_name not bound" and draw(st.booleans())))
    rank = case.x.ndim
    changes = {}
    if argument == "key":
        value = draw(st.sampled_from([*_BAD_KEYS, "key array"]))
        if isinstance(value, str) and value == "key array":
            value = jax.random.split(jax.random.key(0))
        bad = Bad("key", None)
        changes["key"] = value
    elif argument == "x":
        bad = Bad("x", None, functions=("drop_block",))
        changes["x"] = jnp.ones(case.x.shape, draw(st.sampled_from(_NON_FLOATING)))
    elif argument == "keep_prob":
        value = draw(
            st.one_of(
                st.floats(min_value=1.0, exclude_min=True),
                st.floats(max_value=0.0, exclude_max=True),
                st.just(float("nan")),
                st.sampled_from([np.float64(1.5), np.float32(-0.5), jnp.float32(2.0), np.int32(2), -1, 3]),
                st.sampled_from([np.full((n,), 0.5) for n in (1, 2)] + [jnp.full((2, 1), 0.9)]),
                st.sampled_from(_NOT_A_PROBABILITY),
            )
        )
        # A real number out of range is shown as a float; a wrong type or shape is described otherwise.
        real = np.ndim(value) == 0 and isinstance(value, (int, float, np.integer, np.floating, jax.Array))
        real = real and not isinstance(value, bool)
        bad = Bad("keep_prob", repr(float(value)) if real else None)
        changes["keep_prob"] = value
    elif argument == "block_size":
        kind = draw(st.sampled_from(["not positive", "not an int", "wrong length"]))
        explicit = case.options["spatial_axes"] is not None
        if kind == "wrong length" and explicit:
            length = draw(st.integers(1, 4).filter(lambda n: n != len(case.spatial)))
            value = (3,) * length
        elif kind == "not positive" or kind == "wrong length":
            wrong = draw(st.integers(-3, 0))
            value = wrong if draw(st.booleans()) else tuple(wrong if i == 0 else b for i, b in enumerate(case.block))
        else:
            value = draw(st.sampled_from(_NOT_A_BLOCK))
        bad = Bad("block_size", repr(value))
        changes["block_size"] = value
    elif argument in ("spatial_axes", "broadcast_dims"):
        value = draw(_bad_axes(case, argument))
        bad = Bad(argument, repr(value))
        changes[argument] = value
        if argument == "spatial_axes":
            changes["block_size"] = 2
    elif argument == "broadcast_dims with a spatial axis":
        axis = draw(st.sampled_from(case.spatial))
        value = (*case.broadcast, draw(st.sampled_from([axis, axis - rank])))
        bad = Bad("broadcast_dims", repr(value))
        changes["broadcast_dims"] = value
    elif argument in ("seed_region", "gamma", "normalize"):
        allowed = {"seed_region": SEED_REGIONS, "gamma": GAMMAS, "normalize": NORMALIZE_MODES}[argument]
        value = draw(st.one_of(st.sampled_from(_NOT_A_MODE), st.text(max_size=8)).filter(lambda v: v not in allowed))
        functions = ("drop_block",) if argument == "normalize" else ("drop_block", "block_mask")
        bad = Bad(argument, repr(value), functions=functions)
        changes[argument] = value
    elif argument == "axis_name":
        value = draw(st.sampled_from(_NOT_AN_AXIS_NAME))
        bad = Bad("axis_name", repr(value), functions=("drop_block",))
        changes["axis_name"] = value
    elif argument == "axis_name not bound":
        # A name no vmap, pmap or shard_map around the call binds, with the mode that sums over it.
        value = draw(st.sampled_from(["batch", "devices", ("batch", "model")]))
        bad = Bad("axis_name", repr(value), functions=("drop_block",))
        changes.update(axis_name=value, normalize="batch")
    else:
        kind = draw(st.sampled_from(["negative", "not ints", "not a sequence"]))
        shape = list(case.shape)
        if kind == "negative":
            shape[draw(st.integers(0, rank - 1))] = draw(st.integers(-3, -1))
        elif kind == "not ints":
            shape[draw(st.integers(0, rank - 1))] = draw(st.sampled_from([1.0, 2.5, "2", None, True]))
        value = tuple(shape) if kind != "not a sequence" else draw(st.sampled_from(_NOT_A_SHAPE))
        bad = Bad("shape", repr(value), functions=("block_mask",))
        changes["shape"] = value
    return case, bad, changes


def _call(function, case, changes):
    args = {
        "key": case.key,
        "x": case.x,
        "shape": case.shape,
        "keep_prob": case.keep_prob,
        "block_size": case.block_size,
        "normalize": case.normalize,
        **case.options,
    }
    args.update(changes)
    if function == "drop_block":
        args.pop("shape")
        return db.drop_block(args.pop("key"), args.pop("x"), args.pop("keep_prob"), args.pop("block_size"), **args)
    args.pop("x")
    args.pop("normalize")
    return db.block_mask(args.pop("key"), args.pop("shape"), args.pop("keep_prob"), args.pop("block_size"), **args)


# Illegal calls fail before anything compiles: four times the profile's examples for a few seconds.
@settings(max_examples=4 * settings().max_examples)
@given(call=illegal_calls())
def test_every_illegal_argument_gets_an_error_that_names_it(call):
    case, bad, changes = call
    for function in bad.functions:
        with pytest.raises((TypeError, ValueError)) as raised:
            _call(function, case, changes)
        message = str(raised.value)
        assert re.search(rf"\b{bad.argument}\b", message), (
            f"{function}: the error does not name {bad.argument}: {message}"
        )
        if bad.shown is not None:
            assert bad.shown in message, f"{function}: the error does not show the value {bad.shown}: {message}"
