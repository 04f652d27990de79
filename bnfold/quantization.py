"""QuantizeLinear and DequantizeLinear with integer outputs, in plain numpy, as the ONNX operators
define them (opsets 10 to 23, per-tensor and per-axis): the reference the quantized folds are derived
from and tested against. No onnx imports.

``quantize``: ``saturate(round_half_to_even(x / scale) + zero_point)``, the division in the input's
own float type (as onnxruntime and the ONNX reference compute it: a division in float64 could round
a tie the other way). ``dequantize``: ``(x - zero_point) * scale`` in the scale's type; computed in
float64 and cast once, which gives the same values (the integer difference and the scale are exact
in float64, and their product is rounded once to the scale's type either way).
"""

from __future__ import annotations

import numpy as np

INTEGER_TYPES = (np.int8, np.uint8, np.int16, np.uint16)


def _along(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A scalar as it is; a 1-D per-axis parameter shaped to broadcast along ``axis`` of a rank-``ndim`` value."""
    if v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis] = v.size
    return v.reshape(shape)


def quantize(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None, axis: int = 1, dtype: np.dtype | None = None
) -> np.ndarray:
    """QuantizeLinear: integers of ``dtype`` (the zero point's, else uint8)."""
    out_type = np.dtype(dtype if dtype is not None else (zero_point.dtype if zero_point is not None else np.uint8))
    axis = axis % x.ndim if x.ndim else 0
    s = _along(np.asarray(scale), x.ndim, axis)
    with np.errstate(all="ignore"):
        q = np.rint(x / s.astype(x.dtype)).astype(np.float64)  # rint rounds half to even
    if zero_point is not None:
        q = q + _along(np.asarray(zero_point), x.ndim, axis).astype(np.float64)
    info = np.iinfo(out_type)
    clipped: np.ndarray = np.clip(q, info.min, info.max)
    return clipped.astype(out_type)


def dequantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None, axis: int = 1) -> np.ndarray:
    """DequantizeLinear: ``(x - zero_point) * scale``, of the scale's type."""
    axis = axis % x.ndim if x.ndim else 0
    s = np.asarray(scale)
    diff = x.astype(np.float64)
    if zero_point is not None:
        diff = diff - _along(np.asarray(zero_point), x.ndim, axis).astype(np.float64)
    return (diff * _along(s, x.ndim, axis).astype(np.float64)).astype(s.dtype)


def complement(q: np.ndarray) -> np.ndarray:
    """The integers that dequantize to the negated value with the complemented zero point: for a
    type of range [lo, hi], ``lo + hi - q`` (``-1 - q`` for signed types, ``hi - q`` for unsigned).
    ``(c(q) - c(z)) = -(q - z)`` exactly, and every value of the type has a complement in it, so a
    channel scaled by a negative factor keeps its integers up to this map: none is re-rounded."""
    info = np.iinfo(q.dtype)
    return (info.min + info.max - q.astype(np.int64)).astype(q.dtype)
