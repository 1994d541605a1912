"""Shared helpers for the test suite."""

import os
from pathlib import Path

import jax
import numpy as np


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


# Hypothesis profiles for tests/test_properties.py, chosen with HYPOTHESIS_PROFILE:
# "ci" (the default, what `make test` runs) tries the same few examples on every run;
# "thorough" draws many new ones, e.g. `HYPOTHESIS_PROFILE=thorough pytest tests/test_properties.py`.
# No deadline: the first example of a new shape includes XLA's compile time.
# "thorough" keeps the failures it finds in .pytest_cache (git-ignored) and tries them first next time.
try:
    from hypothesis import settings
    from hypothesis.database import DirectoryBasedExampleDatabase
except ImportError:  # an environment without the test extra; the property tests then fail to import
    pass
else:
    settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None, print_blob=True)
    settings.register_profile(
        "thorough",
        max_examples=500,
        deadline=None,
        print_blob=True,
        database=DirectoryBasedExampleDatabase(Path(__file__).parent.parent / ".pytest_cache" / "hypothesis"),
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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
    import pytest

    with pytest.raises(TypeError) as info:
        build()
    message = str(info.value)
    assert message.startswith(f"{layer_name} got {received}, but it takes keep_prob"), message
    assert "by keyword" in message and "keep_prob = 1 - r" in message, message
    assert f"{layer_name}(keep_prob=0.9)" in message, message
