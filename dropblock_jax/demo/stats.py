"""Small statistics for the demo: paired differences over seeds, area under a curve.

numpy only. Every method of the comparison trains on the same seeds (same
initialization, data order and masks' seeds), so a method is compared to the
baseline seed by seed: the per-seed differences cancel what the seeds share.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from dropblock_jax._checks import check_int

# Two-sided 95% quantiles t_{0.975, df} of Student's t distribution for df = 1..30,
# the standard table's values (to 4 decimals).
_T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z_975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (95% two-sided).

    From the standard table for df <= 30; beyond, the Cornish-Fisher expansion around
    the normal quantile, which agrees with the table to 1e-4 at df = 30 and gets
    better as df grows.

    Args:
      df: degrees of freedom, an int >= 1.

    Raises:
      TypeError: when ``df`` is not an int.
      ValueError: when it is below 1.

    Examples:
      >>> from dropblock_jax.demo.stats import t_quantile_975
      >>> t_quantile_975(4)
      2.7764
    """
    df = check_int("df", df, low=1)
    if df <= len(_T_975):
        return _T_975[df - 1]
    z, v = _Z_975, float(df)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
    )


def paired_difference(values: npt.ArrayLike, baseline: npt.ArrayLike) -> dict:
    """Mean of ``values - baseline`` over paired runs, with its 95% t interval.

    Args:
      values: one number per seed for the method.
      baseline: one number per seed for the baseline, in the same seed order.

    Returns:
      A dict: ``differences`` (per pair), ``mean``, ``lower`` and ``upper`` (the 95%
      interval ``mean +- t_{0.975, n-1} * sd / sqrt(n)``) and ``distinguishable``
      (True when the interval excludes 0).

    Raises:
      ValueError: for unequal lengths, fewer than 2 pairs or non-finite values.

    Examples:
      >>> from dropblock_jax.demo.stats import paired_difference
      >>> d = paired_difference([3.0, 4.0, 5.0], [1.0, 1.0, 1.0])
      >>> d["mean"], round(d["lower"], 3), round(d["upper"], 3), d["distinguishable"]
      (3.0, 0.516, 5.484, True)
    """
    values = np.asarray(values, np.float64)
    baseline = np.asarray(baseline, np.float64)
    if values.ndim != 1 or values.shape != baseline.shape:
        raise ValueError(
            f"values and baseline must be 1-D and of equal length, got shapes {values.shape} and {baseline.shape}."
        )
    if len(values) < 2:
        raise ValueError(f"a paired interval needs at least 2 pairs, got {len(values)}.")
    if not (np.isfinite(values).all() and np.isfinite(baseline).all()):
        raise ValueError(f"values and baseline must be finite, got {values.tolist()} and {baseline.tolist()}.")
    differences = values - baseline
    n = len(differences)
    mean = float(differences.mean())
    half = t_quantile_975(n - 1) * float(differences.std(ddof=1)) / math.sqrt(n)
    lower, upper = mean - half, mean + half
    return dict(
        differences=differences.tolist(),
        mean=mean,
        lower=lower,
        upper=upper,
        distinguishable=bool(lower > 0 or upper < 0),
    )


def mean_over_grid(grid: npt.ArrayLike, values: npt.ArrayLike) -> float:
    """The trapezoid area under ``values`` over ``grid``, divided by the grid's span.

    The mean height of the piecewise linear curve: for accuracies in percent, a
    percentage too (the area under the curve normalized to the grid's width).

    Args:
      grid: strictly increasing or strictly decreasing points, at least 2.
      values: one value per point.

    Raises:
      ValueError: for fewer than 2 points, a non-monotone grid or unequal lengths.

    Examples:
      >>> from dropblock_jax.demo.stats import mean_over_grid
      >>> mean_over_grid([1.0, 0.75, 0.5], [90.0, 80.0, 50.0])
      75.0
    """
    grid = np.asarray(grid, np.float64)
    values = np.asarray(values, np.float64)
    if grid.ndim != 1 or len(grid) < 2:
        raise ValueError(f"grid must hold at least 2 points, got {grid.tolist()}.")
    if values.shape != grid.shape:
        raise ValueError(f"values must have one value per grid point ({len(grid)}), got shape {values.shape}.")
    steps = np.diff(grid)
    if not ((steps > 0).all() or (steps < 0).all()):
        raise ValueError(f"grid must be strictly monotone, got {grid.tolist()}.")
    area = float(np.sum(steps * (values[1:] + values[:-1]) / 2))
    return area / float(grid[-1] - grid[0])
