"""Shared helpers for the test suite."""

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
