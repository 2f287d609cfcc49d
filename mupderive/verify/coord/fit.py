"""Slopes of log(rms) against log(width) with 95% confidence intervals, over seeds.

Within one seed every width trains on the same batches, so a seed shifts the whole curve up or down (a batch with a
larger gradient moves every width more) without tilting it. The fit therefore gives each seed its own intercept and
all seeds one slope (least squares on the log values centred per seed); the standard error comes from the
residuals, which hold the width-to-width scatter of the initializations and any curvature of the log-log curve, and
the half-width of the interval is the Student t quantile for ``seeds * widths - seeds - 1`` degrees of freedom times
that standard error. The fit itself is :func:`mupderive.verify.fit.fit_slope`, the oracle's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mupderive.verify import fit as fits


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
    seeds = rms.shape[0]
    fit = fits.fit_slope(np.tile(widths, seeds), rms.ravel(), np.repeat(np.arange(seeds), len(widths)))
    return Slope(fit.slope, fit.ci)
