"""Is a folded tensor safe in its destination dtype, and what hazards does a fold create?

A fold rescales weights channel by channel, in float64, then casts once. It is *unsafe* (refused)
when the result is not what the unfolded graph computed:

* an element that was finite becomes Inf or NaN (overflow of the destination dtype, ``inf * 0``);
* a channel whose largest value was a normal number of the destination dtype is scaled into its
  subnormal range or to zero (its values lose their precision together; a single small value becoming
  subnormal in a channel of normal values is ordinary rounding, as in the unfolded graph);
* the float64 arithmetic itself overflows or is invalid.

Hazards do not block a fold (unless ``--strict``) but are reported: extreme scale factors, dead
channels, weight-range inflation that matters to per-tensor int8 quantization, and in 16-bit types a
cast that loses more than the dtype's own rounding (subnormal results).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..report import Code, Reason

EXTREME_HIGH, EXTREME_LOW = 1e3, 1e-3
INFLATION = 10.0  # max|W'| / max|W| above this (or below its inverse) is reported
SPREAD_GROWTH = 4.0  # (largest / median channel range) growing by more than this is reported
CHUNK_ELEMENTS = 1 << 22  # weights are checked this many elements at a time
UNKNOWN_SUM = 1 << 31  # values an average pool adds up when its window's size is not known


@dataclass(frozen=True)
class Hazard:
    """Something a fold creates that does not change the result but may matter downstream."""

    code: str  # extreme_scale, dead_channel, range_inflation, precision_loss
    bn: str
    tensor: str
    message: str
    numbers: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "bn": self.bn, "tensor": self.tensor, "message": self.message, **self.numbers}


def finfo(dtype: np.dtype) -> tuple[float, float, float]:
    """(largest finite, smallest normal, unit roundoff) of a float dtype, bfloat16 included."""
    try:
        info = np.finfo(dtype)
    except (TypeError, ValueError):
        import ml_dtypes

        info = ml_dtypes.finfo(dtype)  # type: ignore[no-untyped-call]  # ml_dtypes ships no annotations for it
    return float(info.max), float(info.tiny), float(info.eps) / 2


def parameter_problem(params: dict[str, np.ndarray], epsilon: float) -> Reason | None:
    """Non-finite BN parameters, or ``var + epsilon <= 0``: the BN stays, with its own reason."""
    for role, value in params.items():
        bad = ~np.isfinite(value.astype(np.float64))
        if bad.any():
            c = int(np.flatnonzero(bad)[0])
            return Reason(Code.NONFINITE_PARAMETER, f"{role} holds {value.reshape(-1)[c]} at channel {c}")
    denom = params["var"].astype(np.float64) + np.float64(epsilon)
    if (denom <= 0).any():
        c = int(np.flatnonzero(denom.reshape(-1) <= 0)[0])
        return Reason(Code.NONPOSITIVE_VARIANCE, f"var + epsilon = {denom.reshape(-1)[c]:g} at channel {c}")
    return None


def scale_hazards(bn: str, s: np.ndarray) -> list[Hazard]:
    out: list[Hazard] = []
    a = np.abs(s)
    if a.size and ordinary_scales(a.min(), a.max()):  # no dead, no extreme channel
        return out
    dead = np.flatnonzero(a == 0)
    if dead.size:
        out.append(
            Hazard(
                "dead_channel",
                bn,
                "",
                f"{dead.size} channel(s) scaled to 0 (first: {int(dead[0])}): their output is the bias alone",
                {"channels": float(dead.size), "channel": float(dead[0])},
            )
        )
    live = a[a > 0]
    if live.size and (live.max() > EXTREME_HIGH or live.min() < EXTREME_LOW):
        c = int(np.argmax(a)) if live.max() > EXTREME_HIGH else int(np.flatnonzero(a == live.min())[0])
        out.append(
            Hazard(
                "extreme_scale",
                bn,
                "",
                f"scale factor {s[c]:.3g} at channel {c}",
                {
                    "channel": float(c),
                    "scale": float(s[c]),
                    "max_abs_scale": float(live.max()),
                    "min_abs_scale": float(live.min()),
                },
            )
        )
    return out


@dataclass
class _Pass:
    """What one pass over a weight and its scaled version found."""

    before: np.ndarray  # per channel: max |W|
    after: np.ndarray  # per channel: max |W'| (float64, before the cast)
    cast_error: float = 0.0  # largest change the cast made, relative to the channel's range


WeightRanges = _Pass  # what check_weight found, for weight_hazards


def _chunks(w: np.ndarray, factor: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rows = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(w.shape[1:]))))
    full = factor.ndim == w.ndim and factor.shape[0] == w.shape[0] and w.shape[0] > 1
    for start in range(0, max(w.shape[0], 1), rows):
        stop = start + rows
        yield w[start:stop], factor[start:stop] if full else factor


def largest_magnitude(w: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """max |w| over ``axes``, in float64, without an absolute copy of ``w`` (NaN stays NaN)."""
    largest: np.ndarray = np.maximum(w.max(axis=axes), -w.min(axis=axes))
    return largest.astype(np.float64)


def ordinary_scales(smallest: Any, largest: Any) -> Any:
    """Whether scales whose magnitudes span [smallest, largest] are neither dead nor extreme
    (scalars or arrays, elementwise)."""
    return (smallest >= EXTREME_LOW) & (largest <= EXTREME_HIGH)


def flushed_channels(before: np.ndarray, after: np.ndarray, tiny: float) -> np.ndarray:
    """Channels whose largest magnitude was a normal number and is scaled below the normal range."""
    return (before >= tiny) & (after < tiny) & (after > 0)


def inflated(ratio: Any, spread_before: Any, spread_after: Any) -> Any:
    """Whether a fold's range change matters to per-tensor int8 quantization (scalars or arrays)."""
    return (ratio > INFLATION) | (ratio < 1 / INFLATION) | (spread_after > SPREAD_GROWTH * spread_before)


def medians(rows: np.ndarray) -> np.ndarray:
    """Each row's median of a 2-D float array without NaN: a sort, then the middle (np.median costs
    ten times as much on small rows)."""
    v = np.sort(rows, axis=1)
    n = v.shape[1]
    return v[:, n // 2] if n % 2 else (v[:, n // 2 - 1] + v[:, n // 2]) / 2


def _per_channel(w: np.ndarray, factor: np.ndarray, axis: int, top: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel ranges before and after, without scaling the weight, when that is exact: the
    factor varies along ``axis`` only (rounding is monotone, so the largest scaled value of a channel
    is its largest value scaled), every value is finite and every scaled range fits the dtype. In
    16-bit types the cast's own error is needed, element by element: None, as in every other case."""
    if w.dtype.itemsize <= 2 or not w.ndim or not w.size or factor.ndim > w.ndim:
        return None
    shape = (1,) * (w.ndim - factor.ndim) + factor.shape
    if any(d != 1 for k, d in enumerate(shape) if k != axis) or shape[axis] not in (1, w.shape[axis]):
        return None
    before = largest_magnitude(w, tuple(k for k in range(w.ndim) if k != axis))
    f = np.abs(np.broadcast_to(factor.reshape(-1), (w.shape[axis],)))
    with np.errstate(all="ignore"):
        after = before * f
    if not (np.isfinite(before).all() and (after <= top).all()):
        return None
    return before, after


def _flushed(tensor: str, dtype: np.dtype, tiny: float, before: np.ndarray, after: np.ndarray) -> Reason | None:
    """A channel whose largest value was a normal number and is scaled below the normal range loses
    its precision as a whole (or vanishes): single small values becoming subnormal do not matter."""
    flushed = flushed_channels(before, after, tiny)
    if flushed.any():
        c = int(np.flatnonzero(flushed)[0])
        return Reason(
            Code.UNSAFE_FOLD,
            f"'{tensor}' channel {c}: its largest value {before[c]:.4g} becomes "
            f"{after[c]:.4g}, below {dtype}'s smallest normal number {tiny:g}",
        )
    return None


class _Ranges:
    """Per-channel max |w| before and after the scaling, and the cast's largest error, filled chunk
    by chunk: rows of the weight when the channels are its axis 0, a running maximum otherwise."""

    def __init__(self, channels: int) -> None:
        self.before, self.after, self.cast_abs = np.zeros(channels), np.zeros(channels), np.zeros(channels)

    def add(self, axis: int, offset: int, b: np.ndarray, a: np.ndarray, e: np.ndarray | None = None) -> None:
        if axis == 0:
            span = slice(offset, offset + b.size)
            self.before[span], self.after[span] = b, a
            if e is not None:
                self.cast_abs[span] = e
        else:
            self.before, self.after = np.maximum(self.before, b), np.maximum(self.after, a)
            if e is not None:
                self.cast_abs = np.maximum(self.cast_abs, e)


def check_weight(tensor: str, w: np.ndarray, factor: np.ndarray, axis: int) -> Reason | _Pass:
    """Scale ``w`` by ``factor`` in float64 as the fold will, and either refuse (unsafe) or return
    per-channel ranges (along ``axis``) and the cast's largest error relative to its channel's range."""
    dtype = w.dtype
    top, tiny, _ = finfo(dtype)
    quick = _per_channel(w, factor, axis, top)
    if quick is not None:
        before, after = quick
        return _flushed(tensor, dtype, tiny, before, after) or _Pass(before, after, 0.0)
    ranges = _Ranges(w.shape[axis] if w.ndim else 1)
    offset = 0
    with np.errstate(all="ignore"):
        for chunk, f in _chunks(w, factor):
            problem = _chunk_ranges(tensor, chunk, f, axis, offset, top, ranges)
            if problem is not None:
                return problem
            offset += chunk.shape[0] if chunk.ndim else 1
    flushed = _flushed(tensor, dtype, tiny, ranges.before, ranges.after)
    if flushed is not None:
        return flushed
    after = ranges.after
    with np.errstate(all="ignore"):
        rel = np.where(after > 0, ranges.cast_abs / np.where(after > 0, after, 1), 0)
    return _Pass(ranges.before, after, float(rel.max(initial=0)) if dtype.itemsize <= 2 else 0.0)


def _chunk_ranges(
    tensor: str, chunk: np.ndarray, f: np.ndarray, axis: int, offset: int, top: float, ranges: _Ranges
) -> Reason | None:
    """Add one chunk of rows to ``ranges``, or refuse it: a scaled value that is not finite in the
    weight's dtype where the weight's value was."""
    dtype = chunk.dtype
    w64 = chunk.astype(np.float64)
    p = w64 * f
    axes = tuple(i for i in range(chunk.ndim) if i != axis)
    if chunk.ndim and chunk.size and dtype.itemsize > 2:
        ap = np.abs(p)
        if ap.max() <= top:  # every value finite and in range (NaN fails the comparison)
            ranges.add(axis, offset, np.abs(w64).max(axis=axes), ap.max(axis=axes))
            return None
    finite = np.isfinite(w64)
    bad = finite & ~np.isfinite(p)
    if not bad.any():
        bad = finite & (np.abs(p) > top)
        if bad.any():
            rounded = p[bad].astype(dtype).astype(np.float64)
            bad[bad] = ~np.isfinite(rounded)
    if bad.any() or (np.isnan(p) & ~np.isnan(w64)).any():
        bad = bad | (np.isnan(p) & ~np.isnan(w64))
        k = np.unravel_index(int(np.flatnonzero(bad)[0]), bad.shape)
        channel = k[axis] + (offset if axis == 0 else 0) if chunk.ndim else 0
        return Reason(
            Code.UNSAFE_FOLD,
            f"'{tensor}' at channel {channel}: {float(w64[k]):.4g} x "
            f"{float(np.broadcast_to(f, p.shape)[k]):.4g} = {float(p[k]):.4g}, "
            f"which is not finite in {dtype}",
        )
    good = np.isfinite(p)
    err = np.where(good, np.abs(np.where(good, p, 0).astype(dtype).astype(np.float64) - np.where(good, p, 0)), 0)
    if chunk.ndim:
        b_c = np.where(finite, np.abs(w64), 0).max(axis=axes, initial=0)
        a_c = np.where(good, np.abs(p), 0).max(axis=axes, initial=0)
        ranges.add(axis, offset, b_c, a_c, err.max(axis=axes, initial=0))
    else:
        ranges.before[0], ranges.after[0], ranges.cast_abs[0] = abs(float(w64)), abs(float(p)), float(err)
    return None


def _sums_in_dtype(dtype: np.dtype) -> bool:
    """Whether runtimes add this dtype up in itself (float32, float64), so that a sum can overflow
    before anything scales or divides it; 16-bit types are summed in a wider one."""
    return np.dtype(dtype) in (np.float32, np.float64)


def _pool_count(summed: int) -> str:
    return "an unknown number of" if summed >= UNKNOWN_SUM else str(summed)


def summed_limit(dtype: np.dtype, summed: int) -> float:
    """The largest magnitude a folded bias may have when an average pool after the layer adds up
    ``summed`` values of it (the sum overflows before the division)."""
    top, _, _ = finfo(dtype)
    return top / summed if summed > 1 and _sums_in_dtype(dtype) else top


def gain_limit(dtype: np.dtype, terms: int, summed: int = 1) -> float:
    """The largest magnitude a folded weight may have when each output of its layer adds up ``terms``
    products (and an average pool after it ``summed`` outputs), or inf where that is not limited:
    the unfolded layer's sums, scaled after summing, could stay finite where the folded layer's
    overflow."""
    if not _sums_in_dtype(dtype):
        return float("inf")
    return summed_limit(dtype, summed) / max(terms, 1)


def check_gain(tensor: str, after: np.ndarray, dtype: np.dtype, terms: int, summed: int = 1) -> Reason | None:
    """Refuse a folded weight whose largest value per channel (``after``) times the ``terms`` each
    output adds up (:func:`gain_limit`) passes the dtype's range."""
    with np.errstate(all="ignore"):
        over = after > gain_limit(dtype, terms, summed)
    if not over.any():
        return None
    c = int(np.flatnonzero(over)[0])
    pool = f" before an average pool adds up {_pool_count(summed)} outputs" if summed > 1 else ""
    return Reason(
        Code.UNSAFE_FOLD,
        f"'{tensor}' at channel {c} would reach {float(after[c]):.4g}, and each output adds up {terms} such "
        f"products{pool}: past the range of {dtype}, where the unfolded layer scales after summing",
    )


def check_bias(what: str, bias: np.ndarray, dtype: np.dtype, summed: int = 1) -> Reason | None:
    """A folded bias must be finite and fit the destination dtype, and when an average pool after
    the layer sums ``summed`` values of it, fit that sum too."""
    top, _, _ = finfo(dtype)
    with np.errstate(all="ignore"):
        bad = ~np.isfinite(bias) | (np.abs(bias) > top)
        if bad.any():
            bad = bad & ~np.isfinite(bias.astype(dtype).astype(np.float64))
    if bad.any():
        c = int(np.flatnonzero(bad.reshape(-1))[0])
        return Reason(
            Code.UNSAFE_FOLD,
            f"{what} at channel {c} would be {bias.reshape(-1)[c]:.4g}, which is not finite in {dtype}",
        )
    limit = summed_limit(dtype, summed)
    with np.errstate(all="ignore"):
        over = np.abs(bias) > limit
    if over.any():
        c = int(np.flatnonzero(over.reshape(-1))[0])
        return Reason(
            Code.UNSAFE_FOLD,
            f"{what} at channel {c} would be {bias.reshape(-1)[c]:.4g}; an average pool after it adds up "
            f"{_pool_count(summed)} such values, past the range of {dtype}",
        )
    return None


def _median(values: np.ndarray) -> float:
    return float(medians(values.reshape(1, -1))[0])


def _range_change(ratio: float) -> str:
    """How the fold moves the weight's largest magnitude, in words that match the number."""
    if ratio >= 1:
        return f"max|W| grows {ratio:.3g}x"
    return f"max|W| shrinks to {ratio:.3g} of what it was"


def weight_hazards(bn: str, tensor: str, dtype: np.dtype, found: _Pass) -> list[Hazard]:
    out = []
    b_max, a_max = float(found.before.max(initial=0)), float(found.after.max(initial=0))
    if b_max > 0 and a_max > 0:
        ratio = a_max / b_max
        spread_b = b_max / max(_median(found.before), 1e-300)
        spread_a = a_max / max(_median(found.after), 1e-300)
        if inflated(ratio, spread_b, spread_a):
            out.append(
                Hazard(
                    "range_inflation",
                    bn,
                    tensor,
                    f"{_range_change(ratio)}; largest/median channel range {spread_b:.3g} -> {spread_a:.3g} "
                    "(per-tensor int8 quantization loses resolution)",
                    {"max_ratio": ratio, "spread_before": spread_b, "spread_after": spread_a},
                )
            )
    _, _, unit = finfo(dtype)
    if found.cast_error > unit * (1 + 1e-6):
        out.append(
            Hazard(
                "precision_loss",
                bn,
                tensor,
                f"the cast to {dtype} changes a value by {found.cast_error:.3g} relative (the dtype's own "
                f"rounding is {unit:.3g}): subnormal results",
                {"cast_error": found.cast_error, "unit_roundoff": unit},
            )
        )
    return out
