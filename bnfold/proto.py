"""Leaf helpers over onnx protos: attributes, subgraphs, walking every graph, tensor locations.

Nothing here imports another bnfold module.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

ONNX_DOMAINS = ("", "ai.onnx")
# The standard operators with graph attributes; nodes of other domains may have some too.
CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_GRAPH_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def could_hold_subgraphs(op_type: str, domain: str) -> bool:
    """Whether a node of this type may have graph attributes: of the standard operators, only
    control flow has them (for callers that have read the two fields already)."""
    return op_type in CONTROL_FLOW or domain not in ONNX_DOMAINS


def has_graph_attribute(node: onnx.NodeProto) -> bool:
    return any(a.type in _GRAPH_TYPES for a in node.attribute)


def has_subgraphs(node: onnx.NodeProto) -> bool:
    return could_hold_subgraphs(node.op_type, node.domain) and has_graph_attribute(node)


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The bodies a node holds (If branches, Loop/Scan bodies)."""
    if not has_subgraphs(node):
        return
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def graphs_of(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph``, then every body inside it (If/Loop/Scan, at any depth)."""
    yield graph
    for node in graph.node:
        if has_subgraphs(node):  # first: cheaper than starting the generator for every node
            for g in subgraphs(node):
                yield from graphs_of(g)


def model_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph with its bodies, then the bodies inside model-local functions."""
    yield from graphs_of(model.graph)
    for fn in model.functions:
        for node in fn.node:
            for g in subgraphs(node):
                yield from graphs_of(g)


def all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node of the model: graphs, bodies and functions."""
    for g in model_graphs(model):
        yield from g.node
    for fn in model.functions:
        yield from fn.node


def initializers(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every initializer of the model, bodies and functions included."""
    for g in model_graphs(model):
        yield from g.initializer


def outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads from enclosing scopes: used inside, defined nowhere inside."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for g in subgraphs(node):
            used |= outer_names(g)
        defined.update(node.output)
    used.update(o.name for o in graph.output)
    return used - defined


def all_names(graph: onnx.GraphProto, into: set[str]) -> set[str]:
    """Every value and node name in a graph and its subgraphs, added to ``into``."""
    for seq in (graph.input, graph.output, graph.value_info):
        into.update(v.name for v in seq)
    into.update(t.name for t in graph.initializer)
    _node_names(graph.node, into)
    into.discard("")
    return into


def _node_names(nodes: Iterable[onnx.NodeProto], into: set[str]) -> None:
    for node in nodes:
        into.update(node.input)
        into.update(node.output)
        into.add(node.name)
        for g in subgraphs(node):
            all_names(g, into)


def model_names(model: onnx.ModelProto) -> set[str]:
    """Every name in the model, functions included: what a new name must not be."""
    taken = all_names(model.graph, set())
    for fn in model.functions:
        taken.update(fn.input)
        taken.update(fn.output)
        _node_names(fn.node, taken)
    taken.discard("")
    return taken


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def str_attr(node: onnx.NodeProto, name: str, default: str) -> str:
    value = attr(node, name, default)
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def opset_of(model: onnx.ModelProto, domain: str = "") -> int:
    for o in model.opset_import:
        if o.domain in ((domain,) if domain else ONNX_DOMAINS):
            return int(o.version)
    return 0


def text(value: Any) -> str:
    """A name as text: protobuf returns a name that is not valid UTF-8 as bytes."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def node_label(node: onnx.NodeProto) -> str:
    return text(node.name or (node.output[0] if node.output else node.op_type))


def is_batchnorm(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ONNX_DOMAINS


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node, or None when it has none that can be read."""
    try:
        return _constant_value(node)
    except (ValueError, TypeError, KeyError):
        return None


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def np_dtype(elem_type: int) -> np.dtype:
    """The numpy dtype of an ONNX element type (ValueError for unknown or undefined ones)."""
    plain = _PLAIN.get(elem_type)
    if plain is not None:
        return plain
    if not elem_type:
        raise ValueError("element type UNDEFINED")
    if elem_type == BFLOAT16:
        return _bfloat16()
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"unknown element type {elem_type}") from exc


_PLAIN = {t: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)) for t in (1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13)}


BFLOAT16 = onnx.TensorProto.BFLOAT16


def _bfloat16() -> np.dtype:
    import ml_dtypes

    dtype: np.dtype = np.dtype(ml_dtypes.bfloat16)
    return dtype


def tensor_type(dtype: np.dtype) -> int:
    """The ONNX element type of a numpy dtype (bfloat16 mapped here: onnx before 1.19 cannot)."""
    if dtype.name == "bfloat16":
        return BFLOAT16
    return int(onnx.helper.np_dtype_to_tensor_dtype(dtype))


def from_array(array: np.ndarray, name: str) -> onnx.TensorProto:
    """A TensorProto holding ``array`` (bfloat16 written as raw bytes, whatever the onnx version)."""
    if array.dtype.name != "bfloat16":
        return numpy_helper.from_array(array, name)
    tensor = onnx.TensorProto()
    tensor.name, tensor.data_type = name, BFLOAT16
    tensor.dims.extend(array.shape)
    tensor.raw_data = np.ascontiguousarray(array).view(np.uint16).astype("<u2").tobytes()
    return tensor


_PLAIN_TYPES = {dtype: t for t, dtype in _PLAIN.items()}


def fill(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    """Make ``tensor`` (name kept) hold ``array``: raw little-endian bytes set in place for plain
    numeric dtypes (much cheaper than building a TensorProto and copying it), onnx's encoder else."""
    elem = _PLAIN_TYPES.get(array.dtype)
    if elem is None or sys.byteorder != "little":
        tensor.CopyFrom(from_array(array, tensor.name))
        return
    name = tensor.name
    tensor.Clear()
    tensor.name, tensor.data_type = name, elem
    tensor.dims.extend(array.shape)
    tensor.raw_data = np.ascontiguousarray(array).tobytes()


def to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """An inline tensor's value. Plain numeric raw data is viewed where it lies (read-only), which
    is many times faster than onnx's general decoder; bfloat16 is decoded here as ml_dtypes'
    bfloat16 whatever the onnx version; every other form goes through onnx."""
    elem = tensor.data_type
    if elem == BFLOAT16:
        shape = tuple(tensor.dims)
        if tensor.HasField("raw_data"):
            bits = np.frombuffer(tensor.raw_data, dtype="<u2")
        else:
            bits = np.asarray(tensor.int32_data, dtype=np.uint32).astype(np.uint16)
        return bits.astype(np.uint16).view(_bfloat16()).reshape(shape)
    dtype = _PLAIN.get(elem)
    if dtype is not None and sys.byteorder == "little":
        raw = tensor.raw_data  # empty, set or not: onnx's decoder below
        if raw:
            shape = tuple(tensor.dims[:])  # a slice: cheaper than iterating the field
            if min(shape, default=0) >= 0 and len(raw) == math.prod(shape) * dtype.itemsize:
                return np.frombuffer(raw, dtype=dtype).reshape(shape)
    return numpy_helper.to_array(tensor)


def external_location(tensor: onnx.TensorProto) -> dict[str, str] | None:
    """The external_data entries of a file-backed tensor, or None for an inline one."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def set_location(tensor: onnx.TensorProto, location: str, offset: int = 0, length: int = 0) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


# Element types packed below one byte: bits per element in raw_data.
_PACKED_BITS = {21: 4, 22: 4, 23: 4, 25: 2, 26: 2}


def tensor_count(tensor: onnx.TensorProto) -> int:
    """Elements of the tensor (ValueError for negative dims or an absurd product)."""
    count = 1
    for d in tensor.dims:
        if d < 0:
            raise ValueError(f"negative dimension {d}")
        count *= int(d)
    if count >= 1 << 62:
        raise ValueError(f"dims {list(tensor.dims)} are too large")
    return count


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of the tensor's values in raw little-endian form (ValueError for an unknown type)."""
    count, bits = tensor_count(tensor), _PACKED_BITS.get(tensor.data_type)
    if bits:
        return (count * bits + 7) // 8
    return count * np_dtype(tensor.data_type).itemsize
