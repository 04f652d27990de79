"""Checks shared by every family of folds: is this BN an inference-mode per-channel affine map?"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import onnx

from ..batchnorm import DEFAULT_EPSILON, OPSET_VERSIONS, scale_shift
from ..graph import ONNX_DOMAINS, GraphIndex, attr
from ..report import Reason

FLOAT_KINDS = ("f", "V")  # numpy float kinds; ml_dtypes' bfloat16 reports kind "V"


@dataclass
class Affine:
    """``y = s * x + t`` along axis 1, s and t in float64 of shape (C,)."""

    s: np.ndarray
    t: np.ndarray


def is_batchnorm(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ONNX_DOMAINS


def bn_version(opset: int) -> int:
    return max((v for v in OPSET_VERSIONS if v <= max(opset, 1)), default=1)


def is_float(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" or array.dtype.name == "bfloat16"


def node_label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def check_batchnorm(index: GraphIndex, node: onnx.NodeProto) -> Union[Affine, Reason]:
    """The BN's affine map, or why it is not a fixed per-channel affine map."""
    version = bn_version(index.opset)
    if version >= 14 and attr(node, "training_mode", 0):
        return Reason("training_mode", "training_mode=1: it normalizes with the statistics of each batch")
    if version <= 6 and not attr(node, "is_test", 0):
        return Reason(
            "training_mode",
            f"is_test=0: BatchNormalization-{version} then normalizes with the statistics of each batch",
        )
    extra = [o for o in node.output[1:] if o]
    if extra:
        return Reason("statistics_outputs", f"outputs {', '.join(extra)} are requested, which only training mode computes")
    params = []
    for role, name in zip(("scale", "B", "mean", "var"), node.input[1:5]):
        if index.is_overridable(name):
            return Reason("overridable_initializer", f"{role} '{name}' is a graph input a caller may override")
        value = index.constant(name)
        if value is None:
            return Reason("non_constant_parameter", f"{role} '{name}' is computed at run time")
        params.append(value)
    if len({p.shape for p in params}) != 1 or params[0].ndim < 1:
        shapes = ", ".join(str(p.shape) for p in params)
        return Reason("channel_mismatch", f"its parameters have inconsistent shapes {shapes}")
    s, t = scale_shift(*params, epsilon=attr(node, "epsilon", DEFAULT_EPSILON))
    if s.ndim > 1:  # spatial=0: per-activation parameters (C, D1, ...)
        flat_s, flat_t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
        if not (np.all(flat_s == flat_s[:, :1]) and np.all(flat_t == flat_t[:, :1])):
            return Reason("per_activation_parameters", f"spatial=0 parameters of shape {s.shape} vary along the spatial axes")
        s, t = flat_s[:, 0], flat_t[:, 0]
    return Affine(s, t)


def scaled(w: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``w * factor`` computed in float64 and cast once to ``w``'s dtype, without a float64 copy of
    the whole weight (numpy casts in buffered chunks)."""
    if w.dtype in (np.float16, np.float32, np.float64):
        out = np.empty(np.broadcast_shapes(w.shape, factor.shape), dtype=w.dtype)
        return np.multiply(w, factor, out=out, dtype=np.float64, casting="unsafe")
    return (w.astype(np.float64) * factor).astype(w.dtype)  # bfloat16: numpy has no such loop


def channel_vector(value: np.ndarray, rank: Optional[int], channels: int) -> Optional[np.ndarray]:
    """``value`` as a float64 (C,) vector if, broadcast against a rank-``rank`` tensor with C channels
    on axis 1, it varies along axis 1 only; else None."""
    if rank is None or rank < 2 or value.ndim > rank or not is_float(value) and value.dtype.kind not in "iu":
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for k, d in enumerate(shape) if k != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (channels,)).copy()
