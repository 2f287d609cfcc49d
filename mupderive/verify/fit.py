"""Log-log slope fits with a confidence interval: ``log y = a_group + s log n`` by least squares.

Each group (a seed: the same data at every width) gets its own intercept, so its overall level is not noise in the
slope; the interval is the 95% Student-t interval of the common slope from the residuals, so width-to-width noise and
curvature across widths (sub-leading terms) both widen it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Two-sided 95% Student t quantiles for 1..30 degrees of freedom; beyond, a Cornish-Fisher expansion (error < 1e-3).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (inf for df < 1)."""
    if df < 1:
        return math.inf
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Fit:
    """A fitted slope ``slope`` with 95% half-width ``ci``."""

    slope: float
    ci: float


def fit_slope(widths: Sequence[float], values: Sequence[float], groups: Sequence[object] | None = None) -> Fit:
    """Least-squares slope of ``log values`` against ``log widths`` (all values > 0), with one intercept per group
    (``groups[k]`` labels point ``k``; default: one group)."""
    x = np.log(np.asarray(widths, dtype=float))
    y = np.log(np.asarray(values, dtype=float))
    labels = np.zeros(len(x), dtype=int) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    xc, yc = x.copy(), y.copy()
    for label in np.unique(labels):
        mask = labels == label
        xc[mask] -= x[mask].mean()
        yc[mask] -= y[mask].mean()
    sxx = float(xc @ xc)
    if sxx == 0:
        raise ValueError("a slope needs values at two or more widths")
    slope = float(xc @ yc) / sxx
    dof = len(x) - len(np.unique(labels)) - 1
    if dof < 1:
        return Fit(slope, math.inf)
    residual = yc - slope * xc
    return Fit(slope, t975(dof) * math.sqrt(float(residual @ residual) / dof / sxx))
