"""Backward folds: a BN that nothing before it can absorb, folded into its only consumer.

``Conv(s*x + t) = Conv_{W*s}(x) + sum_{c,k} W[m,c,k] * t[c]`` holds only where the Conv reads no
padding (padded zeros would have been ``t`` before the fold), so Conv consumers must not pad.
``(A*s + t) @ B = A @ (s[:, None] * B) + t @ B`` for Gemm and rank-2 MatMul.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from ..proto import ONNX_DOMAINS, attr, node_label, str_attr
from ..report import Code, Reason
from . import forward, quantized
from .common import Affine, Scope, check_batchnorm, left_for, rewrite_layer
from .forward import constant_weight, constant_weights
from .planning import Notes, Planning
from .safety import check_bias, check_weight, scale_hazards, weight_hazards

# Left-alone reasons about the producer side: only those BNs may still fold backward.
PRODUCER_REASONS = {
    Code.NO_PRODUCER,
    Code.UNSUPPORTED_PRODUCER,
    Code.SHARED_PRODUCER_OUTPUT,
    Code.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT,
    Code.PRODUCER_WEIGHT_NOT_CONSTANT,
    Code.AXIS_MISMATCH,
    Code.UNKNOWN_RANK,
    Code.UNSUPPORTED_DTYPE,
    Code.CHANNEL_MISMATCH,
    Code.CONCAT_BRANCH,
}
Rewrite = Callable[[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Consumer:
    """How one consumer absorbs ``x -> s * x + t`` on its input channels."""

    channels: int
    rewrite: Rewrite  # (W, B or None, s, t) in float64 -> (W', B')
    factor: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (W, s) -> what W is multiplied by
    to_gemm: bool = False
    channel_axis: int = 0


@dataclass(frozen=True)
class Backward:
    bn: int
    consumer: int
    affine: Affine
    how: Consumer


def _conv(scope: Scope, node: onnx.NodeProto) -> Consumer | Reason:
    w = constant_weights(scope, node)
    if isinstance(w, Reason):
        return w
    pads, auto_pad = attr(node, "pads", []), str_attr(node, "auto_pad", "NOTSET")
    if any(pads) or auto_pad not in ("NOTSET", "VALID"):
        return Reason(
            Code.PADDED_CONSUMER, f"Conv '{node_label(node)}' pads its input (pads={list(pads)}, auto_pad={auto_pad})"
        )
    group = attr(node, "group", 1)
    m, per_group = w.shape[0], w.shape[1]

    # Output channel m belongs to group m // (M/group) and reads input channels of that group.
    groups = np.arange(m) // (m // group)
    idx = groups[:, None] * per_group + np.arange(per_group)[None, :]  # (M, C/group)

    def factor(W: np.ndarray, s: np.ndarray) -> np.ndarray:
        picked: np.ndarray = s[idx]
        return picked.reshape(idx.shape + (1,) * (W.ndim - 2))

    def rewrite(W: np.ndarray, B: np.ndarray | None, s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shift = (W * factor(W, t)).reshape(m, -1).sum(axis=1)
        return W * factor(W, s), shift if B is None else B + shift

    return Consumer(per_group * group, rewrite, factor)


def _gemm(scope: Scope, node: onnx.NodeProto) -> Consumer | Reason:
    if attr(node, "transA", 0):
        return Reason(
            Code.AXIS_MISMATCH, f"Gemm '{node_label(node)}' transposes A: the BN's channels are not its K axis"
        )
    b = constant_weights(scope, node, ("B", "C"))
    if isinstance(b, Reason):
        return b
    trans_b, alpha, beta = attr(node, "transB", 0), attr(node, "alpha", 1.0), attr(node, "beta", 1.0)

    def factor(B: np.ndarray, s: np.ndarray) -> np.ndarray:
        return s[None, :] if trans_b else s[:, None]

    def rewrite(B: np.ndarray, C: np.ndarray | None, s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bk = B.T if trans_b else B  # (K, N)
        shift = alpha * (t @ bk)
        return B * factor(B, s), shift if C is None else beta * C + shift

    return Consumer(b.shape[1] if trans_b else b.shape[0], rewrite, factor, channel_axis=0 if trans_b else 1)


def _matmul(scope: Scope, node: onnx.NodeProto) -> Consumer | Reason:
    w = constant_weight(scope, node, 1, "weight")
    if isinstance(w, Reason):
        return w
    rank = scope.rank(node.input[0])
    if w.ndim != 2 or rank != 2:
        return Reason(
            Code.AXIS_MISMATCH,
            f"MatMul '{node_label(node)}' is not a rank-2 product: the BN's channels are not its K axis",
        )
    return Consumer(
        w.shape[0], lambda W, B, s, t: (W * s[:, None], t @ W), lambda W, s: s[:, None], to_gemm=True, channel_axis=1
    )


CONSUMERS = {"Conv": _conv, "Gemm": _gemm, "MatMul": _matmul}


def plan(scope: Scope, left: dict[int, Reason]) -> tuple[list[Backward], dict[int, Reason]]:
    """Backward folds for BNs the forward pass left, and the reasons of those that still stay (a
    padded consumer is a better explanation than the producer's)."""
    index = scope.index
    out, still = [], dict(left)
    for i, reason, bn in left_for(scope, left, PRODUCER_REASONS):
        y = bn.output[0]
        readers = index.readers(y)
        if y in index.graph_outputs or len(readers) != 1:
            continue
        consumer = index.node(readers[0])
        make = CONSUMERS.get(consumer.op_type) if consumer.domain in ONNX_DOMAINS else None
        if make is None or consumer.input[0] != y or list(consumer.input).count(y) != 1:
            continue
        how = make(scope, consumer)
        if not isinstance(how, Reason) and quantized.find(scope, consumer.input[1]) is not None:
            how = Reason(
                Code.QUANTIZED_WEIGHT_AXIS,
                f"the weight of {consumer.op_type} '{node_label(consumer)}' after it is quantized per output "
                "channel; a backward fold would scale its input channels",
            )
            still[i] = Reason(how.code, f"{reason.message}; {how.message}")
            continue
        if isinstance(how, Reason):
            if how.code in (Code.PADDED_CONSUMER, Code.INVALID_NODE):  # says more than the producer side
                still[i] = Reason(how.code, f"{reason.message}; {how.message}")
            continue
        affine = check_batchnorm(scope, bn)
        if isinstance(affine, Reason) or affine.s.shape != (how.channels,):
            continue
        out.append(Backward(i, readers[0], affine, how))
        del still[i]
    return out, still


def input_map(fold: Backward) -> forward.InputMap:
    """(weight, bias) in float64 -> the same with ``fold``'s BN folded in, for a layer whose weight
    and bias already carry a forward fold (its bias then enters once: Gemm's beta is 1 after it)."""

    def then(w: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        new_w, shift = fold.how.rewrite(w, None, fold.affine.s, fold.affine.t)
        return new_w, bias + shift

    return then


def apply_with(scope: Scope, fold: Backward, chain: forward.Chain) -> list[str]:
    """Fold the BN into a layer that also takes ``chain`` forward: one float64 computation of the
    layer's weight and bias, and one cast (folded one after the other, the weight was cast twice)."""
    bn = scope.index.node(fold.bn)
    freed = list(bn.input) + forward.apply(scope, chain, then=input_map(fold), x=bn.input[0])
    scope.index.remove_node(fold.bn)  # after: while it reads x, a weight that is x is not written in place
    return freed


def apply(scope: Scope, fold: Backward) -> list[str]:
    index = scope.index
    bn, old = index.node(fold.bn), index.node(fold.consumer)
    # A forward fold may have rewritten this node already (new weights, beta=1, MatMul -> Gemm):
    # derive the rewrite from the node as it is now.
    how = CONSUMERS[old.op_type](scope, old)
    w = scope.constant(old.input[1])
    if isinstance(how, Reason) or w is None:
        raise ValueError(f"{old.op_type} '{node_label(old)}' can no longer absorb '{bn.output[0]}'")
    has_bias = len(old.input) > 2 and old.input[2]
    old_bias = scope.constant(old.input[2]) if has_bias else None
    bias = None if old_bias is None else old_bias.astype(np.float64)
    new_w, new_b = how.rewrite(w.astype(np.float64), bias, fold.affine.s, fold.affine.t)
    freed = list(bn.input) + list(old.input)
    rewrite_layer(
        scope,
        fold.consumer,
        new_w.astype(w.dtype),
        np.asarray(new_b).astype(w.dtype),
        to_gemm=how.to_gemm,
        x=bn.input[0],
    )
    index.remove_node(fold.bn)  # after: while it reads x, a weight or bias that is x is not written in place
    return freed


def vet(scope: Scope, b: Backward, strict: bool, notes: Notes) -> Reason | None:
    """Refuse a backward fold whose weight or bias is unsafe in its dtype; note its hazards."""
    consumer = scope.index.node(b.consumer)
    w_name = consumer.input[1]
    w = scope.constant(w_name)
    if w is None:
        return Reason(Code.PRODUCER_WEIGHT_NOT_CONSTANT, f"weight '{w_name}' {scope.not_constant(w_name)}")
    found = check_weight(w_name, w, b.how.factor(w, b.affine.s), b.how.channel_axis)
    if isinstance(found, Reason):
        return found
    bias_name = consumer.input[2] if len(consumer.input) > 2 and consumer.input[2] else ""
    old_bias = scope.constant(bias_name) if bias_name else None
    with np.errstate(all="ignore"):
        _, new_b = b.how.rewrite(
            w.astype(np.float64), None if old_bias is None else old_bias.astype(np.float64), b.affine.s, b.affine.t
        )
    problem = check_bias(f"bias of {node_label(consumer)}", np.asarray(new_b, dtype=np.float64), w.dtype)
    if problem is not None:
        return problem
    bn = node_label(scope.index.node(b.bn))
    return notes.verdict(scale_hazards(bn, b.affine.s) + weight_hazards(bn, w_name, w.dtype, found), strict)


def vet_both(scope: Scope, chain: forward.Chain, b: Backward) -> Reason | None:
    """Refuse a backward fold into a layer that also takes ``chain`` forward when the weight or bias
    carrying both would be unsafe in its dtype (each fold alone was checked on the layer's weight)."""
    problem = forward.unsafe(scope, chain, (lambda w: b.how.factor(w, b.affine.s), input_map(b)))
    if not isinstance(problem, Reason):
        return None
    bns = ", ".join(node_label(scope.index.node(i)) for i in chain.bns) or "the BN after it"
    layer = node_label(scope.index.node(chain.producer))
    return Reason(problem.code, f"{problem.message} (with {bns} folded into {layer} too)")


def plan_step(p: Planning) -> None:
    """BNs no forward fold took, folded into the layer after them, checked on their own and together
    with a forward fold (or a Concat split's part) the same layer takes."""
    backs, p.left = plan(p.scope, p.left)
    forward_into = {c.producer: c for c in p.chains} | {ch.producer: ch for c in p.splits for ch in c.branches}
    for b in backs:
        both = forward_into.get(b.consumer)
        reason = None if both is None else vet_both(p.scope, both, b)
        reason = reason or vet(p.scope, b, p.strict, p.notes)
        if reason is None:
            p.backs.append(b)
        else:
            p.left[b.bn] = reason
    for b in p.backs:
        consumer = p.scope.index.node(b.consumer)
        p.folded(b.bn, node_label(consumer), consumer.op_type, "backward")
