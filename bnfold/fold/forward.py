"""Forward folds: a BN (and per-channel Mul/Add/Sub/Div by constants around it) absorbed into the
Conv, ConvTranspose, Gemm or MatMul that produces its input.

find -> check -> rewrite: :func:`plan` walks the graph once in order and decides, for every BN, the
chain it joins or the reason it stays; :func:`apply` rewrites each chain's producer once, with the
chain's affine maps composed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import onnx

from ..graph import ONNX_DOMAINS, GraphIndex, attr, set_attr
from ..io import Deferred
from ..report import Reason
from .common import Affine, channel_vector, check_batchnorm, is_batchnorm, is_float, node_label, scaled

@dataclass
class Target:
    """How one producer absorbs ``y -> s * y + t`` on its output channels."""

    op: str
    channels: int
    rank: int
    weight_slot: int
    bias_slot: int
    factor: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (weight, s) -> float64 factor broadcastable to it
    bias_scale: float = 1.0  # Gemm: the old bias enters as beta * C
    to_gemm: bool = False  # MatMul becomes Gemm(A, W', t)


@dataclass
class Chain:
    producer: int
    target: Target
    end: str
    steps: List[int] = field(default_factory=list)
    bns: List[int] = field(default_factory=list)
    s: Optional[np.ndarray] = None
    t: Optional[np.ndarray] = None

    def compose(self, step: int, affine: Affine, end: str) -> None:
        if self.s is None:
            self.s, self.t = affine.s, affine.t
        else:
            self.s, self.t = affine.s * self.s, affine.s * self.t + affine.t
        self.steps.append(step)
        self.end = end


# -- targets ------------------------------------------------------------------------------------

def constant_weight(index: GraphIndex, node: onnx.NodeProto, slot: int, role: str) -> Union[np.ndarray, Reason]:
    name = node.input[slot]
    if index.is_overridable(name):
        return Reason("overridable_initializer", f"{role} '{name}' of {node.op_type} '{node_label(node)}' is a graph input a caller may override")
    value = index.constant(name)
    if value is None:
        return Reason("producer_weight_not_constant", f"{role} '{name}' of {node.op_type} '{node_label(node)}' is computed at run time")
    if not is_float(value):
        return Reason("unsupported_dtype", f"{role} '{name}' of {node.op_type} '{node_label(node)}' is {value.dtype}")
    return value


def constant_weights(index: GraphIndex, node: onnx.NodeProto, roles=("weight", "bias")) -> Union[np.ndarray, Reason]:
    """The node's weight (input 1) when it, and its bias (input 2) if any, are foldable constants."""
    w = constant_weight(index, node, 1, roles[0])
    if not isinstance(w, Reason) and len(node.input) > 2 and node.input[2]:
        bias = constant_weight(index, node, 2, roles[1])
        if isinstance(bias, Reason):
            return bias
    return w


def _conv(index: GraphIndex, node: onnx.NodeProto) -> Union[Target, Reason]:
    w = constant_weights(index, node)
    if isinstance(w, Reason):
        return w

    def scale(W, s):
        return s.reshape((-1,) + (1,) * (W.ndim - 1))

    return Target("Conv", w.shape[0], w.ndim, 1, 2, scale)


def _conv_transpose(index: GraphIndex, node: onnx.NodeProto) -> Union[Target, Reason]:
    w = constant_weights(index, node)
    if isinstance(w, Reason):
        return w
    group = attr(node, "group", 1)
    c_in, per_group = w.shape[0], w.shape[1]
    if c_in % group:
        return Reason("channel_mismatch", f"ConvTranspose '{node_label(node)}' has {c_in} input channels for group={group}")

    def scale(W, s):
        # Weight layout (C_in, C_out/group, k...): output channel g*C_out/group + j lives in the rows
        # of group g, column j.
        rows = s.reshape(group, per_group)[np.arange(c_in) // (c_in // group)]
        return rows.reshape(rows.shape + (1,) * (W.ndim - 2))

    return Target("ConvTranspose", per_group * group, w.ndim, 1, 2, scale)


def _gemm(index: GraphIndex, node: onnx.NodeProto) -> Union[Target, Reason]:
    b = constant_weights(index, node, ("B", "C"))
    if isinstance(b, Reason):
        return b
    trans_b = attr(node, "transB", 0)

    def scale(B, s):
        return s[:, None] if trans_b else s[None, :]

    return Target("Gemm", b.shape[0] if trans_b else b.shape[1], 2, 1, 2, scale, bias_scale=attr(node, "beta", 1.0))


def _matmul(index: GraphIndex, node: onnx.NodeProto) -> Union[Target, Reason]:
    w = constant_weight(index, node, 1, "weight")
    if isinstance(w, Reason):
        return w
    rank = index.types.rank(node.input[0]) if index.types else None
    if w.ndim == 2 and rank is None:
        return Reason("unknown_rank", f"the rank of '{node.input[0]}' (input of MatMul '{node_label(node)}') is unknown")
    if w.ndim != 2 or rank != 2:
        return Reason(
            "axis_mismatch",
            f"MatMul '{node_label(node)}' multiplies a rank-{rank} input by a rank-{w.ndim} weight: "
            "its output columns are not on axis 1",
        )
    return Target("MatMul", w.shape[1], 2, 1, -1, lambda W, s: s[None, :], to_gemm=True)


TARGETS = {"Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul}
AFFINE_OPS = ("Add", "Sub", "Mul", "Div")


# -- planning -----------------------------------------------------------------------------------

@dataclass
class Plan:
    chains: List[Chain]
    left: Dict[int, Reason]


def _affine_of(node: onnx.NodeProto, x: str, const: np.ndarray, rank: int, channels: int) -> Optional[Affine]:
    vec = channel_vector(const, rank, channels)
    if vec is None:
        return None
    first = node.input[0] == x
    one, zero = np.ones(channels), np.zeros(channels)
    if node.op_type == "Add":
        return Affine(one, vec)
    if node.op_type == "Mul":
        return Affine(vec, zero)
    if node.op_type == "Sub":
        return Affine(one, -vec) if first else Affine(-one, vec)
    if first and np.all(vec != 0):  # Div: only x / c is affine
        return Affine(1.0 / vec, zero)
    return None


def _affine_operand(index: GraphIndex, node: onnx.NodeProto) -> Optional[Tuple[str, np.ndarray]]:
    """(activation, constant) of a binary Add/Sub/Mul/Div with exactly one constant operand."""
    if node.op_type not in AFFINE_OPS or node.domain not in ONNX_DOMAINS or len(node.input) != 2:
        return None
    a, b = node.input
    ca, cb = (None if index.is_overridable(n) else index.constant(n) for n in (a, b))
    if (ca is None) == (cb is None):
        return None
    return (b, ca) if cb is None else (a, cb)


def plan(index: GraphIndex) -> Plan:
    chains: Dict[str, Chain] = {}  # keyed by the chain's current end
    left: Dict[int, Reason] = {}
    for i in list(index.live_nodes()):
        node = index.nodes[i]
        if is_batchnorm(node):
            affine = check_batchnorm(index, node)
            found = affine if isinstance(affine, Reason) else _extend(index, chains, i, node.input[0], lambda c: affine)
            if isinstance(found, Reason):
                left[i] = found
            else:
                found.bns.append(i)
        else:
            operand = _affine_operand(index, node)
            if operand:
                x, const = operand
                _extend(index, chains, i, x, lambda c: _affine_of(node, x, const, c.target.rank, c.target.channels))
    kept = [c for c in chains.values() if c.bns]
    return Plan(sorted(kept, key=lambda c: c.producer), left)


def _extend(index: GraphIndex, chains: Dict[str, Chain], i: int, x: str, affine_for) -> Union[Chain, Reason]:
    """Add node ``i`` (reading ``x``) to the chain that ends at ``x``, starting one if needed."""
    chain = chains.get(x)
    if chain is None:
        p = index.producer.get(x)
        if p is None:
            return Reason("no_producer", f"its input '{x}' is a graph input or initializer")
        producer = index.nodes[p]
        make = TARGETS.get(producer.op_type) if producer.domain in ONNX_DOMAINS else None
        if make is None:
            return Reason("unsupported_producer", f"its input comes from {producer.op_type} '{node_label(producer)}'")
        target = make(index, producer)
        if isinstance(target, Reason):
            return target
        chain = Chain(p, target, x)
    if x in index.graph_outputs:
        return Reason("producer_output_is_graph_output", f"'{x}' is also a graph output")
    if len(index.readers(x)) > 1:
        return Reason("shared_producer_output", f"'{x}' also feeds {len(index.readers(x)) - 1} other node(s)")
    affine = affine_for(chain)
    if affine is None:
        return Reason("channel_mismatch", "not a per-channel map")  # only affine steps get here
    if affine.s.shape != (chain.target.channels,):
        return Reason(
            "channel_mismatch",
            f"it has {affine.s.shape[0]} channels but {chain.target.op} '{node_label(index.nodes[chain.producer])}' "
            f"produces {chain.target.channels}",
        )
    chains.pop(x, None)
    chain.compose(i, affine, index.nodes[i].output[0])
    chains[chain.end] = chain
    return chain


# -- rewriting ----------------------------------------------------------------------------------

def write_constant(index: GraphIndex, node: onnx.NodeProto, slot: int, array: Union[np.ndarray, Deferred], base: str) -> str:
    """Store ``array`` for ``node.input[slot]``: in place when only this node reads that initializer
    and the shape and dtype stay, else as a new initializer (shared weights are never changed)."""
    old = node.input[slot] if len(node.input) > slot else ""
    tensor = index.initializers.get(old)
    if (
        tensor is not None
        and len(set(index.readers(old))) == 1
        and old not in index.graph_outputs
        and tuple(tensor.dims) == array.shape
        and onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type) == np.dtype(array.dtype)
    ):
        index.replace_initializer(old, array)
        return old
    return index.add_initializer(array, base)


def apply(index: GraphIndex, chain: Chain) -> List[str]:
    """Rewrite one chain; returns the names that may have become unused."""
    old = index.nodes[chain.producer]
    target = chain.target
    w_name = old.input[target.weight_slot]
    w = index.constant(w_name)
    dtype = w.dtype
    # The weight is computed when written (one at a time), from the value it has now.
    current, factor = index.value_thunk(w_name), target.factor(w, chain.s)
    new_w = Deferred(w.shape, dtype, lambda: scaled(current(), factor))
    del w
    has_bias = target.bias_slot > 0 and len(old.input) > target.bias_slot and old.input[target.bias_slot]
    bias = index.constant(old.input[target.bias_slot]).astype(np.float64) if has_bias else 0.0
    new_b = (target.bias_scale * bias * chain.s + chain.t).astype(dtype)

    node = onnx.NodeProto()
    node.CopyFrom(old)
    label = old.name or w_name
    freed = [n for i in chain.steps for n in index.nodes[i].input] + list(old.input)
    for i in chain.steps:
        index.remove_node(i)
    node.input[target.weight_slot] = write_constant(index, old, target.weight_slot, new_w, f"{label}_weight_folded")
    if target.to_gemm:
        del node.input[2:]
        node.op_type = "Gemm"
        node.input.append(index.add_initializer(new_b, f"{label}_bias"))
    else:
        b_name = write_constant(index, old, target.bias_slot, new_b, f"{label}_bias")
        while len(node.input) <= target.bias_slot:
            node.input.append("")
        node.input[target.bias_slot] = b_name
        if target.op == "Gemm":
            set_attr(node, "beta", 1.0)
    if node.op_type == "Gemm" and index.opset < 7:
        set_attr(node, "broadcast", 1)  # Gemm before opset 7 broadcasts C only when asked
    node.output[0] = chain.end
    index.replace_node(chain.producer, node)
    return freed
