"""Log-log slope fits with a confidence interval: ``log y = a_seed + s log n`` by least squares.

Each seed gets its own intercept (a seed is the same data at every width, so its overall level is not noise in the
slope); the interval is the 95% Student-t interval of the common slope from the residuals, so width-to-width noise and
curvature across widths (sub-leading terms) both widen it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_Z = 1.959963984540054  # 97.5% quantile of the standard normal


@dataclass(frozen=True)
class Fit:
    """A fitted slope ``slope`` with 95% half-width ``ci`` from ``points`` (width, value) pairs."""

    slope: float
    ci: float
    intercept: float
    points: int


def t_quantile(dof: int) -> float:
    """97.5% quantile of Student's t with ``dof`` degrees of freedom (Cornish-Fisher expansion; exact within 1%
    for dof >= 3)."""
    if dof < 1:
        return math.inf
    z, v = _Z, float(dof)
    return z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2) + (
        3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)


def fit_slope(widths: Sequence[float], values: Sequence[float], groups: Sequence[object] | None = None) -> Fit:
    """Least-squares slope of ``log values`` against ``log widths`` (all values > 0), with one intercept per group
    (``groups[k]`` labels point ``k``; default: one group). ``intercept`` is the mean level at the mean width."""
    x = np.log(np.asarray(widths, dtype=float))
    y = np.log(np.asarray(values, dtype=float))
    labels = np.asarray([0] * len(x) if groups is None else [hash(g) for g in groups])
    xc, yc = x.copy(), y.copy()
    for label in np.unique(labels):
        mask = labels == label
        xc[mask] -= x[mask].mean()
        yc[mask] -= y[mask].mean()
    sxx = float(xc @ xc)
    if sxx == 0:
        raise ValueError("a slope needs values at two or more widths")
    slope = float(xc @ yc) / sxx
    intercept = float(y.mean() - slope * x.mean())
    dof = len(x) - len(np.unique(labels)) - 1
    if dof < 1:
        return Fit(slope, math.inf, intercept, len(x))
    residual = yc - slope * xc
    se = math.sqrt(float(residual @ residual) / dof / sxx)
    return Fit(slope, t_quantile(dof) * se, intercept, len(x))
