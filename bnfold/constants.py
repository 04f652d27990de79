"""Evaluate small subgraphs whose value does not depend on the values of any graph input.

Exporters build weights this way: Caffe2 with ConstantOfShape of a constant shape, torch's dynamo
exporter (optimizer off) a missing Conv bias as
``Expand(CastLike(Constant 0, x), Expand(Shape(W)[0:1], [1]))``, where only the dtype of the graph
input ``x`` matters. Some inputs are read only for their type or static shape (``TYPE_ONLY``); the
rest must be constants. Results larger than ``MAX_ELEMENTS`` are not evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx

from .graph import GraphIndex
from .proto import ONNX_DOMAINS, attr, constant_node_value, np_dtype, to_array
from .quantization import INTEGER_TYPES, dequantize, quantize
from .shapes import TypeLookup

MAX_ELEMENTS = 1 << 24
MAX_DEPTH = 64  # constant subgraphs are small; deeper chains are not evaluated
SMALL_INLINE = 1 << 16  # inline initializers up to this many bytes are parsed once and kept

Evaluator = Callable[[onnx.NodeProto, list[Any], int], np.ndarray | None]


class OverBudget(Exception):
    """A result of more than ``MAX_ELEMENTS`` elements: not computed, and said so."""

    def __init__(self, elements: int) -> None:
        super().__init__(elements)
        self.elements = elements


def _within_budget(shape: Sequence[float]) -> None:
    elements = int(np.prod(shape, dtype=np.float64))
    if elements > MAX_ELEMENTS:
        raise OverBudget(elements)


# Input slots that are read only for their element type or static shape.
TYPE_ONLY = {"Shape": {0}, "Size": {0}, "CastLike": {1}}


class Operand:
    """What an evaluator may know about an input: its value, or only its dtype and static shape."""

    def __init__(
        self,
        value: np.ndarray | None = None,
        dtype: np.dtype | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        self.value = value
        self.dtype = value.dtype if value is not None else dtype
        self.shape: tuple[int, ...] | None = tuple(value.shape) if value is not None else shape


def _int_list(a: np.ndarray) -> list[int]:
    return [int(v) for v in np.asarray(a).reshape(-1)]


def _shape(node: onnx.NodeProto, ops: list[Any], opset: int) -> np.ndarray | None:
    shape = ops[0].shape
    if shape is None:
        return None
    start, end = attr(node, "start", 0), attr(node, "end", None)
    return np.array(shape[start:end], dtype=np.int64)


def _size(node: onnx.NodeProto, ops: list[Any], opset: int) -> np.ndarray | None:
    return None if ops[0].shape is None else np.array(int(np.prod(ops[0].shape)), dtype=np.int64)


def _cast_like(node: onnx.NodeProto, ops: list[Any], opset: int) -> np.ndarray | None:
    return None if ops[1].dtype is None else ops[0].value.astype(ops[1].dtype)


def _constant_of_shape(node: onnx.NodeProto, ops: list[Any], opset: int) -> np.ndarray | None:
    shape = _int_list(ops[0].value)
    _within_budget(shape)
    value = attr(node, "value")
    fill = to_array(value).reshape(-1) if value is not None else np.zeros(1, np.float32)
    return np.full(shape, fill[0], dtype=fill.dtype)


def _reshape(node: onnx.NodeProto, ops: list[Any], opset: int) -> np.ndarray | None:
    data: np.ndarray = ops[0].value
    shape = _int_list(ops[1].value)
    if not attr(node, "allowzero", 0):
        shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return data.reshape(shape)


def _axes(node: onnx.NodeProto, ops: list[Any], opset: int, since: int) -> list[int] | None:
    if opset >= since:
        return _int_list(ops[1].value) if len(ops) > 1 and ops[1].value is not None else None
    axes: list[int] | None = attr(node, "axes")
    return axes


def _unsqueeze(node: onnx.NodeProto, ops: list[Any], opset: int) -> np.ndarray | None:
    data, axes = ops[0].value, _axes(node, ops, opset, 13)
    if axes is None:
        return None
    rank = data.ndim + len(axes)
    out: np.ndarray = data
    for a in sorted(a % rank for a in axes):
        out = np.expand_dims(out, a)
    return out


def _squeeze(node: onnx.NodeProto, ops: list[Any], opset: int) -> np.ndarray | None:
    data: np.ndarray = ops[0].value
    axes = _axes(node, ops, opset, 13)
    return np.squeeze(data) if axes is None else np.squeeze(data, axis=tuple(a % data.ndim for a in axes))


def _expand(node: onnx.NodeProto, ops: list[Any], opset: int) -> np.ndarray | None:
    shape = np.broadcast_shapes(ops[0].value.shape, tuple(_int_list(ops[1].value)))
    _within_budget(shape)
    return np.broadcast_to(ops[0].value, shape).copy()


def _slice(node: onnx.NodeProto, ops: list[Any], opset: int) -> np.ndarray | None:
    data: np.ndarray = ops[0].value
    if opset < 10:
        starts, ends, axes, steps = attr(node, "starts"), attr(node, "ends"), attr(node, "axes"), None
    else:
        starts, ends = _int_list(ops[1].value), _int_list(ops[2].value)
        axes = _int_list(ops[3].value) if len(ops) > 3 and ops[3].value is not None else None
        steps = _int_list(ops[4].value) if len(ops) > 4 and ops[4].value is not None else None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index = [slice(None)] * data.ndim
    for s, e, a, st in zip(starts, ends, axes, steps, strict=False):
        index[a % data.ndim] = slice(s, e, st)
    return data[tuple(index)]


def _concat(node: onnx.NodeProto, ops: list[Any], opset: int) -> np.ndarray | None:
    axis = attr(node, "axis")
    if not isinstance(axis, int):  # required: numpy would read None as "flatten everything"
        return None
    return np.concatenate([o.value for o in ops], axis=axis)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    quotient: np.ndarray = a / b
    if a.dtype.kind in "iu":
        truncated: np.ndarray = np.trunc(quotient)
        return truncated.astype(a.dtype)  # ONNX integer Div truncates toward zero
    return quotient


def _quantization_params(node: onnx.NodeProto, ops: list[Any]) -> tuple[np.ndarray, np.ndarray | None, int] | None:
    """scale, zero point and axis of a (De)QuantizeLinear computed here: per tensor or per axis, one
    scale per slice of the input along the axis (blocked quantization, opset 21's block_size, is left
    to the runtime)."""
    if attr(node, "block_size", 0) or len(ops) < 2:
        return None
    x, scale = ops[0].value, ops[1].value
    zero_point = ops[2].value if len(ops) > 2 and ops[2] is not None else None
    if scale.ndim > 1 or (zero_point is not None and zero_point.shape != scale.shape):
        return None
    axis = int(attr(node, "axis", 1))
    if scale.ndim and (not x.ndim or x.shape[axis % x.ndim] != scale.size):
        return None
    return scale, zero_point, axis


def _dequantize(node: onnx.NodeProto, ops: list[Any], opset: int) -> np.ndarray | None:
    params = _quantization_params(node, ops)
    x: np.ndarray = ops[0].value
    if params is None or x.dtype.type not in INTEGER_TYPES + (np.int32,):
        return None
    scale, zero_point, axis = params
    return dequantize(x, scale, zero_point, axis)


def _quantize(node: onnx.NodeProto, ops: list[Any], opset: int) -> np.ndarray | None:
    params = _quantization_params(node, ops)
    x: np.ndarray = ops[0].value
    if params is None or not np.issubdtype(x.dtype, np.floating):
        return None
    scale, zero_point, axis = params
    to = attr(node, "output_dtype", 0)
    dtype = np_dtype(to) if to else None
    if (dtype or (zero_point.dtype if zero_point is not None else np.dtype(np.uint8))).type not in INTEGER_TYPES:
        return None
    return quantize(x, scale, zero_point, axis, dtype)


def _same_dtype(fn: Callable[..., Any]) -> Evaluator:
    def run(node: onnx.NodeProto, ops: list[Any], opset: int) -> np.ndarray | None:
        out = np.asarray(fn(*[o.value for o in ops]))
        return out.astype(ops[0].value.dtype)

    return run


EVALUATORS: dict[str, Evaluator] = {
    "Shape": _shape,
    "Size": _size,
    "CastLike": _cast_like,
    "ConstantOfShape": _constant_of_shape,
    "Cast": lambda node, ops, opset: ops[0].value.astype(np_dtype(attr(node, "to", 0))),  # ValueError: unknown
    "Identity": lambda node, ops, opset: ops[0].value,
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Transpose": lambda node, ops, opset: np.transpose(ops[0].value, attr(node, "perm")),
    "Expand": _expand,
    "Concat": _concat,
    "Gather": lambda node, ops, opset: np.take(ops[0].value, ops[1].value, axis=attr(node, "axis", 0)),
    "Slice": _slice,
    "Add": _same_dtype(np.add),
    "Sub": _same_dtype(np.subtract),
    "Mul": _same_dtype(np.multiply),
    "Div": lambda node, ops, opset: _div(ops[0].value, ops[1].value),
    "Neg": _same_dtype(np.negative),
    "Abs": _same_dtype(np.abs),
    "Sqrt": _same_dtype(np.sqrt),
    "Reciprocal": _same_dtype(np.reciprocal),
    "Pow": _same_dtype(np.power),
    "DequantizeLinear": _dequantize,
    "QuantizeLinear": _quantize,
}


ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow"}


def _result_size(node: onnx.NodeProto, operands: Sequence[Operand | None]) -> float | None:
    """How many elements the result would have, known before anything is allocated, for the ops
    whose result can be far larger than their operands (Expand and ConstantOfShape check their own
    target shapes); None for the others, and for operands whose shapes do not fit together."""
    values = [o.value for o in operands if o is not None and o.value is not None]
    try:
        if node.op_type in ELEMENTWISE and len(values) == 2:
            return float(np.prod(np.broadcast_shapes(values[0].shape, values[1].shape), dtype=np.float64))
        if node.op_type == "Concat":
            return float(sum(v.size for v in values))
        if node.op_type == "Gather" and len(values) == 2:
            return float(values[0].size // max(values[0].shape[attr(node, "axis", 0)], 1) * values[1].size)
    except (ValueError, IndexError, TypeError):
        return None  # shapes that do not broadcast: evaluating them fails below
    return None


def evaluate(node: onnx.NodeProto, operands: Sequence[Operand | None], opset: int) -> np.ndarray | None:
    """The value of the node's single output, or None when it cannot be computed here. Raises
    :class:`OverBudget` for a result over ``MAX_ELEMENTS``, before allocating it where that is known.

    ``operands`` holds None for an absent optional input; every other input is a value, except in
    ``TYPE_ONLY`` slots, which may carry only a dtype and static shape."""
    fn = EVALUATORS.get(node.op_type)
    if fn is None or len(node.output) != 1:
        return None
    size = _result_size(node, operands)
    if size is not None:
        _within_budget([size])
    with np.errstate(all="ignore"):
        try:
            out = fn(node, list(operands), opset)
        except (ValueError, TypeError, IndexError, AttributeError, OverflowError, MemoryError):
            return None
    if out is None:
        return None
    _within_budget(np.shape(out))
    return np.asarray(out)


class Constants:
    """Values of one graph that cannot change between runs: initializers a caller may not override,
    Constant nodes, and small subgraphs computed here. A body's evaluator falls back to the
    enclosing graph's for names it does not define. Computed values are cached; initializers are
    read afresh each time, so that a mapped weight is released once the caller is done with it."""

    def __init__(
        self, index: GraphIndex, *, opset: int, types: TypeLookup | None, outer: Constants | None = None
    ) -> None:
        self.index = index
        self.opset = opset
        self.types = types
        self.outer = outer
        self._cache: dict[str, np.ndarray | None] = {}
        # Values computed from constants that were not evaluated for the budget: their elements.
        self._over_budget: dict[str, int] = {}
        self._inline: dict[str, tuple[int, np.ndarray | None]] = {}  # small inline initializers
        self._depth = 0

    def value(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it cannot change between runs, else None."""
        index = self.index
        hit = self._inline.get(name)
        if hit is not None and hit[0] == index.revision.get(name, 0) and name in index.initializers:
            return hit[1]  # read before, unchanged since, not dropped (and never overridable: see below)
        if not name or index.is_overridable(name):
            return None
        tensor = index.initializers.get(name)
        if tensor is not None:  # an initializer found not overridable above: its value is constant
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                return index.store.read(tensor)
            value = index.store.read(tensor)  # not read since its last rewrite (else returned above)
            if value.nbytes > SMALL_INLINE:
                return value
            value.flags.writeable = False  # shared by every reader: never changed in place
            self._inline[name] = (index.revision.get(name, 0), value)
            return value
        if name not in index.producer:
            if self.outer is not None and name not in index.input_names:
                return self.outer.value(name)
            return None
        if name not in self._cache:
            if self._depth >= MAX_DEPTH:
                return None
            self._cache[name] = None  # guards against cycles in malformed graphs
            self._depth += 1
            try:
                self._cache[name] = self._node_value(index.producer[name])
            finally:
                self._depth -= 1
        return self._cache[name]

    def why_not(self, name: str) -> str:
        """Why ``name`` (whose value is None) is not a known constant, to follow its name."""
        elements = self._over_budget.get(name)
        if elements is None and self.outer is not None and name not in self.index.producer:
            return self.outer.why_not(name)
        if elements is None:
            return "is computed at run time"
        return (
            f"is computed from constants, but through a result of {elements:,} elements, over the "
            f"{MAX_ELEMENTS:,} that bnfold evaluates"
        )

    def snapshot(self, name: str) -> Callable[[], np.ndarray]:
        """A function giving the value ``name`` has now, even after its initializer is replaced."""
        thunk = self.index.snapshot(name)
        if thunk is not None:
            return thunk
        value = self.value(name)
        if value is None:
            raise KeyError(f"'{name}' is not a constant")
        return lambda: value

    def _node_value(self, i: int) -> np.ndarray | None:
        node = self.index.node(i)
        if node.domain not in ONNX_DOMAINS:
            return None
        if node.op_type == "Constant":
            return constant_node_value(node)
        if node.op_type not in EVALUATORS:
            return None
        type_only = TYPE_ONLY.get(node.op_type, set())
        operands: list[Operand | None] = []
        for slot, name in enumerate(node.input):
            value = self.value(name)
            if value is not None:
                operands.append(Operand(value))
            elif not name:
                operands.append(None)
            elif slot in type_only and self.types is not None:
                elem = self.types.elem_type(name)
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else None
                operands.append(Operand(None, dtype, self.types.static_shape(name)))
            else:
                if name in self._over_budget:  # a constant after all, computed through a result too large
                    self._over_budget[node.output[0]] = self._over_budget[name]
                return None
        try:
            return evaluate(node, operands, self.opset)
        except OverBudget as e:
            self._over_budget[node.output[0]] = e.elements
            return None
