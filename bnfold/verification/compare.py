"""Comparing a candidate's tensors with the reference's.

The default criterion is scale-aware: the error of a tensor is ``max|got - ref| / max|ref|``, so a
tensor of tiny activations is judged like one of large ones.

* An output passes when its error is at most ``max(BASELINE_FACTOR * floor, FLOOR_SHARE *
  THRESHOLDS[dtype])``, where ``floor`` is the error of onnxruntime's own BASIC-level run of the
  original (its own Conv+BN fusion): what float rounding alone does on this model. Deep networks
  amplify rounding; the bound grows with it, and only with it. Without a floor (no baseline, or one
  that fused nothing), the bound is the dtype's threshold.
* A layer (``--per-layer``) is judged per channel along axis 1, so that one wrong channel among
  a thousand shows: its error is the worst channel's ``max|d_c| / max|ref_c|``. Rounding noise grows
  gradually with depth while a wrong layer jumps: a layer diverges when its error exceeds the
  dtype's threshold, ``LAYER_JUMP`` times the largest error of the layers before it, and
  ``BASELINE_FACTOR`` times onnxruntime's own fusion's error of the same layer (its floor).
* With ``rtol``/``atol`` given, elementwise tolerances decide instead: an element fails when its
  error is above both ``atol`` and ``rtol * |ref|``.

NaN and Inf must sit at the same places with the same values in both models, whatever the criterion.
The thresholds come from measurements on calibrated networks (README, "How verification works").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..report import ErrorStats

THRESHOLDS = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
TF32_THRESHOLD = 1e-2  # float32 outputs computed with TF32 (10-bit mantissa) products
BASELINE_FACTOR = 4.0
FLOOR_SHARE = 0.01  # with a floor, the bound is at least this share of the dtype's threshold
LAYER_JUMP = 10.0
CHANNEL_FLOOR = 1e-3  # a channel's magnitude counts as at least this share of the layer's
PERCENTILES = (50.0, 90.0, 99.0)


def threshold(dtype: np.dtype, tf32: bool = False) -> float:
    if dtype.kind in "iub":
        return 0.0
    if tf32 and dtype == np.float32:
        return TF32_THRESHOLD
    return THRESHOLDS.get(dtype.name, THRESHOLDS["float32"])


def new_stats(
    name: str, dtype: np.dtype, provider: str, rtol: float | None, atol: float | None, tf32: bool = False
) -> ErrorStats:
    if rtol is None and atol is None:
        return ErrorStats(name, provider=provider, criterion="scaled", threshold=threshold(dtype, tf32))
    exact = dtype.kind in "iub"
    return ErrorStats(
        name,
        provider=provider,
        criterion="elementwise",
        rtol=0.0 if exact else (rtol or 0.0),
        atol=0.0 if exact else (atol or 0.0),
    )


def _float64(a: np.ndarray) -> np.ndarray:
    return a.astype(np.int64 if a.dtype == np.bool_ else np.float64)


def accumulate(stats: ErrorStats, ref: np.ndarray, got: np.ndarray, sample: int = 0, channels: bool = False) -> None:
    """Add one sample's comparison of ``got`` against ``ref``; ``channels`` also keeps per-channel
    maxima along axis 1 (layers)."""
    if ref.shape != got.shape:
        stats.shape_mismatch = True
        return
    ref64, got64 = _float64(ref), _float64(got)
    finite = np.isfinite(ref64) & np.isfinite(got64)
    # NaN and Inf agree only where both sides hold the same value at the same place.
    same_special = (np.isnan(ref64) & np.isnan(got64)) | (ref64 == got64)
    stats.nonfinite_mismatches += int(np.count_nonzero(~finite & ~same_special))
    with np.errstate(all="ignore"):  # Inf - Inf where both are special: masked out here
        diff = np.where(finite, np.abs(ref64 - got64), 0.0)
        mag = np.where(finite, np.abs(ref64), 0.0)
    n = int(np.count_nonzero(finite))
    if not n:
        return
    stats.elements += n
    stats.ref_max = max(stats.ref_max, float(mag.max()))
    stats.ref_sum += float(mag.sum())
    worst = int(np.argmax(diff))
    if float(diff.flat[worst]) > stats.max_abs or stats.max_index is None:
        stats.max_abs = float(diff.flat[worst])
        stats.max_index = [sample, *(int(i) for i in np.unravel_index(worst, diff.shape))]
    values = diff[finite]
    for k, q in enumerate(np.percentile(values, PERCENTILES)):
        stats.percentiles[k] = max(stats.percentiles[k], float(q))
    if stats.criterion == "elementwise":
        ref_f = mag[finite]
        bad = (values > stats.atol) & (values > stats.rtol * ref_f)
        stats.mismatches += int(np.count_nonzero(bad))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(ref_f > 0, values / ref_f, np.where(values > 0, np.inf, 0.0))
        over_r = values > stats.rtol * ref_f
        if over_r.any():
            stats.atol_needed = max(stats.atol_needed, float(values[over_r].max()))
        over_a = values > stats.atol
        if over_a.any():
            stats.rtol_needed = max(stats.rtol_needed, float(rel[over_a].max()))
    if channels and diff.ndim >= 2:
        axes = tuple(k for k in range(diff.ndim) if k != 1)
        d_c, r_c = diff.max(axis=axes), mag.max(axis=axes)
        if stats.channel_diff is None or stats.channel_ref is None:
            stats.channel_diff, stats.channel_ref = d_c, r_c
        else:
            stats.channel_diff = np.maximum(stats.channel_diff, d_c)
            stats.channel_ref = np.maximum(stats.channel_ref, r_c)


def scaled_error(stats: ErrorStats) -> float:
    if stats.ref_max > 0:
        return stats.max_abs / stats.ref_max
    return 0.0 if stats.max_abs == 0 else float("inf")


def channel_error(stats: ErrorStats) -> tuple[float, int | None]:
    """The worst channel's error, and which channel; the tensor's own error without channels."""
    if stats.channel_diff is None or stats.channel_ref is None:
        return scaled_error(stats), None
    ref = np.maximum(stats.channel_ref, CHANNEL_FLOOR * stats.ref_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.where(ref > 0, stats.channel_diff / ref, np.where(stats.channel_diff > 0, np.inf, 0.0))
    c = int(np.argmax(e))
    return float(e[c]), c


def output_bound(threshold: float, floor: float | None) -> tuple[float, str]:
    """The bound an output's error is held to, and what set it. Without a floor (no baseline, or a
    baseline that fused nothing: its error is exactly 0, which says nothing of rounding), the dtype's
    threshold. With one, ``BASELINE_FACTOR`` times it, but never below ``threshold * FLOOR_SHARE``
    (a few units of the dtype's rounding): where onnxruntime's own fusion rounds far less than the
    threshold allows, a candidate several times above it fails (a wrong epsilon on HRNet-W18-small
    measured 1.2e-5 against a floor of 2e-6, well under 1e-4); where it rounds more, the bound grows
    with it."""
    if not floor:
        return threshold, "threshold"
    bound = max(BASELINE_FACTOR * floor, threshold * FLOOR_SHARE)
    return bound, "baseline"


def judge_outputs(outputs: Sequence[ErrorStats], floors: Sequence[float | None]) -> None:
    """Set each output's error, bound and verdict (``floors``: the baseline's error per output)."""
    for stats, floor in zip(outputs, floors, strict=False):
        stats.error = scaled_error(stats)
        stats.baseline_error = floor
        if stats.criterion == "scaled":
            stats.bound, stats.decided_by = output_bound(stats.threshold, floor)


def judge_layers(layers: Sequence[ErrorStats], floors: Mapping[str, float] | None = None) -> None:
    """Set each layer's per-channel error and verdict, in graph order (see the module's text);
    ``floors``: the baseline's error of each layer, same measure."""
    worst_before = 0.0
    for stats in layers:
        stats.error, stats.worst_channel = channel_error(stats)
        floor = (floors or {}).get(stats.name)
        if stats.criterion == "scaled":
            stats.baseline_error = floor
            bounds = {
                "threshold": stats.threshold,
                "jump": LAYER_JUMP * worst_before,
                "baseline": BASELINE_FACTOR * (floor or 0.0),
            }
            stats.decided_by = max(bounds, key=lambda k: bounds[k])  # the threshold where they tie
            stats.bound = bounds[stats.decided_by]
        if np.isfinite(stats.error):
            worst_before = max(worst_before, stats.error)
