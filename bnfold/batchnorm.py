"""BatchNormalization inference with fixed statistics, in plain numpy.

This is the reference every fold is derived from: a BN in inference mode is the per-channel affine
map ``y = s * x + t`` with ``s = scale / sqrt(var + eps)`` and ``t = bias - mean * s``. Nothing here
knows about ONNX graphs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_EPSILON = 1e-5
OPSET_VERSIONS = (1, 6, 7, 9, 14, 15)
_FLOATS = (np.float16, np.float32, np.float64)


class TrainingModeError(ValueError):
    """Raised when asked to evaluate a BatchNormalization that runs in training mode."""


ArrayLike = np.ndarray | float | Sequence[float]


def scale_shift(
    scale: ArrayLike,
    bias: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    epsilon: float | np.ndarray = DEFAULT_EPSILON,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(s, t)`` in float64 such that BN(x) == s * x + t along the channel axis (``epsilon``
    may be an array broadcasting against the parameters: many BNs at once)."""
    g, b, m, v = (np.asarray(a, dtype=np.float64) for a in (scale, bias, mean, var))
    s = g / np.sqrt(v + np.asarray(epsilon, dtype=np.float64))
    return s, b - m * s


def _param_shape(x_ndim: int, param: np.ndarray, spatial: bool) -> tuple[int, ...]:
    # Spatial parameters have shape (C,); per-activation ones (spatial=0) have shape (C, D1, ...).
    if spatial or param.ndim == 1:
        return (-1,) + (1,) * (x_ndim - 2)
    if param.ndim != x_ndim - 1:
        raise ValueError(f"per-activation parameters need shape (C, D1, ...), got {param.shape}")
    return param.shape


def batchnorm_inference(
    x: ArrayLike,
    scale: ArrayLike,
    bias: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    epsilon: float = DEFAULT_EPSILON,
    *,
    opset: int = 15,
    spatial: int = 1,
    training_mode: int = 0,
    is_test: int = 1,
) -> np.ndarray:
    """Evaluate BatchNormalization in inference mode, as ONNX opset ``opset`` defines it.

    ``x`` has rank 2 to 5 with channels on axis 1. Parameters may be float16, float32 or float64 and
    (opset 15) of a different float type than ``x``; the result has the dtype of ``x`` and is computed
    in float64. ``spatial=0`` (opsets 1, 6 and 7 only) takes per-activation parameters of shape
    ``(C, D1, ...)``. Training mode (``training_mode=1``, or ``is_test=0`` in opsets 1 and 6) computes
    batch statistics instead and is rejected with :class:`TrainingModeError`.
    """
    if opset not in OPSET_VERSIONS:
        raise ValueError(f"BatchNormalization has no opset version {opset}; known: {OPSET_VERSIONS}")
    if opset >= 14 and training_mode:
        raise TrainingModeError("training_mode=1 normalizes with batch statistics, not inference")
    if opset <= 6 and not is_test:
        raise TrainingModeError(f"BatchNormalization-{opset} with is_test=0 runs in training mode")
    if opset > 7 and not spatial:
        raise ValueError(f"spatial=0 does not exist in BatchNormalization-{opset}")
    x = np.asarray(x)
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float16, float32 or float64, got {x.dtype}")
    if not 2 <= x.ndim <= 5:
        raise ValueError(f"x must have rank 2 to 5, got shape {x.shape}")
    params = [np.asarray(p) for p in (scale, bias, mean, var)]
    if opset < 15 and any(p.dtype != x.dtype for p in params):
        raise TypeError(f"BatchNormalization-{opset} needs parameters of the input's dtype {x.dtype}")
    shape = _param_shape(x.ndim, params[0], bool(spatial))
    s, t = scale_shift(params[0], params[1], params[2], params[3], epsilon=epsilon)
    y: np.ndarray = x.astype(np.float64) * s.reshape(shape) + t.reshape(shape)
    return y.astype(x.dtype)
