"""Forward folds: a BN (and per-channel Mul/Add/Sub/Div by constants around it) absorbed into the
Conv, ConvTranspose, Gemm or MatMul that produces its input.

find -> check -> rewrite: :func:`plan` walks the graph once in order and decides, for every BN, the
chain it joins or the reason it stays; :func:`apply` rewrites each chain's producer once, with the
chain's affine maps composed in float64.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import onnx

from ..graph import Deferred, Value
from ..proto import ONNX_DOMAINS, attr, is_batchnorm, node_label, str_attr
from ..report import Code, Reason
from . import batch, quantized
from .batch import bias_input
from .common import Affine, Identity, Scope, channel_vector, check_batchnorm, is_float, rewrite_layer, scaled
from .planning import Notes, Planning
from .safety import (
    UNKNOWN_SUM,
    Hazard,
    WeightRanges,
    check_bias,
    check_gain,
    check_weight,
    scale_hazards,
    weight_hazards,
)

DEFER_BYTES = 1 << 20  # folded weights larger than this are computed when written


@dataclass(frozen=True)
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
    channel_axis: int = 0  # the weight's output-channel axis (for per-channel ranges)
    channel_last: bool = False  # MatMul: its output channels are the last axis, whatever the rank
    bias_node: bool = False  # MatMul of rank >= 3: the folded bias is an Add after it


@dataclass(frozen=True)
class Chain:
    """A producer and the BNs and affine ops after it that fold into it, composed into one map.

    ``kept`` are steps the map passes through unchanged and that stay in the graph: a MaxPool (max
    commutes with ``s * y + t`` when every ``s > 0``), an average pool without padding, a
    Flatten/Reshape that keeps the channel axis where the map needs it, a Transpose that moves it to
    axis 1 or the last axis. ``prefix`` is the chain before its last step: when the whole chain is
    refused, a shorter one may still fold."""

    producer: int
    target: Target
    end: str
    steps: tuple[int, ...] = ()
    bns: tuple[int, ...] = ()
    s: np.ndarray | None = None
    t: np.ndarray | None = None
    kept: tuple[int, ...] = ()
    pool_s: np.ndarray | None = None  # the scale composed after the first MaxPool: must stay > 0
    rank: int = 0  # rank of the value at ``end`` (0: the producer's output rank)
    squeezed: bool = False  # every axis after the channel axis has size 1 (after a global pool)
    identity: Identity | None = None  # a RepVGG identity branch added to the Conv (fold.reparam)
    summed: int = 1  # the most values an average pool in ``kept`` adds up (safety.UNKNOWN_SUM: unknown)
    last: bool | None = None  # channels on the last axis now, after a Transpose (None: as the target writes)
    prefix: Chain | None = field(default=None, compare=False, repr=False)

    @property
    def current_rank(self) -> int:
        return self.rank or self.target.rank

    @property
    def channels_last(self) -> bool:
        """Whether the value at ``end`` has its channels on its last axis (else on axis 1)."""
        return self.target.channel_last if self.last is None else self.last

    @property
    def axis(self) -> int:
        """The channel axis of the value at ``end``."""
        return self.current_rank - 1 if self.channels_last else 1

    def but(self, **changes: object) -> Chain:
        """A copy with ``changes`` (``dataclasses.replace`` without re-running ``__init__``: a chain
        is copied at every step of a walk over the whole graph)."""
        fields = self.__dict__
        if not fields.keys() >= changes.keys():
            raise TypeError(f"Chain has no field {', '.join(sorted(changes.keys() - fields.keys()))}")
        copy = object.__new__(Chain)
        copy.__dict__.update(fields, **changes)
        return copy

    @staticmethod
    def start(producer: int, target: Target, end: str) -> Chain:
        """``Chain(producer, target, end)``, made as :meth:`but` makes copies."""
        return _NO_CHAIN.but(producer=producer, target=target, end=end)

    def compose(self, step: int, affine: Affine, end: str, bn: bool = False) -> Chain:
        """The chain with step ``step`` (a BN with ``bn``) applying ``affine`` after it."""
        if self.s is None or self.t is None:
            s, t = affine.s, affine.t
        else:
            s, t = affine.s * self.s, affine.s * self.t + affine.t
        pool_s = None if self.pool_s is None else affine.s * self.pool_s
        bns = (*self.bns, step) if bn else self.bns
        return self.but(end=end, steps=(*self.steps, step), s=s, t=t, pool_s=pool_s, bns=bns, prefix=self._part())

    def through(self, step: int, end: str, **changes: object) -> Chain:
        """The chain passed through step ``step``, which stays in the graph."""
        return self.but(end=end, steps=(*self.steps, step), kept=(*self.kept, step), prefix=self._part(), **changes)

    def _part(self) -> Chain | None:
        """This chain as the prefix of a longer one: only a chain that holds a BN may fold alone."""
        return self if self.bns else None


_NO_CHAIN = Chain(-1, Target("", 0, 0, 0, 0, lambda W, s: s), "")  # what Chain.start copies


# -- targets ------------------------------------------------------------------------------------


def constant_weight(scope: Scope, node: onnx.NodeProto, slot: int, role: str) -> np.ndarray | Reason:
    """The value of the node's input ``slot`` when it is a float constant a caller cannot override."""
    return _constant_input(scope, node, node.input[slot] if len(node.input) > slot else "", role)


def _constant_input(scope: Scope, node: onnx.NodeProto, name: str, role: str) -> np.ndarray | Reason:
    if not name:
        return Reason(Code.INVALID_NODE, f"{node.op_type} '{node_label(node)}' has no {role} input")
    if scope.index.is_overridable(name):
        return Reason(
            Code.OVERRIDABLE_INITIALIZER,
            f"{role} '{name}' of {node.op_type} '{node_label(node)}' is a graph input a caller may override",
        )
    value = scope.constant(name)
    if value is None:
        return Reason(
            Code.PRODUCER_WEIGHT_NOT_CONSTANT,
            f"{role} '{name}' of {node.op_type} '{node_label(node)}' {scope.not_constant(name)}",
        )
    if not is_float(value):
        return Reason(
            Code.UNSUPPORTED_DTYPE, f"{role} '{name}' of {node.op_type} '{node_label(node)}' is {value.dtype}"
        )
    return value


def constant_weights(
    scope: Scope, node: onnx.NodeProto, roles: tuple[str, str] = ("weight", "bias")
) -> np.ndarray | Reason:
    """The node's weight (input 1) when it, and its bias (input 2) if any, are foldable constants
    and the layer makes sense (ranks, group, bias shape), in both fold directions."""
    inputs, outputs = node.input[:], node.output[:]
    if len(inputs) < 2 or not inputs[0] or not inputs[1] or not outputs or not outputs[0]:
        return Reason(Code.INVALID_NODE, f"{node.op_type} '{node_label(node)}' lacks its input, weight or output")
    w = _constant_input(scope, node, inputs[1], roles[0])
    if isinstance(w, Reason):
        return w
    bias = None
    if len(inputs) > 2 and inputs[2]:
        b = _constant_input(scope, node, inputs[2], roles[1])
        if isinstance(b, Reason):
            return b
        bias = b
    problem = _layer_problem(node, w, bias)
    if problem:
        return Reason(Code.INVALID_NODE, f"{node.op_type} '{node_label(node)}': {problem}")
    return w


def _layer_problem(node: onnx.NodeProto, w: np.ndarray, bias: np.ndarray | None) -> str:
    """What makes a layer impossible, or "" when its weight and bias fit together."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        group = attr(node, "group", 1)
        if w.ndim < 3:
            return f"a weight of rank {w.ndim} (needs at least 3)"
        if not isinstance(group, int) or group < 1 or w.shape[0] % group:
            return f"group={group} does not divide its {w.shape[0]} weight rows"
        channels = w.shape[0] if op == "Conv" else w.shape[1] * group
        if bias is not None and bias.shape != (channels,):
            return f"a bias of shape {bias.shape} for {channels} output channels"
    elif op == "Gemm":
        if w.ndim != 2:
            return f"a B of rank {w.ndim} (needs 2)"
        n = w.shape[0] if attr(node, "transB", 0) else w.shape[1]
        if bias is not None and (bias.ndim > 2 or (bias.ndim and bias.shape[-1] not in (1, n))):
            return f"a C of shape {bias.shape} that does not broadcast to (M, {n})"
    return ""


def _per_row(W: np.ndarray, s: np.ndarray) -> np.ndarray:
    """A Conv's factor: output channel c is row c of the weight."""
    return s.reshape((-1,) + (1,) * (W.ndim - 1))


@functools.lru_cache(maxsize=256)
def _conv_target(channels: int, rank: int) -> Target:
    return Target("Conv", channels, rank, 1, 2, _per_row)  # a value: one per shape is made


def _conv(scope: Scope, node: onnx.NodeProto) -> Target | Reason:
    w = constant_weights(scope, node)
    if isinstance(w, Reason):
        return w
    return _conv_target(w.shape[0], w.ndim)


def _conv_transpose(scope: Scope, node: onnx.NodeProto) -> Target | Reason:
    w = constant_weights(scope, node)
    if isinstance(w, Reason):
        return w
    group = attr(node, "group", 1)
    c_in, per_group = w.shape[0], w.shape[1]

    def scale(W: np.ndarray, s: np.ndarray) -> np.ndarray:
        # Weight layout (C_in, C_out/group, k...): output channel g*C_out/group + j lives in the rows
        # of group g, column j.
        rows: np.ndarray = s.reshape(group, per_group)[np.arange(c_in) // (c_in // group)]
        return rows.reshape(rows.shape + (1,) * (W.ndim - 2))

    return Target("ConvTranspose", per_group * group, w.ndim, 1, 2, scale, channel_axis=1)


def _gemm(scope: Scope, node: onnx.NodeProto) -> Target | Reason:
    b = constant_weights(scope, node, ("B", "C"))
    if isinstance(b, Reason):
        return b
    trans_b = attr(node, "transB", 0)

    def scale(B: np.ndarray, s: np.ndarray) -> np.ndarray:
        return s[:, None] if trans_b else s[None, :]

    return Target(
        "Gemm",
        b.shape[0] if trans_b else b.shape[1],
        2,
        1,
        2,
        scale,
        bias_scale=attr(node, "beta", 1.0),
        channel_axis=0 if trans_b else 1,
    )


def _matmul(scope: Scope, node: onnx.NodeProto) -> Target | Reason:
    w = constant_weight(scope, node, 1, "weight")
    if isinstance(w, Reason):
        return w
    rank = scope.rank(node.input[0])
    if w.ndim == 2 and rank is None:
        return Reason(
            Code.UNKNOWN_RANK, f"the rank of '{node.input[0]}' (input of MatMul '{node_label(node)}') is unknown"
        )
    if w.ndim != 2 or rank is None or rank < 2:
        return Reason(
            Code.AXIS_MISMATCH,
            f"MatMul '{node_label(node)}' multiplies a rank-{rank} input by a rank-{w.ndim} weight: "
            "its output columns are not a channel axis",
        )
    return Target(
        "MatMul",
        w.shape[1],
        rank,
        1,
        -1,
        lambda W, s: s[None, :],
        to_gemm=rank == 2,
        channel_axis=1,
        channel_last=True,
        bias_node=rank > 2,
    )


TARGETS = {"Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul}
AFFINE_OPS = ("Add", "Sub", "Mul", "Div")


# -- planning -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    chains: tuple[Chain, ...]
    left: dict[int, Reason]


def _affine_of(
    node: onnx.NodeProto, x: str, const: np.ndarray, rank: int, channels: int, axis: int = 1
) -> Affine | None:
    vec = channel_vector(const, rank, channels, axis)
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
    if not np.isfinite(vec).all():
        return None  # Inf/NaN constants: the op stays as it is
    if first and np.all(vec != 0):  # Div: only x / c is affine
        return Affine(1.0 / vec, zero)
    return None


def _affine_operand(scope: Scope, node: onnx.NodeProto) -> tuple[str, np.ndarray] | None:
    """(activation, constant) of a binary Add/Sub/Mul/Div with exactly one constant operand."""
    if node.op_type not in AFFINE_OPS or node.domain not in ONNX_DOMAINS or len(node.input) != 2:
        return None
    a, b = node.input
    ca, cb = (None if scope.index.is_overridable(n) else scope.constant(n) for n in (a, b))
    if (ca is None) == (cb is None):
        return None
    return (b, cast(np.ndarray, ca)) if cb is None else (a, cb)


def noop_input(scope: Scope, node: onnx.NodeProto) -> str | None:
    """The input of a node that passes it through unchanged at inference: Identity, Dropout in
    inference mode whose mask is not read, a Cast to the type it already has. Else None."""
    if node.domain not in ONNX_DOMAINS or not node.input or not node.input[0] or len(node.output) < 1:
        return None
    x: str = node.input[0]
    if node.op_type == "Identity":
        return x
    if node.op_type == "Dropout":
        mask = node.output[1] if len(node.output) > 1 else ""
        if mask and scope.index.uses(mask):
            return None
        if scope.opset < 7:
            return x if attr(node, "is_test", 0) else None
        training = node.input[2] if len(node.input) > 2 else ""
        if training:
            value = scope.constant(training)
            if value is None or bool(np.asarray(value).reshape(-1)[0]):
                return None
        return x
    if node.op_type == "Cast" and scope.types is not None:
        elem = scope.types.elem_type(x)
        return x if elem and attr(node, "to") == elem else None
    return None


def _identity(chain: Chain) -> Affine | None:
    c = chain.target.channels
    return Affine(np.ones(c), np.zeros(c))


STEP_CODES = (Code.AXIS_MISMATCH, Code.PADDED_POOL)  # what a pass-through step refuses with itself
POOLS = ("MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool")
RESHAPES = ("Flatten", "Reshape")
MOVES = ("Transpose",)
SHAPE_READERS = ("Shape", "Size")


def _unused_extra_outputs(scope: Scope, node: onnx.NodeProto) -> bool:
    return not any(o and scope.index.uses(o) for o in node.output[1:])


def _pass_through(scope: Scope, node: onnx.NodeProto, i: int) -> Callable[[Chain], Chain | Reason] | None:
    """For a node a per-channel affine map passes through unchanged (a pool, a Flatten/Reshape that
    keeps the channel axis, a Transpose), how a chain ending at its input goes on past it. Else None."""
    if node.domain not in ONNX_DOMAINS or node.op_type not in POOLS + RESHAPES + MOVES or not node.input:
        return None
    if not node.input[0] or not node.output or not node.output[0] or not _unused_extra_outputs(scope, node):
        return None
    op, out = node.op_type, node.output[0]
    label = f"{op} '{node_label(node)}'"

    def step(chain: Chain) -> Chain | Reason:
        rank, channels = chain.current_rank, chain.target.channels
        if op == "Transpose":
            # Channels that land on axis 1 or the last axis are where a BN (axis 1) or a per-channel
            # constant (broadcast on either) finds them; the other axes' order is not tracked.
            perm = attr(node, "perm", None)
            perm = list(range(rank))[::-1] if perm is None else perm
            if not isinstance(perm, list) or sorted(perm) != list(range(rank)):
                return Reason(Code.AXIS_MISMATCH, f"{label}: perm={perm} does not reorder the {rank} axes")
            moved = perm.index(chain.axis)
            if moved not in (1, rank - 1):
                return Reason(Code.AXIS_MISMATCH, f"{label} moves the channels to axis {moved}")
            return chain.through(i, out, last=moved == rank - 1 and rank > 2, squeezed=False)
        if op in POOLS:
            if chain.channels_last:
                return Reason(Code.AXIS_MISMATCH, f"{label} pools the channel axis (the last axis here)")
            if op == "AveragePool" and (
                any(attr(node, "pads", []) or [])
                or attr(node, "ceil_mode", 0)
                or str_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID")
            ):
                return Reason(Code.PADDED_POOL, f"{label} pads or rounds its windows up: its average would change")
            pool_s, summed = chain.pool_s, chain.summed
            if op.endswith("MaxPool") and pool_s is None:
                pool_s = np.ones(channels)
            if op.endswith("AveragePool"):
                summed = max(summed, _pooled(scope, node))
            squeezed = chain.squeezed or op.startswith("Global")
            return chain.through(i, out, pool_s=pool_s, squeezed=squeezed, summed=summed)
        if op == "Flatten":
            axis = attr(node, "axis", 1)
            axis = axis + rank if isinstance(axis, int) and axis < 0 else axis
            keeps = axis == rank - 1 if chain.channels_last else axis == 1 and (rank == 2 or chain.squeezed)
            if not keeps:
                return Reason(Code.AXIS_MISMATCH, f"{label} (axis={axis}) moves the channel axis")
            return chain.through(i, out, rank=2, squeezed=True)
        shape = scope.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        dims = [int(d) for d in shape.reshape(-1)] if shape is not None and shape.dtype.kind in "iu" else None
        if dims is None or len(dims) < 2:
            return Reason(Code.AXIS_MISMATCH, f"{label}: its target shape is not a constant of rank >= 2")
        if chain.channels_last:  # row-major: a last axis of C in and out keeps every column
            keeps = dims[-1] == channels
        else:  # [N, C, 1, ...] keeps the channels of [N, C, 1, ...] on axis 1
            keeps = (rank == 2 or chain.squeezed) and dims[1] == channels and all(d == 1 for d in dims[2:])
        if not keeps:
            return Reason(Code.AXIS_MISMATCH, f"{label} to {dims} moves the channel axis")
        return chain.through(i, out, rank=len(dims), squeezed=not chain.channels_last)

    return step


def _pooled(scope: Scope, node: onnx.NodeProto) -> int:
    """How many values an average pool adds up for each of its outputs (its window's size)."""
    if node.op_type == "AveragePool":
        kernel = attr(node, "kernel_shape", None)
        sizes = list(kernel) if isinstance(kernel, (list, tuple)) else []
    else:
        shape = scope.types.static_shape(node.input[0]) if scope.types is not None else None
        sizes = list(shape[2:]) if shape is not None and len(shape) > 2 else []
    if not sizes or not all(isinstance(k, int) and k > 0 for k in sizes):
        return UNKNOWN_SUM
    return min(int(np.prod(sizes, dtype=object)), UNKNOWN_SUM)


def _looks_through(scope: Scope, node: onnx.NodeProto) -> str | None:
    """The input a chain could reach ``node`` through: of a no-op, a pass-through step, or an
    Add/Sub/Mul/Div by a constant. Else None."""
    x = noop_input(scope, node)
    if x is None and _pass_through(scope, node, -1) is not None:
        x = node.input[0]
    if x is None and (operand := _affine_operand(scope, node)) is not None:
        x = operand[0]
    return x


def _obstacle(scope: Scope, x: str) -> Reason:
    """Why the node before a BN cannot take it, looking through no-ops, pools and reshapes to what
    really stops it."""
    index, name = scope.index, x
    via: list[str] = []
    seen = {name}
    node = index.node_of(name)
    while node is not None and (before := _looks_through(scope, node)) is not None and before not in seen:
        seen.add(before)
        if index.uses(name) > 1 or name in index.graph_outputs:
            what = "a graph output" if name in index.graph_outputs else f"read by {index.uses(name)} nodes"
            return Reason(
                Code.SHARED_PRODUCER_OUTPUT, f"'{name}' (after {' -> '.join(via) or 'the producer'}) is {what}"
            )
        via.insert(0, f"{node.op_type} '{node_label(node)}'")
        name = before
        node = index.node_of(name)
    if node is None:
        return Reason(
            Code.NO_PRODUCER,
            f"its input '{name}' is a graph input or initializer" + (f" (through {', '.join(via)})" if via else ""),
        )
    if node.op_type in TARGETS and node.domain in ONNX_DOMAINS and via and index.uses(name) < 2:
        return Reason(
            Code.UNSUPPORTED_PRODUCER,
            f"its input comes from {via[-1]}, which does not pass a per-channel map on to "
            f"{node.op_type} '{node_label(node)}' (through {', '.join(via)})",
        )
    if node.op_type in TARGETS and node.domain in ONNX_DOMAINS and via:
        what = "a graph output" if name in index.graph_outputs else f"read by {index.uses(name)} nodes"
        return Reason(
            Code.SHARED_PRODUCER_OUTPUT,
            f"'{name}' of {node.op_type} '{node_label(node)}' is {what} (the BN reaches it through {', '.join(via)})",
        )
    through = f" (through {', '.join(via)})" if via else ""
    return Reason(Code.UNSUPPORTED_PRODUCER, f"its input comes from {node.op_type} '{node_label(node)}'{through}")


Step = Callable[[Chain], Affine | Chain | Reason | None]


def _batchnorm_step(affine: Affine) -> Step:
    def step(chain: Chain) -> Affine | Reason:
        if chain.axis != 1:
            return Reason(
                Code.AXIS_MISMATCH,
                f"it normalizes axis 1 of a rank-{chain.current_rank} value whose channels "
                f"(the {chain.target.op}'s outputs) are on axis {chain.axis}",
            )
        return affine

    return step


def _operand_map(node: onnx.NodeProto, x: str, const: np.ndarray) -> Step:
    """The affine map of an Add/Sub/Mul/Div by a constant, once the chain says its rank and channels."""
    return lambda chain: _affine_of(node, x, const, chain.current_rank, chain.target.channels, chain.axis)


NOOPS = ("Identity", "Dropout", "Cast")
# The op types the walk of :func:`plan` looks at (a BN, a no-op, a pass-through step, an affine op).
_WALKED = frozenset(("BatchNormalization", *NOOPS, *POOLS, *RESHAPES, *MOVES, *AFFINE_OPS))


def plan(scope: Scope, fold_affine: bool = True) -> Plan:
    """Walk the graph once, in order: each BN joins the chain ending at its input, or gets a reason.
    With ``fold_affine``, chains of per-channel Mul/Add/Sub/Div by constants fold without a BN too."""
    index = scope.index
    chains: dict[str, Chain] = {}  # keyed by the chain's current end
    left: dict[int, Reason] = {}
    blocked: dict[str, Reason] = {}  # values after a pass-through step that refused a chain, and why
    nodes = index.nodes
    for i, op in enumerate(index.ops):  # planning rewrites nothing: the lists stay as they are
        if op not in _WALKED:
            continue  # none of the cases below (most nodes of a graph), or a removed node (op "")
        node = cast(onnx.NodeProto, nodes[i])
        if is_batchnorm(node):
            affine = check_batchnorm(scope, node)
            x = node.input[0] if node.input else ""
            if isinstance(affine, Reason):
                found: Chain | Reason = affine
            elif x in blocked and x not in chains:
                found = blocked[x]
            else:
                found = _extend(scope, chains, i, x, _batchnorm_step(affine), bn=True)
            if isinstance(found, Reason):
                left[i] = found
        elif (x_in := noop_input(scope, node)) is not None:
            _extend(scope, chains, i, x_in, _identity)  # a no-op joins the chain as the identity map
            if x_in in blocked:
                blocked[node.output[0]] = blocked[x_in]
        elif (passing := _pass_through(scope, node, i)) is not None:
            found = _extend(scope, chains, i, node.input[0], passing, kept=True)
            if node.input[0] in blocked:
                blocked[node.output[0]] = blocked[node.input[0]]
            elif isinstance(found, Reason) and found.code in STEP_CODES:
                blocked[node.output[0]] = found
        else:
            operand = _affine_operand(scope, node)
            if operand:
                x, const = operand
                _extend(scope, chains, i, x, _operand_map(node, x, const))
    # A chain without a BN folds when it holds a per-channel Mul/Add/Sub/Div (Keras 3 writes BNs so).
    kept = [
        c
        for c in chains.values()
        if c.bns or (fold_affine and any(index.node(i).op_type in AFFINE_OPS for i in c.steps if i not in c.kept))
    ]
    return Plan(tuple(sorted(kept, key=lambda c: c.producer)), left)


def _extend(
    scope: Scope, chains: dict[str, Chain], i: int, x: str, step: Step, kept: bool = False, bn: bool = False
) -> Chain | Reason:
    """Add node ``i`` (reading ``x``; a BN with ``bn``) to the chain that ends at ``x``, starting one
    if needed."""
    index = scope.index
    chain = chains.get(x)
    if chain is None:
        p = index.producer.get(x)
        if p is None:
            return Reason(Code.NO_PRODUCER, f"its input '{x}' is a graph input or initializer")
        producer = index.node(p)
        make = TARGETS.get(index.ops[p]) if producer.domain in ONNX_DOMAINS else None
        if make is None:
            return _obstacle(scope, x)
        target = make(scope, producer)
        if isinstance(target, Reason):
            return target
        chain = Chain.start(p, target, x)
    readers = index.readers(x)
    others = [] if readers == [i] else [r for r in readers if r != i]
    if kept:  # x survives a step that stays: readers of its shape alone (LeViT's reshape_as) see no change
        others = [
            r for r in others if index.node(r).op_type not in SHAPE_READERS or index.node(r).domain not in ONNX_DOMAINS
        ]
    if x in index.graph_outputs or others:
        by = index.node_of(x)
        what = f"'{x}' (output of {by.op_type} '{node_label(by)}')" if by is not None else f"'{x}'"
        if x in index.graph_outputs:
            return Reason(Code.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT, f"{what} is also a graph output")
        return Reason(Code.SHARED_PRODUCER_OUTPUT, f"{what} also feeds {len(others)} other node(s)")
    found = step(chain)
    if isinstance(found, (Reason, Chain)):
        if isinstance(found, Chain):
            chains.pop(x, None)
            chains[found.end] = found
        return found
    if found is None:
        return Reason(Code.CHANNEL_MISMATCH, "not a per-channel map")  # only affine steps get here
    if found.s.shape != (chain.target.channels,):
        return Reason(
            Code.CHANNEL_MISMATCH,
            f"it has {found.s.shape[0]} channels but {chain.target.op} '{node_label(index.node(chain.producer))}' "
            f"produces {chain.target.channels}",
        )
    composed = chain.compose(i, found, index.node(i).output[0], bn=bn)
    if composed.pool_s is not None and not np.all(composed.pool_s > 0):
        c = int(np.flatnonzero(~(composed.pool_s > 0))[0])
        pool = next(index.node(k) for k in chain.kept if index.node(k).op_type.endswith("MaxPool"))
        return Reason(
            Code.NONPOSITIVE_SCALE_AFTER_POOL,
            f"its scale at channel {c} is {composed.pool_s[c]:.4g}, and max does not commute with a scale "
            f"<= 0 (it would pass through {pool.op_type} '{node_label(pool)}' into "
            f"{chain.target.op} '{node_label(index.node(chain.producer))}')",
        )
    chains.pop(x, None)
    chains[composed.end] = composed
    return composed


# -- rewriting ----------------------------------------------------------------------------------


def new_bias(scope: Scope, node: onnx.NodeProto, chain: Chain) -> np.ndarray:
    """The chain's folded bias in float64: ``bias_scale * b * s + t``."""
    target = chain.target
    assert chain.s is not None and chain.t is not None
    name = bias_input(node, target)
    old_bias = scope.constant(name) if name else None
    bias = 0.0 if old_bias is None else old_bias.astype(np.float64)
    extra = 0.0 if chain.identity is None else chain.identity.t
    with np.errstate(all="ignore"):
        return np.asarray(target.bias_scale * bias * chain.s + chain.t + extra, dtype=np.float64)


def new_weight(w: np.ndarray, factor: np.ndarray, identity: Identity | None) -> np.ndarray:
    """``w * factor`` (plus the identity kernel) in float64, cast once to ``w``'s dtype."""
    if identity is None:
        return scaled(w, factor)
    with np.errstate(all="ignore"):
        return identity.add_to(w.astype(np.float64) * factor).astype(w.dtype)


InputMap = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def apply(
    scope: Scope,
    chain: Chain,
    prepared: tuple[np.ndarray, np.ndarray] | None = None,
    then: InputMap | None = None,
    x: str | None = None,
) -> list[str]:
    """Rewrite one chain; returns the names that may have become unused. ``prepared`` is its new
    weight and bias when computed already (:func:`.batch.prepare`). ``then`` maps the folded weight
    and bias, in float64, to those of a layer that also takes the BN before it (a backward fold,
    whose input ``x`` the layer then reads): both folds are computed before the one cast."""
    if prepared is not None:
        return _rewrite(scope, chain, *prepared)
    old = scope.index.node(chain.producer)
    target = chain.target
    assert chain.s is not None and chain.t is not None  # a planned chain holds at least one BN
    w_name = old.input[target.weight_slot]
    w = scope.constant(w_name)
    if w is None:
        raise ValueError(f"weight '{w_name}' is no longer constant")
    qw = quantized.find(scope, w_name)
    if isinstance(qw, quantized.Quantized):
        return _rewrite_quantized(scope, chain, qw, w)
    if then is not None:
        assert chain.identity is None  # an identity branch's Conv takes no backward fold (plan)
        with np.errstate(all="ignore"):
            w64, b64 = then(w.astype(np.float64) * target.factor(w, chain.s), new_bias(scope, old, chain))
        return _rewrite(scope, chain, w64.astype(w.dtype), np.asarray(b64).astype(w.dtype), x)
    # Large weights are computed when written (one at a time) from the value they have now, small
    # ones at once.
    identity = chain.identity
    new_w: Value
    if w.nbytes > DEFER_BYTES:
        current, factor = scope.consts.snapshot(w_name), target.factor(w, chain.s)
        new_w = Deferred(tuple(w.shape), w.dtype, lambda: new_weight(current(), factor, identity))
    else:
        new_w = new_weight(w, target.factor(w, chain.s), identity)
    new_b = new_bias(scope, old, chain).astype(w.dtype)
    del w
    return _rewrite(scope, chain, new_w, new_b)


def _rewrite_quantized(scope: Scope, chain: Chain, qw: quantized.Quantized, w: np.ndarray) -> list[str]:
    """The chain folded into a weight behind a DequantizeLinear: new integers (complemented where
    the factor is negative), scales and zero points; the bias re-quantized where it is int32 behind
    its own, else float (of ``w``'s type: the weight's dequantized value)."""
    old, target = scope.index.node(chain.producer), chain.target
    assert chain.s is not None
    label = old.name or old.input[1]
    s = target.factor(w, chain.s)
    weight = quantized.rewrite_weight(scope, qw, s, target.channel_axis, label)
    b64, b_name = new_bias(scope, old, chain), bias_input(old, target)
    bias = quantized.rewrite_bias(scope, b_name, b64, chain.s, label) if b_name else None
    return _rewrite(scope, chain, weight, b64.astype(w.dtype) if bias is None else bias)


def _rewrite(
    scope: Scope, chain: Chain, new_w: Value | str, new_b: np.ndarray | str, x: str | None = None
) -> list[str]:
    """Give the producer its new weight and bias (and input ``x``) and the chain's end as output;
    drop the steps."""
    index, target = scope.index, chain.target
    freed = [n for i in (*chain.steps, chain.producer) for n in index.reads(i)]
    # The producer writes what the first kept step reads; each kept step writes what the next reads,
    # the last one the chain's end (the BN's output name). Values before the end carry the map now:
    # they get fresh names, so that no name of the original holds another value (readers of the
    # shape alone, LeViT's Shape, follow the rename).
    names = [index.fresh(f"{index.node(k).input[0]}_folded") for k in chain.kept] + [chain.end]
    for k, name, before in zip(chain.kept, names[1:], names, strict=False):
        old_input = index.node(k).input[0]
        for r in [r for r in index.readers(old_input) if r != k] + [k]:
            node = onnx.NodeProto()
            node.CopyFrom(index.node(r))
            for slot, n in enumerate(node.input):
                if n == old_input:
                    node.input[slot] = before
            if r == k:
                node.output[0] = name
            index.replace_node(r, node)
    for i in chain.steps:
        if i not in chain.kept:
            index.remove_node(i)
    rewrite_layer(
        scope,
        chain.producer,
        new_w,
        new_b,
        to_gemm=target.to_gemm,
        bias_slot=max(target.bias_slot, 2),
        x=x,
        output=names[0],
        bias_node=target.bias_node,
    )
    return freed


# -- the family's step: plan, vet, note ---------------------------------------------------------


def unsafe(
    scope: Scope, chain: Chain, also: tuple[Callable[[np.ndarray], np.ndarray], InputMap] | None = None
) -> Reason | tuple[str, np.dtype, WeightRanges]:
    """Why the chain's folded weight or bias would be unsafe in its dtype, or what the weight's check
    found: (its name, dtype, ranges). ``also``: a backward fold the same layer takes too, as (its
    factor on the weight, its map of the float64 weight and bias)."""
    assert chain.s is not None
    target, node = chain.target, scope.index.node(chain.producer)
    w_name = node.input[target.weight_slot]
    w = scope.constant(w_name)
    if w is None:
        return Reason(Code.PRODUCER_WEIGHT_NOT_CONSTANT, f"weight '{w_name}' {scope.not_constant(w_name)}")
    factor = target.factor(w, chain.s)
    problem = _quantized_problem(scope, chain, w_name, factor, w.shape)
    if problem is not None:
        return problem
    both = factor if also is None else factor * also[0](w)
    found = check_weight(w_name, w, both, target.channel_axis)
    if isinstance(found, Reason):
        return found
    bias = new_bias(scope, node, chain)
    if also is not None:
        with np.errstate(all="ignore"):
            _, bias = also[1](w.astype(np.float64) * factor, bias)
    terms = w.size // max(target.channels, 1)  # products each output adds up, at most
    problem = check_gain(w_name, found.after, w.dtype, terms, chain.summed) or check_bias(
        f"bias of {node_label(node)}", np.asarray(bias, dtype=np.float64), w.dtype, chain.summed
    )
    if problem is None and chain.identity is not None:
        with np.errstate(all="ignore"):
            final = chain.identity.add_to(w.astype(np.float64) * factor)
        problem = check_bias(f"weight '{w_name}' with the identity branch", final, w.dtype)
    return problem or (w_name, w.dtype, found)


def _quantized_problem(
    scope: Scope, chain: Chain, w_name: str, factor: np.ndarray, shape: tuple[int, ...]
) -> Reason | None:
    """Why a weight behind a DequantizeLinear cannot take the chain exactly (None: it can, or it is
    not one)."""
    found = quantized.find(scope, w_name)
    if found is None:
        return None
    if isinstance(found, Reason):
        return found
    if chain.identity is not None:
        return Reason(Code.QUANTIZED_WEIGHT_FORM, f"'{w_name}' is quantized: an identity branch cannot be added to it")
    return quantized.check(scope, w_name, factor, shape, chain.target.channel_axis)


def _bias_hazards(scope: Scope, chain: Chain, bns: str) -> list[Hazard] | Reason:
    node = scope.index.node(chain.producer)
    name = bias_input(node, chain.target)
    found = (
        quantized.check_bias(scope, name, new_bias(scope, node, chain), cast(np.ndarray, chain.s), bns)
        if name
        else None
    )
    return found if isinstance(found, Reason) else [found] if found is not None else []


def vet(scope: Scope, chain: Chain, strict: bool, notes: Notes) -> Reason | None:
    """Refuse a chain whose folded weight or bias is unsafe in its dtype; note its hazards (for a
    quantized weight, the scale's and the re-quantized bias's: its float range is the quantizer's)."""
    found = unsafe(scope, chain)
    if isinstance(found, Reason):
        return found
    w_name, dtype, ranges = found
    assert chain.s is not None
    bns = ", ".join(node_label(scope.index.node(i)) for i in chain.bns)
    hazards = scale_hazards(bns, chain.s)
    if quantized.find(scope, w_name) is None:
        return notes.verdict(hazards + weight_hazards(bns, w_name, dtype, ranges), strict)
    bias = _bias_hazards(scope, chain, bns)
    return bias if isinstance(bias, Reason) else notes.verdict(hazards + bias, strict)


def foldable_prefix(scope: Scope, chain: Chain, strict: bool, notes: Notes) -> Chain | None:
    """The longest part of a refused chain, from its producer on, that holds a BN and passes the check
    on its own (Conv -> BN -> pool -> BN whose second BN's shift the pool would sum past the dtype:
    the first BN still folds). The steps after it stay in the graph as they are. A part that ends
    with a step that stays (a pool) is the same fold as the part before it, checked more strictly."""
    prefix = chain.prefix
    while prefix is not None and prefix.bns:
        if prefix.steps[-1] not in prefix.kept and vet(scope, prefix, strict, notes) is None:
            return prefix
        prefix = prefix.prefix
    return None


def _note(p: Planning, chain: Chain) -> None:
    index = p.scope.index
    producer = index.node(chain.producer)
    for i in chain.steps:
        node = index.node(i)
        if i in chain.bns:
            passed = [index.node(k) for k in chain.kept if k < i]
            through = f" (through {', '.join(f'{n.op_type} {node_label(n)}' for n in passed)})" if passed else ""
            p.folded(i, node_label(producer) + through, chain.target.op)
        elif i not in chain.kept:
            p.notes.absorbed.append(f"{node.op_type} '{node_label(node)}'")
    if not chain.bns:
        ops = " + ".join(index.node(i).op_type for i in chain.steps if i not in chain.kept)
        p.notes.affine.append(f"{ops} -> {chain.target.op} {node_label(producer)}")


def plan_step(p: Planning) -> None:
    """Forward folds: each BN (and affine op) into the layer before it, checked; a refused chain
    keeps its longest foldable part."""
    found = plan(p.scope, p.options.affine)
    p.left.update(found.left)
    cleared = batch.clear(p.scope, found.chains)  # no reason, no hazard: the per-fold check is skipped
    for k, chain in enumerate(found.chains):
        reason = None if k in cleared else vet(p.scope, chain, p.strict, p.notes)
        if reason is None:
            p.chains.append(chain)
            continue
        prefix = foldable_prefix(p.scope, chain, p.strict, p.notes)
        if prefix is not None:
            p.chains.append(prefix)
        p.left.update((i, reason) for i in chain.bns if prefix is None or i not in prefix.bns)
    for chain in p.chains:
        _note(p, chain)
