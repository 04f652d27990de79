"""Layer weights that reach the layer through a DequantizeLinear of constants: integers (an integer
initializer, or a float constant through a QuantizeLinear, quantized here exactly as that node
does) with a scale and a zero point. A per-output-channel factor ``s`` folds into them exactly:

    s[c] * (q[c] - z[c]) * w[c]  =  (q'[c] - z'[c]) * (w[c] * |s[c]|)

with ``q' = q, z' = z`` where ``s[c] > 0`` and, where ``s[c] < 0``, the complements of the integers
and the zero point (:func:`bnfold.quantization.complement`: ``-1 - q`` in a signed type, ``max - q``
in an unsigned one; always representable, so nothing is re-rounded). Only the scales change
(computed in float64, cast once); the weight still reaches the layer through a DequantizeLinear, now
per channel along the layer's output-channel axis. A bias that is int32 behind its own
DequantizeLinear is re-quantized at ``bias_scale * |s|`` (rounded by up to half a step: a hazard)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..proto import ONNX_DOMAINS, attr, node_label
from ..quantization import INTEGER_TYPES, complement
from ..report import Code, Reason
from .common import Scope
from .safety import Hazard, finfo

DQ = "DequantizeLinear"


@dataclass(frozen=True)
class Quantized:
    """A constant that a DequantizeLinear makes of integers: its node, and the integers, scale, zero
    point (None: absent) and axis (None: per tensor) it reads."""

    dq: int
    integers: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int | None


def _dequantizer(scope: Scope, name: str) -> onnx.NodeProto | None:
    index = scope.index
    p = index.producer.get(name)
    node = index.nodes[p] if p is not None else None
    if node is None or node.op_type != DQ or node.domain not in ONNX_DOMAINS:
        return None
    return node


def find(scope: Scope, name: str, integers: tuple[type, ...] = INTEGER_TYPES) -> Quantized | Reason | None:
    """``name`` as a :class:`Quantized` constant; None when no DequantizeLinear makes it, a Reason
    when one does in a form this fold does not take (or of values that are not constant)."""
    node = _dequantizer(scope, name)
    if node is None:
        return None
    label = f"DequantizeLinear '{node_label(node)}'"
    if attr(node, "block_size", 0):
        return Reason(Code.QUANTIZED_WEIGHT_FORM, f"{label} quantizes in blocks (block_size)")
    if scope.opset < 13:
        return Reason(
            Code.QUANTIZED_WEIGHT_FORM, f"{label}: opset {scope.opset} has no per-channel DequantizeLinear (13 has)"
        )
    inputs = node.input[:]
    values: list[np.ndarray | None] = []
    for role, slot in (("integers", 0), ("scale", 1), ("zero point", 2)):
        n = inputs[slot] if len(inputs) > slot else ""
        if not n:
            values.append(None)
            continue
        if scope.index.is_overridable(n):
            return Reason(
                Code.OVERRIDABLE_INITIALIZER, f"{role} '{n}' of {label} is a graph input a caller may override"
            )
        v = scope.constant(n)
        if v is None:
            return Reason(Code.PRODUCER_WEIGHT_NOT_CONSTANT, f"{role} '{n}' of {label} {scope.not_constant(n)}")
        values.append(v)
    q, scale, zero_point = values
    assert q is not None and scale is not None  # DequantizeLinear's first two inputs are required
    if q.dtype.type not in integers:
        return Reason(Code.QUANTIZED_WEIGHT_FORM, f"{label} reads {q.dtype} integers")
    if scale.ndim > 1 or (not np.issubdtype(scale.dtype, np.floating) and scale.dtype.name != "bfloat16"):
        return Reason(Code.QUANTIZED_WEIGHT_FORM, f"{label} has a scale of shape {scale.shape} and type {scale.dtype}")
    axis = attr(node, "axis", 1) % max(q.ndim, 1) if scale.ndim else None
    return Quantized(scope.index.producer[name], q, scale, zero_point, axis)


def _per_channel(v: np.ndarray, channels: int) -> np.ndarray:
    return np.broadcast_to(v.reshape(-1), (channels,)) if v.size == 1 else v.reshape(-1)


def _scaled(scale: np.ndarray, s: np.ndarray, channels: int) -> np.ndarray:
    """The scale of each of ``channels`` times ``|s|``: computed in float64, cast once to the scale's
    type."""
    with np.errstate(all="ignore"):  # a scale past the type's range: check() refuses it
        out: np.ndarray = (_per_channel(scale.astype(np.float64), channels) * np.abs(s.reshape(-1))).astype(scale.dtype)
    return out


def check(scope: Scope, weight: str, factor: np.ndarray, w_shape: tuple[int, ...], axis: int) -> Reason | None:
    """Why the factor cannot fold into the quantized weight ``weight`` exactly (None: it can): it must
    scale whole slices along the weight's output-channel ``axis`` (its quantization axis, when per
    axis), none by 0, and give scales that stay finite and normal in their type."""
    qw = find(scope, weight)
    if not isinstance(qw, Quantized):
        return qw
    if qw.axis is not None and qw.axis != axis:
        return Reason(
            Code.QUANTIZED_WEIGHT_AXIS,
            f"'{weight}' is quantized along axis {qw.axis}; the fold scales its axis {axis} (the output channels)",
        )
    s = per_axis(factor, w_shape, axis)
    if s is None:
        return Reason(
            Code.QUANTIZED_WEIGHT_AXIS,
            f"'{weight}': the fold scales it by a factor that varies along more than its axis {axis} "
            "(a grouped ConvTranspose), not one number per output channel",
        )
    zero = np.flatnonzero(s == 0)
    if zero.size:
        return Reason(
            Code.QUANTIZED_WEIGHT_ZERO_SCALE,
            f"'{weight}' channel {int(zero[0])}: a factor of 0 would give its DequantizeLinear a zero scale",
        )
    top, tiny, _ = finfo(qw.scale.dtype)
    new = _scaled(qw.scale, s, s.size).astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(new) | (new < tiny) | (new > top))
    if bad.size:
        c = int(bad[0])
        return Reason(
            Code.UNSAFE_FOLD,
            f"'{weight}' channel {c}: its scale times {float(s[c]):.4g} is {float(new[c]):.4g} in {qw.scale.dtype}",
        )
    return None


def per_axis(factor: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray | None:
    """The factor as one number per slice along ``axis`` of a weight of ``shape`` (None when it varies
    along another axis too)."""
    full = np.broadcast_to(factor, np.broadcast_shapes(factor.shape, tuple(shape)))
    first = full[tuple(slice(None) if k == axis else slice(0, 1) for k in range(full.ndim))]
    if not np.array_equal(np.broadcast_to(first, full.shape), full):
        return None
    return np.asarray(first, dtype=np.float64).reshape(-1)


def _channel_slices(ints: np.ndarray, axis: int, negative: np.ndarray) -> np.ndarray:
    """``ints`` with the slices along ``axis`` where ``negative`` complemented."""
    out = np.array(ints, copy=True)
    index: list[slice | np.ndarray] = [slice(None)] * ints.ndim
    index[axis] = np.flatnonzero(negative)
    out[tuple(index)] = complement(ints[tuple(index)])
    return out


def rewrite_weight(scope: Scope, qw: Quantized, s: np.ndarray, axis: int, label: str) -> str:
    """A new DequantizeLinear, beside the old one, that dequantizes to ``s * weight`` along ``axis``
    exactly (up to the cast of the new scales); returns its output. The old one, and what only it
    reads, are dropped once unused."""
    index = scope.index
    channels = qw.integers.shape[axis]
    per_channel = per_axis(s, qw.integers.shape, axis)
    assert per_channel is not None  # check() refused any other factor
    s = per_channel
    negative = s < 0
    ints = _channel_slices(qw.integers, axis, negative)
    scale = _scaled(qw.scale, s, channels)
    inputs = [
        index.add_initializer(ints, f"{label}_weight_quantized"),
        index.add_initializer(scale, f"{label}_weight_scale"),
    ]
    if qw.zero_point is not None or negative.any():
        zp = qw.zero_point if qw.zero_point is not None else np.zeros((), qw.integers.dtype)
        zp_c = np.array(_per_channel(zp, channels), dtype=qw.integers.dtype)
        zp_c[negative] = complement(zp_c[negative])
        inputs.append(index.add_initializer(zp_c, f"{label}_weight_zero_point"))
    return _new_dequantizer(scope, qw, inputs, axis, f"{label}_weight")


def _new_dequantizer(scope: Scope, qw: Quantized, inputs: list[str], axis: int, base: str) -> str:
    index = scope.index
    out = index.fresh(f"{base}_dequantized")
    node = onnx.helper.make_node(DQ, inputs, [out], name=index.fresh(f"{base}_dequantize"), axis=axis)
    index.insert_nodes(qw.dq, [node])  # written right after the old one: before the layer that reads it
    return out


def requantize_bias(qb: Quantized, new_bias: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The new scale and int32 values of a quantized bias that is to hold ``new_bias``, and the
    largest rounding in steps of the new scale."""
    scale = _scaled(qb.scale, s, new_bias.size)
    with np.errstate(all="ignore"):
        steps = new_bias.reshape(-1) / scale.astype(np.float64)
    ints = np.rint(steps)
    rounding = float(np.max(np.abs(ints - steps), initial=0.0)) if np.isfinite(steps).all() else float("inf")
    return scale, ints, rounding


def check_bias(scope: Scope, bias: str, new_bias: np.ndarray, s: np.ndarray, bn: str) -> Reason | Hazard | None:
    """A quantized int32 bias re-quantized at its new scale: a Reason when the integers would not fit
    (or the scale is not finite), else the rounding as a hazard; None for a bias that is not one."""
    qb = find(scope, bias, (np.int32,))
    if not isinstance(qb, Quantized):
        return qb
    _, ints, rounding = requantize_bias(qb, new_bias, s)
    info = np.iinfo(np.int32)
    if not np.isfinite(rounding) or ints.min(initial=0) < info.min or ints.max(initial=0) > info.max:
        return Reason(Code.UNSAFE_FOLD, f"int32 bias '{bias}' re-quantized at its new scale does not fit int32")
    return Hazard(
        Code.QUANTIZED_BIAS_ROUNDING.value,
        bn,
        bias,
        f"int32 bias re-quantized at the new scale, rounded by up to {rounding:.3g} of a step",
        {"rounding_steps": rounding},
    )


def rewrite_bias(scope: Scope, bias: str, new_bias: np.ndarray, s: np.ndarray, label: str) -> str | None:
    """A new DequantizeLinear for an int32 bias behind one, holding ``new_bias``; None for any other."""
    qb = find(scope, bias, (np.int32,))
    if not isinstance(qb, Quantized):
        return None
    scale, ints, _ = requantize_bias(qb, new_bias, s)
    inputs = [
        scope.index.add_initializer(ints.astype(np.int32), f"{label}_bias_quantized"),
        scope.index.add_initializer(scale, f"{label}_bias_scale"),
    ]
    return _new_dequantizer(scope, qb, inputs, 0, f"{label}_bias")
