"""Slopes of log(rms) against log(width) with 95% confidence intervals, over seeds.

Within one seed every width trains on the same batches, so a seed shifts the whole curve up or down (a batch with a
larger gradient moves every width more) without tilting it. The fit therefore gives each seed its own intercept and
all seeds one slope (least squares on the log values centred per seed); the standard error comes from the
residuals, which hold the width-to-width scatter of the initializations and any curvature of the log-log curve, and
the half-width of the interval is the Student t quantile for ``seeds * widths - seeds - 1`` degrees of freedom times
that standard error.
"""

from __future__ import annotations

import math
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
class Slope:
    """A fitted exponent: rms scales as width**value, value known to +-ci (95%); nan when rms was not finite > 0."""

    value: float
    ci: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value)

    def to_json(self) -> dict[str, float | None]:
        return {"slope": _num(self.value), "ci": _num(self.ci)}


def _num(x: float) -> float | None:
    return round(x, 4) if math.isfinite(x) else None


def fit_slope(widths: list[int], rms: np.ndarray) -> Slope:
    """Fit log(rms[seed, w]) = a_seed + slope * log(widths[w]) through ``rms`` of shape [seeds, len(widths)]."""
    rms = np.atleast_2d(np.asarray(rms, dtype=float))
    if rms.shape[-1] != len(widths):
        raise ValueError(f"rms has {rms.shape[-1]} columns for {len(widths)} widths")
    if not np.all(np.isfinite(rms)) or np.any(rms <= 0):
        return Slope(math.nan, math.inf)
    x = np.log(np.asarray(widths, dtype=float))
    xc = np.broadcast_to(x - x.mean(), rms.shape)
    yc = np.log(rms) - np.log(rms).mean(axis=1, keepdims=True)
    sxx = float((xc * xc).sum())
    slope = float((xc * yc).sum()) / sxx
    residuals = yc - slope * xc
    df = rms.size - rms.shape[0] - 1
    se = math.sqrt(float((residuals * residuals).sum()) / df / sxx) if df > 0 else math.inf
    return Slope(slope, t975(df) * se)
