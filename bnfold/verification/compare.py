"""Comparing a candidate's tensors with the reference's: elementwise tolerances by dtype."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..report import ErrorStats

# (rtol, atol) by output dtype; an element fails only when it is outside both.
DEFAULT_TOLERANCES = {
    "float64": (1e-4, 1e-5),
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 1e-3),
    "bfloat16": (2e-2, 1e-2),
}
TF32_TOLERANCES = (5e-3, 5e-4)  # what TF32 (10-bit mantissa products) needs for float32 outputs


def tolerance(dtype: np.dtype, rtol: Optional[float], atol: Optional[float], tf32: bool) -> Tuple[float, float]:
    if dtype.kind in "iub":
        base = (0.0, 0.0)
    elif tf32 and dtype == np.float32:
        base = TF32_TOLERANCES
    else:
        base = DEFAULT_TOLERANCES.get(dtype.name, DEFAULT_TOLERANCES["float32"])
    return (base[0] if rtol is None else rtol, base[1] if atol is None else atol)


def _float64(a: np.ndarray) -> np.ndarray:
    return a.astype(np.int64 if a.dtype == np.bool_ else np.float64)


def accumulate(stats: ErrorStats, ref: np.ndarray, got: np.ndarray) -> None:
    """Add one sample's comparison of ``got`` against ``ref`` to ``stats``."""
    if ref.shape != got.shape:
        stats.shape_mismatch = True
        return
    ref64, got64 = _float64(ref), _float64(got)
    finite = np.isfinite(ref64) & np.isfinite(got64)
    # NaN and Inf agree only where both sides hold the same value at the same place.
    same_special = (np.isnan(ref64) & np.isnan(got64)) | (ref64 == got64)
    stats.nonfinite_mismatches += int(np.count_nonzero(~finite & ~same_special))
    diff = np.abs(ref64[finite] - got64[finite])
    mag = np.abs(ref64[finite])
    n = diff.size
    if not n:
        return
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(mag > 0, diff / mag, np.where(diff > 0, np.inf, 0.0))
    bad = (diff > stats.atol) & (diff > stats.rtol * mag)
    stats.mismatches += int(np.count_nonzero(bad))
    stats.max_abs = max(stats.max_abs, float(diff.max()))
    stats.max_rel = max(stats.max_rel, float(rel.max()))
    total = stats.mean_abs * stats.elements + float(diff.sum())
    stats.elements += n
    stats.mean_abs = total / stats.elements
    over_r = diff > stats.rtol * mag
    if over_r.any():
        stats.atol_needed = max(stats.atol_needed, float(diff[over_r].max()))
    over_a = diff > stats.atol
    if over_a.any():
        stats.rtol_needed = max(stats.rtol_needed, float(rel[over_a].max()))
