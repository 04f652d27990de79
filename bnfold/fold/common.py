"""What every family of folds shares: the scope a graph is planned in, the check that a BN is an
inference-mode per-channel affine map, and the one rewrite of a layer's weight and bias."""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ..batchnorm import DEFAULT_EPSILON, OPSET_VERSIONS, scale_shift
from ..constants import Constants
from ..graph import GraphIndex, Value
from ..proto import ONNX_DOMAINS, attr, node_label, np_dtype, set_attr
from ..report import Code, Reason
from ..shapes import TypeLookup
from .safety import parameter_problem


@dataclass
class Scope:
    """One graph as the folds see it: its index, its constants, the static types of its values."""

    index: GraphIndex
    consts: Constants
    types: TypeLookup | None
    opset: int
    _affines: dict[int, tuple[onnx.NodeProto, ParamKey, Affine]] | None = field(default=None, init=False, repr=False)
    # New weights and biases computed while planning, by id of the chain (kept with it): .batch
    prepared: dict[int, tuple[Any, np.ndarray, np.ndarray]] = field(default_factory=dict, init=False, repr=False)

    def constant(self, name: str) -> np.ndarray | None:
        return self.consts.value(name)

    def not_constant(self, name: str) -> str:
        """Why ``constant(name)`` is None: "is computed at run time", or the evaluation budget."""
        return self.consts.why_not(name)

    def known_affine(self, node: onnx.NodeProto) -> Affine | None:
        """The affine map of this BN node when :func:`batch_affines` found it sound (None: ask
        :func:`check_batchnorm`'s own path)."""
        if self._affines is None:
            self._affines = batch_affines(self.index)
        hit = self._affines.get(id(node))
        if hit is None or hit[0] is not node:
            return None
        revision = self.index.revision
        if revision and any(revision.get(name) for name in hit[1][0]):
            return None  # a parameter was rewritten since
        return hit[2]

    def rank(self, name: str) -> int | None:
        return self.types.rank(name) if self.types else None


ParamKey = tuple[tuple[str, ...], float]  # a BN's scale, B, mean and var names, and its epsilon


@dataclass(frozen=True)
class Affine:
    """``y = s * x + t`` along axis 1, s and t in float64 of shape (C,)."""

    s: np.ndarray
    t: np.ndarray


@dataclass(frozen=True)
class Identity:
    """``s`` added at ``tap`` on each output channel's diagonal input channel, ``t`` to the bias."""

    s: np.ndarray
    t: np.ndarray
    tap: tuple[int, ...]
    per_group: int  # input channels per group: output channel o reads input o at o % per_group

    def add_to(self, w64: np.ndarray) -> np.ndarray:
        """``w64`` (float64, modified) with the identity kernel added."""
        channels = np.arange(w64.shape[0])
        w64[(channels, channels % self.per_group) + tuple(np.full_like(channels, k) for k in self.tap)] += self.s
        return w64


def left_for(
    scope: Scope, left: dict[int, Reason], codes: Collection[Code]
) -> Iterator[tuple[int, Reason, onnx.NodeProto]]:
    """The BNs an earlier pass left for one of ``codes``, in graph order, for a later pass to try."""
    for i, reason in sorted(left.items()):
        if reason.code in codes:
            yield i, reason, scope.index.node(i)


@functools.cache
def bn_version(opset: int) -> int:
    return max((v for v in OPSET_VERSIONS if v <= max(opset, 1)), default=1)


def is_float(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" or array.dtype.name == "bfloat16"


_BATCH_DTYPES: dict[int, np.dtype] = {
    onnx.TensorProto.FLOAT16: np.dtype("<f2"),
    onnx.TensorProto.FLOAT: np.dtype("<f4"),
    onnx.TensorProto.DOUBLE: np.dtype("<f8"),
}


def param_key(node: onnx.NodeProto, inputs: list[str]) -> ParamKey | None:
    """What a BN's affine map depends on: its parameter names (``inputs``, the node's) and epsilon
    (None: no usable key)."""
    epsilon = attr(node, "epsilon", DEFAULT_EPSILON)
    if not isinstance(epsilon, float) or epsilon != epsilon:  # a malformed attribute, or NaN
        return None
    return tuple(inputs[1:5]), epsilon


def batch_affines(index: GraphIndex) -> dict[int, tuple[onnx.NodeProto, ParamKey, Affine]]:
    """The affine maps of every BN of a graph whose parameters are four inline (C,) initializers of
    one float type, computed for all of them at once: one read and one numpy pass per type and C
    instead of a dozen small operations per BN. Only sound maps are returned (finite parameters,
    var + epsilon > 0, finite scale and shift); :func:`check_batchnorm` finds the others, and says
    why, on its own. Each map equals what :func:`check_batchnorm` computes for that BN: the same
    float64 elementwise operations, row by row. Keyed by the node's id (the node is kept with it)."""
    groups: dict[tuple[int, int], list[tuple[ParamKey, list[bytes]]]] = {}
    seen: dict[ParamKey, list[onnx.NodeProto]] = {}  # BNs that share parameters and epsilon
    initializers, overridable = index.initializers, index.overridable
    for node, op in zip(index.nodes, index.ops, strict=False):
        if op != "BatchNormalization" or node is None or node.domain not in ONNX_DOMAINS:
            continue
        inputs = node.input[:]
        if len(inputs) < 5:
            continue
        key = param_key(node, inputs)
        if key is None:
            continue
        if key in seen:
            seen[key].append(node)
            continue
        seen[key] = [node]
        inline = _inline_params(key, initializers, overridable)
        if inline is not None:
            groups.setdefault(inline[0], []).append((key, inline[1]))
    return _group_affines(groups, seen)


def _inline_params(
    key: ParamKey, initializers: dict[str, onnx.TensorProto], overridable: set[str]
) -> tuple[tuple[int, int], list[bytes]] | None:
    """(element type, C) and the raw bytes of a BN's four parameters, when they are inline (C,)
    initializers of one float type that no caller can override; else None."""
    raws: list[bytes] = []
    shape = None
    for name in key[0]:
        tensor = initializers.get(name)
        if tensor is None or name in overridable or tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None
        dims = tensor.dims[:]
        if len(dims) != 1:
            return None
        kind = (tensor.data_type, dims[0])
        if shape is None:
            dtype = _BATCH_DTYPES.get(kind[0])
            if dtype is None or kind[1] < 1:
                return None
            shape, nbytes = kind, kind[1] * dtype.itemsize
        elif kind != shape:
            return None
        raw = tensor.raw_data
        if len(raw) != nbytes:
            return None
        raws.append(raw)
    assert shape is not None
    return shape, raws


def _group_affines(
    groups: dict[tuple[int, int], list[tuple[ParamKey, list[bytes]]]], seen: dict[ParamKey, list[onnx.NodeProto]]
) -> dict[int, tuple[onnx.NodeProto, ParamKey, Affine]]:
    """The sound affine maps of each group of same-typed parameters, one numpy pass per group, for
    every BN that shares them (keyed by the node's id)."""
    found: dict[int, tuple[onnx.NodeProto, ParamKey, Affine]] = {}
    for (elem, channels), members in groups.items():
        data = b"".join(raw for _, raws in members for raw in raws)
        p = np.frombuffer(data, dtype=_BATCH_DTYPES[elem]).astype("<f8").reshape(len(members), 4, channels)
        eps = np.array([key[1] for key, _ in members], dtype=np.float64).reshape(-1, 1)
        with np.errstate(all="ignore"):
            s, t = scale_shift(p[:, 0], p[:, 1], p[:, 2], p[:, 3], epsilon=eps)
            ok = np.isfinite(p).all(axis=(1, 2)) & (p[:, 3] + eps > 0).all(axis=1)
            ok &= np.isfinite(s).all(axis=1) & np.isfinite(t).all(axis=1)
        s.flags.writeable = t.flags.writeable = False  # each map is a view of these: never changed in place
        for k in np.flatnonzero(ok).tolist():
            key = members[k][0]
            affine = Affine(s[k], t[k])
            for node in seen[key]:
                found[id(node)] = (node, key, affine)
    return found


def check_batchnorm(scope: Scope, node: onnx.NodeProto) -> Affine | Reason:
    """The BN's affine map, or why it is not a fixed per-channel affine map."""
    inputs, outputs = node.input[:], node.output[:]
    if len(inputs) < 5 or not all(inputs[:5]) or not outputs or not outputs[0]:
        return Reason(
            Code.INVALID_NODE,
            f"it has {len(inputs)} input(s) and {len(outputs)} output(s); "
            "BatchNormalization needs X, scale, B, mean and var, and an output Y",
        )
    version = bn_version(scope.opset)
    if version >= 14 and attr(node, "training_mode", 0):
        return Reason(Code.TRAINING_MODE, "training_mode=1: it normalizes with the statistics of each batch")
    if version <= 6 and not attr(node, "is_test", 0):
        return Reason(
            Code.TRAINING_MODE,
            f"is_test=0: BatchNormalization-{version} then normalizes with the statistics of each batch",
        )
    extra = [o for o in outputs[1:] if o]
    if extra:
        return Reason(
            Code.STATISTICS_OUTPUTS, f"outputs {', '.join(extra)} are requested, which only training mode computes"
        )
    return _fixed_affine(scope, node, inputs)


def _fixed_affine(scope: Scope, node: onnx.NodeProto, inputs: list[str]) -> Affine | Reason:
    """The map of an inference-mode BN from its parameters, or why they do not give one."""
    known = scope.known_affine(node)
    if known is not None:
        return known
    params = []
    for role, name in zip(("scale", "B", "mean", "var"), inputs[1:5], strict=False):
        if scope.index.is_overridable(name):
            return Reason(Code.OVERRIDABLE_INITIALIZER, f"{role} '{name}' is a graph input a caller may override")
        value = scope.constant(name)
        if value is None:
            return Reason(Code.NON_CONSTANT_PARAMETER, f"{role} '{name}' {scope.not_constant(name)}")
        params.append(value)
    if not all(is_float(p) for p in params):
        return Reason(Code.INVALID_NODE, "its parameters are not floating point")
    if len({p.shape for p in params}) != 1 or params[0].ndim < 1 or params[0].size == 0:
        shapes = ", ".join(str(p.shape) for p in params)
        return Reason(Code.CHANNEL_MISMATCH, f"its parameters have inconsistent shapes {shapes}")
    return _affine_of(params, attr(node, "epsilon", DEFAULT_EPSILON))


def _affine_of(params: list[np.ndarray], epsilon: float) -> Affine | Reason:
    """scale, B, mean and var (float, one shape) as ``s * x + t`` per channel, computed in float64."""
    stacked = np.stack([p.astype(np.float64) for p in params])
    with np.errstate(all="ignore"):
        sound = bool(np.isfinite(stacked).all() and (stacked[3] + np.float64(epsilon) > 0).all())
    if not sound:  # which parameter, which channel
        problem = parameter_problem(dict(zip(("scale", "B", "mean", "var"), params, strict=False)), epsilon)
        if problem is not None:
            return problem
    with np.errstate(all="ignore"):
        s, t = scale_shift(stacked[0], stacked[1], stacked[2], stacked[3], epsilon=epsilon)
    if not (np.isfinite(s).all() and np.isfinite(t).all()):
        c = int(np.flatnonzero(~(np.isfinite(s) & np.isfinite(t)).reshape(-1))[0])
        return Reason(
            Code.UNSAFE_FOLD,
            f"its float64 scale/shift overflow at channel {c} (scale / sqrt(var + epsilon) = {s.reshape(-1)[c]:g})",
        )
    if s.ndim > 1:  # spatial=0: per-activation parameters (C, D1, ...)
        flat_s, flat_t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
        if not (np.all(flat_s == flat_s[:, :1]) and np.all(flat_t == flat_t[:, :1])):
            return Reason(
                Code.PER_ACTIVATION_PARAMETERS, f"spatial=0 parameters of shape {s.shape} vary along the spatial axes"
            )
        s, t = flat_s[:, 0], flat_t[:, 0]
    return Affine(s, t)


def scaled(w: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``w * factor`` computed in float64 and cast once to ``w``'s dtype, without a float64 copy of
    the whole weight (numpy casts in buffered chunks)."""
    if w.dtype in (np.float16, np.float32, np.float64):
        out = np.empty(np.broadcast_shapes(w.shape, factor.shape), dtype=w.dtype)
        np.multiply(w, factor, out=out, dtype=np.float64, casting="unsafe")
        return out
    wide: np.ndarray = w.astype(np.float64) * factor
    return wide.astype(w.dtype)  # bfloat16: numpy has no such loop


def channel_vector(value: np.ndarray, rank: int | None, channels: int, axis: int = 1) -> np.ndarray | None:
    """``value`` as a float64 (C,) vector if, broadcast against a rank-``rank`` tensor with C channels
    on ``axis``, it varies along that axis only; else None."""
    if rank is None or rank < 2 or value.ndim > rank or (not is_float(value) and value.dtype.kind not in "iu"):
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for k, d in enumerate(shape) if k != axis) or shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (channels,)).copy()


def write_constant(index: GraphIndex, old: str, value: Value, base: str) -> str:
    """Store ``value`` for the input ``old`` of one node: in place when only that node reads the
    initializer and the shape and dtype stay, else as a new initializer (shared weights are never
    changed)."""
    tensor = index.initializers.get(old) if old else None
    if (
        tensor is not None
        and len(index.readers(old)) == 1  # one node, reading it in one slot
        and old not in index.graph_outputs
        and tensor.dims[:] == list(value.shape)
        and np_dtype(tensor.data_type) == np.dtype(value.dtype)
    ):
        index.replace_initializer(old, value)
        return old
    return index.add_initializer(value, base)


def _value(v: np.ndarray | str) -> np.ndarray:
    assert not isinstance(v, str)  # a name is used as it is
    return v


def rewrite_layer(
    scope: Scope,
    i: int,
    weight: Value | str,
    bias: np.ndarray | str,
    *,
    to_gemm: bool,
    bias_slot: int = 2,
    x: str | None = None,
    output: str | None = None,
    bias_node: bool = False,
) -> tuple[onnx.NodeProto, str]:
    """Give layer ``i`` (Conv, ConvTranspose, Gemm or MatMul) a new weight (input 1) and bias, in
    both fold directions (a name for either: a value written already, a quantized weight's new
    DequantizeLinear): a MatMul becomes ``Gemm(A, W, bias)``; a Gemm keeps ``alpha`` and gets
    ``beta = 1``; with ``bias_node`` (a MatMul of rank >= 3), an Add of the bias follows it and
    writes its output. ``x`` replaces the layer's input, ``output`` its output name. Returns the new
    node (already in the index) and the layer's label."""
    index = scope.index
    node = index.node(i)  # changed in place, then linked again: nothing else holds it
    inputs = node.input[:]
    label, layer = node.name or inputs[1], node_label(node)
    new_w = weight if isinstance(weight, str) else write_constant(index, inputs[1], weight, f"{label}_weight_folded")
    b_name = ""
    if isinstance(bias, str):
        b_name = bias
    elif not bias_node and not to_gemm:
        b_name = write_constant(index, inputs[bias_slot] if len(inputs) > bias_slot else "", bias, f"{label}_bias")
    if x is not None:
        node.input[0] = x
    if output is not None:
        node.output[0] = output
    node.input[1] = new_w
    if bias_node:
        y = node.output[0]
        node.output[0] = index.fresh(f"{y}_unbiased")
        add = onnx.helper.make_node(
            "Add",
            [node.output[0], b_name or index.add_initializer(_value(bias), f"{label}_bias")],
            [y],
            name=index.fresh(f"{label}_bias_add"),
        )
        index.replace_node(i, node)
        index.insert_nodes(i, [add])
        return node, layer
    if to_gemm:
        node.op_type = "Gemm"
        del node.input[2:]
        node.input.append(b_name or index.add_initializer(_value(bias), f"{label}_bias"))
    else:
        if len(inputs) > bias_slot:
            node.input[bias_slot] = b_name
        else:
            node.input.extend([""] * (bias_slot - len(inputs)) + [b_name])
        if node.op_type == "Gemm":
            set_attr(node, "beta", 1.0)
    if node.op_type == "Gemm" and scope.opset < 7:
        set_attr(node, "broadcast", 1)  # Gemm before opset 7 broadcasts C only when asked
    index.replace_node(i, node)
    return node, layer
