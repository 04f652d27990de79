"""Backward folds: a BN that nothing before it can absorb, folded into its only consumer.

``Conv(s*x + t) = Conv_{W*s}(x) + sum_{c,k} W[m,c,k] * t[c]`` holds only where the Conv reads no
padding (padded zeros would have been ``t`` before the fold), so Conv consumers must not pad.
``(A*s + t) @ B = A @ (s[:, None] * B) + t @ B`` for Gemm and rank-2 MatMul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import onnx

from ..graph import ONNX_DOMAINS, GraphIndex, attr, set_attr
from ..report import Reason
from .common import Affine, check_batchnorm, node_label
from .forward import constant_weight, constant_weights, write_constant

# Left-alone reasons about the producer side: only those BNs may still fold backward.
PRODUCER_REASONS = {
    "no_producer", "unsupported_producer", "shared_producer_output", "producer_output_is_graph_output",
    "producer_weight_not_constant", "axis_mismatch", "unknown_rank", "unsupported_dtype", "channel_mismatch",
}


@dataclass
class Consumer:
    """How one consumer absorbs ``x -> s * x + t`` on its input channels."""

    channels: int
    # (W, B or None, s, t) in float64 -> (W', B')
    rewrite: Callable[[np.ndarray, Optional[np.ndarray], np.ndarray, np.ndarray], tuple]
    to_gemm: bool = False


@dataclass
class Backward:
    bn: int
    consumer: int
    affine: Affine
    how: Consumer


def _conv(index: GraphIndex, node: onnx.NodeProto) -> Union[Consumer, Reason]:
    w = constant_weights(index, node)
    if isinstance(w, Reason):
        return w
    pads, auto_pad = attr(node, "pads", []), attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if any(pads) or auto_pad not in ("NOTSET", "VALID"):
        return Reason("padded_consumer", f"Conv '{node_label(node)}' pads its input (pads={list(pads)}, auto_pad={auto_pad})")
    group = attr(node, "group", 1)
    m, per_group = w.shape[0], w.shape[1]

    def rewrite(W, B, s, t):
        # Output channel m belongs to group m // (M/group) and reads input channels of that group.
        groups = np.arange(m) // (m // group)
        idx = groups[:, None] * per_group + np.arange(per_group)[None, :]  # (M, C/group)
        extra = (1,) * (W.ndim - 2)
        new_w = W * s[idx].reshape(idx.shape + extra)
        shift = (W * t[idx].reshape(idx.shape + extra)).reshape(m, -1).sum(axis=1)
        return new_w, (0.0 if B is None else B) + shift

    return Consumer(per_group * group, rewrite)


def _gemm(index: GraphIndex, node: onnx.NodeProto) -> Union[Consumer, Reason]:
    if attr(node, "transA", 0):
        return Reason("axis_mismatch", f"Gemm '{node_label(node)}' transposes A: the BN's channels are not its K axis")
    b = constant_weights(index, node, ("B", "C"))
    if isinstance(b, Reason):
        return b
    trans_b, alpha, beta = attr(node, "transB", 0), attr(node, "alpha", 1.0), attr(node, "beta", 1.0)

    def rewrite(B, C, s, t):
        bk = B.T if trans_b else B  # (K, N)
        new_b = B * (s[None, :] if trans_b else s[:, None])
        return new_b, beta * (0.0 if C is None else C) + alpha * (t @ bk)

    return Consumer(b.shape[1] if trans_b else b.shape[0], rewrite)


def _matmul(index: GraphIndex, node: onnx.NodeProto) -> Union[Consumer, Reason]:
    w = constant_weight(index, node, 1, "weight")
    if isinstance(w, Reason):
        return w
    rank = index.types.rank(node.input[0]) if index.types else None
    if w.ndim != 2 or rank != 2:
        return Reason("axis_mismatch", f"MatMul '{node_label(node)}' is not a rank-2 product: the BN's channels are not its K axis")
    return Consumer(w.shape[0], lambda W, B, s, t: (W * s[:, None], t @ W), to_gemm=True)


CONSUMERS = {"Conv": _conv, "Gemm": _gemm, "MatMul": _matmul}


def plan(index: GraphIndex, left: Dict[int, Reason]) -> List[Backward]:
    """Backward folds for BNs left by the forward pass; ``left`` is updated where a better reason
    (a padded consumer) explains why a BN stays."""
    out = []
    for i, reason in sorted(left.items()):
        if reason.code not in PRODUCER_REASONS:
            continue
        bn = index.nodes[i]
        y = bn.output[0]
        readers = index.readers(y)
        if y in index.graph_outputs or len(readers) != 1:
            continue
        consumer = index.nodes[readers[0]]
        make = CONSUMERS.get(consumer.op_type) if consumer.domain in ONNX_DOMAINS else None
        if make is None or consumer.input[0] != y or list(consumer.input).count(y) != 1:
            continue
        how = make(index, consumer)
        if isinstance(how, Reason):
            if how.code == "padded_consumer":
                left[i] = Reason("padded_consumer", f"{reason.message}; {how.message}")
            continue
        affine = check_batchnorm(index, bn)
        if isinstance(affine, Reason) or affine.s.shape != (how.channels,):
            continue
        out.append(Backward(i, readers[0], affine, how))
        del left[i]
    return out


def apply(index: GraphIndex, fold: Backward) -> List[str]:
    bn, old = index.nodes[fold.bn], index.nodes[fold.consumer]
    # A forward fold may have rewritten this node already (new weights, beta=1, MatMul -> Gemm):
    # derive the rewrite from the node as it is now.
    how = CONSUMERS[old.op_type](index, old)
    w = index.constant(old.input[1])
    has_bias = len(old.input) > 2 and old.input[2]
    bias = index.constant(old.input[2]).astype(np.float64) if has_bias else None
    new_w, new_b = how.rewrite(w.astype(np.float64), bias, fold.affine.s, fold.affine.t)
    new_w, new_b = new_w.astype(w.dtype), np.asarray(new_b).astype(w.dtype)
    label = old.name or old.input[1]
    freed = list(bn.input) + list(old.input)
    node = onnx.NodeProto()
    node.CopyFrom(old)
    node.input[0] = bn.input[0]
    node.input[1] = write_constant(index, old, 1, new_w, f"{label}_weight_folded")
    if how.to_gemm:
        node.op_type = "Gemm"
        del node.input[2:]
        node.input.append(index.add_initializer(new_b, f"{label}_bias"))
    else:
        b_name = write_constant(index, old, 2, new_b, f"{label}_bias")
        del node.input[2:]
        node.input.append(b_name)
        if node.op_type == "Gemm":
            set_attr(node, "beta", 1.0)
    if node.op_type == "Gemm" and index.opset < 7:
        set_attr(node, "broadcast", 1)
    index.remove_node(fold.bn)
    index.replace_node(fold.consumer, node)
    return freed
