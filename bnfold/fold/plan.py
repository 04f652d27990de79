"""Decide, for every BN of a model, what happens to it: ``plan_model(model) -> FoldPlan``.

Nothing here mutates the model. Each graph (the main graph, every If/Loop/Scan body, every
model-local function) is planned the same way: forward folds into producers, backward folds into
consumers for what is left, and, when asked, lowering of the rest to Mul+Add. ``inspect``,
``--dry-run`` and the fold report are renderings of the plan; :func:`bnfold.fold.apply.apply`
carries it out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..constants import Constants
from ..graph import GraphIndex, TensorStore
from ..options import FoldOptions
from ..proto import ONNX_DOMAINS, model_names, node_label, opset_of, subgraphs
from ..report import Code, FoldedBN, LeftBN, Reason
from ..shapes import TypeLookup
from . import backward, batch, concat, forward, lower, reparam
from .common import Scope
from .safety import Hazard, WeightRanges, check_bias, check_gain, check_weight, scale_hazards, weight_hazards


@dataclass(frozen=True)
class GraphPlan:
    """The decisions for one graph; node positions refer to ``graph.node`` as it was planned."""

    where: str
    nodes: int  # len(graph.node) when planned: apply checks it is given the same graph
    forward: tuple[forward.Chain, ...]
    backward: tuple[backward.Backward, ...]
    lowered: tuple[lower.Lowering, ...]
    concat: tuple[concat.ConcatFold, ...]
    left: tuple[tuple[int, Reason], ...]
    reparam: tuple[reparam.Reparam, ...]
    bodies: tuple[GraphPlan, ...]  # in the order proto.subgraphs yields them over graph.node
    # The scope it was planned in: apply rewrites through the same index and constants (built once).
    scope: Scope | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class FoldPlan:
    """Every decision for a model, and what the report says of each BN."""

    main: GraphPlan
    functions: tuple[GraphPlan, ...]
    folded: tuple[FoldedBN, ...]
    left: tuple[LeftBN, ...]
    absorbed: tuple[str, ...]
    warnings: tuple[Hazard, ...] = ()
    affine: tuple[str, ...] = ()
    env: Env | None = field(default=None, compare=False, repr=False)  # what it was planned with


class ModelNames:
    """Every name of a model, collected when a new name is first needed (planning needs none)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._model = model
        self._names: set[str] | None = None

    @property
    def model(self) -> onnx.ModelProto:
        return self._model

    def _all(self) -> set[str]:
        if self._names is None:
            self._names = model_names(self._model)
        return self._names

    def seed(self, index: GraphIndex) -> None:
        """Collect the names from the main graph's fresh index when it holds the whole model (no
        bodies, no functions): the same set as a walk over the model, from what the index read."""
        if self._names is None and index.graph is self._model.graph and not index.holds_bodies:
            if not self._model.functions:
                self._names = index.names()

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def add(self, name: str) -> None:
        self._all().add(name)


@dataclass(frozen=True)
class Env:
    """What every graph of one model is planned and applied with."""

    store: TensorStore
    opset: int
    taken: ModelNames
    options: FoldOptions = field(default_factory=FoldOptions)

    @property
    def strict(self) -> bool:
        return self.options.strict

    @property
    def affine(self) -> bool:
        return self.options.affine

    @property
    def reparameterize(self) -> bool:
        return self.options.reparameterize

    @property
    def lower_standalone(self) -> bool:
        return self.options.lower_standalone


def make_scope(
    graph: onnx.GraphProto,
    env: Env,
    types: TypeLookup | None,
    outer: Scope | None,
    *,
    lists_initializers: bool,
    opset: int | None = None,
    where: str | None = None,
) -> Scope:
    """The index and constants of ``graph``; with ``where`` (when planning), the graph is first
    checked to be one (:meth:`GraphIndex.check_structure`), ``where`` naming it in the error."""
    index = GraphIndex(
        graph,
        store=env.store,
        lists_initializers=lists_initializers,
        taken_names=env.taken,
        outer=outer.index if outer else None,
    )
    if where is not None:
        index.check_structure(where)
    opset = opset or env.opset
    consts = Constants(index, opset=opset, types=types, outer=outer.consts if outer else None)
    return Scope(index, consts, types, opset)


class _Notes:
    """The report's lists, filled in graph order (bodies before the graph that holds them)."""

    def __init__(self) -> None:
        self.folded: list[FoldedBN] = []
        self.left: list[LeftBN] = []
        self.absorbed: list[str] = []
        self.affine: list[str] = []  # chains without a BN: affine ops folded on their own
        self.warnings: list[Hazard] = []


def _verdict(hazards: list[Hazard], strict: bool, notes: _Notes) -> Reason | None:
    """Hazards are warnings, or with --strict the reason the BN stays."""
    if strict and hazards:
        h = hazards[0]
        return Reason(Code(h.code), f"{h.tensor + ': ' if h.tensor else ''}{h.message}")
    notes.warnings.extend(hazards)
    return None


def _unsafe_forward(
    scope: Scope, chain: forward.Chain, before: backward.Backward | None = None
) -> Reason | tuple[str, np.dtype, WeightRanges]:
    """Why the chain's folded weight or bias (with ``before``, the backward fold the same layer also
    takes) would be unsafe in its dtype, or what the weight's check found: (its name, dtype, ranges)."""
    assert chain.s is not None
    target, node = chain.target, scope.index.node(chain.producer)
    w_name = node.input[target.weight_slot]
    w = scope.constant(w_name)
    if w is None:
        return Reason(Code.PRODUCER_WEIGHT_NOT_CONSTANT, f"weight '{w_name}' {scope.not_constant(w_name)}")
    factor = target.factor(w, chain.s)
    both = factor if before is None else factor * before.how.factor(w, before.affine.s)
    found = check_weight(w_name, w, both, target.channel_axis)
    if isinstance(found, Reason):
        return found
    bias = forward.new_bias(scope, node, chain)
    if before is not None:
        with np.errstate(all="ignore"):
            _, bias = backward.input_map(before)(w.astype(np.float64) * factor, bias)
    terms = w.size // max(target.channels, 1)  # products each output adds up, at most
    problem = check_gain(w_name, found.after, w.dtype, terms, chain.summed) or check_bias(
        f"bias of {node_label(node)}", np.asarray(bias, dtype=np.float64), w.dtype, chain.summed
    )
    if problem is None and chain.identity is not None:
        with np.errstate(all="ignore"):
            final = chain.identity.add_to(w.astype(np.float64) * factor)
        problem = check_bias(f"weight '{w_name}' with the identity branch", final, w.dtype)
    return problem or (w_name, w.dtype, found)


def _vet_forward(scope: Scope, chain: forward.Chain, strict: bool, notes: _Notes) -> Reason | None:
    """Refuse a chain whose folded weight or bias is unsafe in its dtype; note its hazards."""
    found = _unsafe_forward(scope, chain)
    if isinstance(found, Reason):
        return found
    w_name, dtype, ranges = found
    assert chain.s is not None
    bns = ", ".join(node_label(scope.index.node(i)) for i in chain.bns)
    return _verdict(scale_hazards(bns, chain.s) + weight_hazards(bns, w_name, dtype, ranges), strict, notes)


def _foldable_prefix(scope: Scope, chain: forward.Chain, strict: bool, notes: _Notes) -> forward.Chain | None:
    """The longest part of a refused chain, from its producer on, that holds a BN and passes the check
    on its own (Conv -> BN -> pool -> BN whose second BN's shift the pool would sum past the dtype:
    the first BN still folds). The steps after it stay in the graph as they are. A part that ends
    with a step that stays (a pool) is the same fold as the part before it, checked more strictly."""
    prefix = chain.prefix
    while prefix is not None and prefix.bns:
        if prefix.steps[-1] not in prefix.kept and _vet_forward(scope, prefix, strict, notes) is None:
            return prefix
        prefix = prefix.prefix
    return None


def _vet_backward(scope: Scope, b: backward.Backward, strict: bool, notes: _Notes) -> Reason | None:
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
    return _verdict(scale_hazards(bn, b.affine.s) + weight_hazards(bn, w_name, w.dtype, found), strict, notes)


def _vet_both(scope: Scope, chain: forward.Chain, b: backward.Backward) -> Reason | None:
    """Refuse a backward fold into a layer that also takes ``chain`` forward when the weight or bias
    carrying both would be unsafe in its dtype (each fold alone was checked on the layer's weight)."""
    problem = _unsafe_forward(scope, chain, b)
    if not isinstance(problem, Reason):
        return None
    bns = ", ".join(node_label(scope.index.node(i)) for i in chain.bns) or "the BN after it"
    layer = node_label(scope.index.node(chain.producer))
    return Reason(problem.code, f"{problem.message} (with {bns} folded into {layer} too)")


def _plan_graph(scope: Scope, env: Env, types: TypeLookup | None, where: str, notes: _Notes) -> GraphPlan:
    index = scope.index
    bodies = []
    for i in index.live_nodes() if index.holds_bodies else ():
        node = index.node(i)
        for k, body in enumerate(subgraphs(node)):
            label = f"{where} > {node.op_type} '{node_label(node)}' body {k}"
            inner = make_scope(body, env, types, scope, lists_initializers=False, opset=scope.opset, where=label)
            bodies.append(_plan_graph(inner, env, types, label, notes))
    fwd = forward.plan(scope, env.affine)
    chains, refused = [], dict(fwd.left)
    cleared = batch.clear(scope, fwd.chains)  # no reason, no hazard: the per-fold check is skipped
    for k, chain in enumerate(fwd.chains):
        reason = None if k in cleared else _vet_forward(scope, chain, env.strict, notes)
        if reason is None:
            chains.append(chain)
            continue
        prefix = _foldable_prefix(scope, chain, env.strict, notes)
        if prefix is not None:
            chains.append(prefix)
        refused.update((i, reason) for i in chain.bns if prefix is None or i not in prefix.bns)
    fwd = forward.Plan(tuple(chains), refused)
    for chain in fwd.chains:
        producer = index.node(chain.producer)
        for i in chain.steps:
            node = index.node(i)
            if i in chain.bns:
                passed = [index.node(k) for k in chain.kept if k < i]
                through = f" (through {', '.join(f'{n.op_type} {node_label(n)}' for n in passed)})" if passed else ""
                notes.folded.append(
                    FoldedBN(node_label(node), node.output[0], node_label(producer) + through, chain.target.op)
                )
            elif i not in chain.kept:
                notes.absorbed.append(f"{node.op_type} '{node_label(node)}'")
        if not chain.bns:
            ops = " + ".join(index.node(i).op_type for i in chain.steps if i not in chain.kept)
            notes.affine.append(f"{ops} -> {chain.target.op} {node_label(producer)}")
    splits, after_split = concat.plan(scope, fwd.left)
    kept_splits = []
    for c in splits:
        reason = next((r for ch in c.branches if (r := _vet_forward(scope, ch, env.strict, notes)) is not None), None)
        if reason is not None:
            after_split[c.bn] = reason
            continue
        kept_splits.append(c)
        bn, node = index.node(c.bn), index.node(c.concat)
        into = f"{node_label(node)} ({', '.join(node_label(index.node(ch.producer)) for ch in c.branches)})"
        notes.folded.append(FoldedBN(node_label(bn), bn.output[0], into, "Concat", "split"))
    backs, left = backward.plan(scope, after_split)
    forward_into = {c.producer: c for c in fwd.chains} | {ch.producer: ch for c in kept_splits for ch in c.branches}
    kept = []
    for b in backs:
        both = forward_into.get(b.consumer)
        reason = None if both is None else _vet_both(scope, both, b)
        reason = reason or _vet_backward(scope, b, env.strict, notes)
        if reason is None:
            kept.append(b)
        else:
            left[b.bn] = reason
    backs = kept
    for b in backs:
        bn, consumer = index.node(b.bn), index.node(b.consumer)
        notes.folded.append(FoldedBN(node_label(bn), bn.output[0], node_label(consumer), consumer.op_type, "backward"))
    reparams: list[reparam.Reparam] = []
    if env.reparameterize:
        taken = {b.consumer for b in backs} | {ch.producer for c in kept_splits for ch in c.branches}
        found, left = reparam.plan(scope, left, list(fwd.chains), taken)
        final = {c.producer: c for c in fwd.chains}
        for rp in found:
            reason = _vet_forward(scope, rp.chain, env.strict, _Notes())
            if reason is not None:
                left[rp.bn] = reason
                continue
            final[rp.conv] = rp.chain
            reparams.append(rp)
            bn, conv = index.node(rp.bn), index.node(rp.conv)
            notes.folded.append(FoldedBN(node_label(bn), bn.output[0], node_label(conv), "Conv", "identity"))
        fwd = forward.Plan(tuple(sorted(final.values(), key=lambda c: c.producer)), fwd.left)
    lowered: list[lower.Lowering] = []
    if env.lower_standalone:
        lowered, left = lower.plan(scope, left)
    for low in lowered:
        bn = index.node(low.bn)
        notes.folded.append(FoldedBN(node_label(bn), bn.output[0], "Mul+Add", "Mul+Add", "lowered"))
    for i, reason in sorted(left.items()):
        node = index.node(i)
        output = node.output[0] if node.output else ""
        notes.left.append(LeftBN(node_label(node), output, reason.code.value, reason.message))
    return GraphPlan(
        where,
        len(index.nodes),
        fwd.chains,
        tuple(backs),
        tuple(lowered),
        tuple(kept_splits),
        tuple(sorted(left.items())),
        tuple(reparams),
        tuple(bodies),
        scope,
    )


def function_graph(fn: onnx.FunctionProto) -> tuple[onnx.GraphProto, TypeLookup, int]:
    """A model-local function as a graph of its own (a copy), with a type lookup of its own scope: a
    function value never borrows the type of a main-graph value of the same name."""
    opset = next((o.version for o in fn.opset_import if o.domain in ONNX_DOMAINS), 0)
    graph = onnx.helper.make_graph(
        list(fn.node),
        fn.name,
        [onnx.helper.make_empty_tensor_value_info(n) for n in fn.input],
        [onnx.helper.make_empty_tensor_value_info(n) for n in fn.output],
    )
    imports = list(fn.opset_import) or [onnx.helper.make_opsetid("", opset)]
    return graph, TypeLookup(onnx.helper.make_model(graph, opset_imports=imports)), opset


def model_env(model: onnx.ModelProto, store: TensorStore, options: FoldOptions | None = None) -> Env:
    return Env(store, opset_of(model), ModelNames(model), options or FoldOptions())


def plan_model(model: onnx.ModelProto, store: TensorStore, options: FoldOptions | None = None) -> FoldPlan:
    """Every decision for ``model``, which is not modified, with ``options`` (:class:`FoldOptions`:
    ``strict`` refuses folds with hazards, ``affine`` folds per-channel Mul/Add/Sub/Div chains that
    hold no BN, ``reparameterize`` folds the identity-branch BN of RepVGG-style blocks into a sibling
    Conv, ``lower_standalone`` turns the BNs left into Mul+Add; the others are not the plan's)."""
    env = model_env(model, store, options)
    notes = _Notes()
    types = TypeLookup(model)
    main_scope = make_scope(model.graph, env, types, None, lists_initializers=model.ir_version < 4, where="main graph")
    env.taken.seed(main_scope.index)
    main = _plan_graph(main_scope, env, types, "main graph", notes)
    functions = []
    for fn in model.functions:
        graph, fn_types, opset = function_graph(fn)
        where = f"function '{fn.name}'"
        scope = make_scope(graph, env, fn_types, None, lists_initializers=False, opset=opset or env.opset, where=where)
        functions.append(_plan_graph(scope, env, fn_types, where, notes))
    return FoldPlan(
        main,
        tuple(functions),
        tuple(notes.folded),
        tuple(notes.left),
        tuple(notes.absorbed),
        tuple(notes.warnings),
        tuple(notes.affine),
        env,
    )
