"""The fold pipeline: decide for every BN of a model, then rewrite what folds.

Each graph (the main graph, every If/Loop/Scan body, every model-local function) goes through the
same passes: forward folds into producers, backward folds into consumers for what is left, and, when
asked, lowering of the rest to Mul+Add. Bodies are folded before the graph that holds them, so that
the outer graph sees which of its values the bodies still read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import GraphIndex, all_names, all_nodes, opset_of, subgraphs
from ..io import Source, external_location, initializers
from ..report import FoldedBN, LeftBN, ModelStats, Reason
from ..types import TypeLookup
from . import backward, forward, lower
from .common import is_batchnorm, node_label


@dataclass
class Outcome:
    folded: List[FoldedBN] = field(default_factory=list)
    left: List[LeftBN] = field(default_factory=list)
    absorbed: List[str] = field(default_factory=list)


@dataclass
class Context:
    ir_version: int
    opset: int
    source: Source
    taken: Set[str]
    types: TypeLookup
    dry_run: bool
    lower_standalone: bool
    out: Outcome = field(default_factory=Outcome)

    def index(self, graph: onnx.GraphProto, outer: Optional[GraphIndex], opset: Optional[int] = None,
              lists_initializers: Optional[bool] = None) -> GraphIndex:
        return GraphIndex(
            graph, ir_version=self.ir_version, opset=opset or self.opset, source=self.source,
            taken_names=self.taken, outer=outer, types=self.types,
            lists_initializers=(False if outer is not None else None) if lists_initializers is None else lists_initializers,
        )


def _passes(index: GraphIndex, ctx: Context) -> List[str]:
    """Run every pass over one graph; returns the names the rewrites may have left unused."""
    out, freed = ctx.out, []
    plan = forward.plan(index)
    for chain in plan.chains:
        producer = index.nodes[chain.producer]
        for i in chain.steps:
            node = index.nodes[i]
            if i in chain.bns:
                out.folded.append(FoldedBN(node_label(node), node.output[0], node_label(producer), chain.target.op))
            else:
                out.absorbed.append(f"{node.op_type} '{node_label(node)}'")
    left: Dict[int, Reason] = dict(plan.left)
    backs = backward.plan(index, left)
    for b in backs:
        bn, consumer = index.nodes[b.bn], index.nodes[b.consumer]
        out.folded.append(FoldedBN(node_label(bn), bn.output[0], node_label(consumer), consumer.op_type, "backward"))
    lowered = lower.plan(index, left) if ctx.lower_standalone else []
    for low in lowered:
        bn = index.nodes[low.bn]
        out.folded.append(FoldedBN(node_label(bn), bn.output[0], "Mul+Add", "Mul+Add", "lowered"))
    for i, reason in sorted(left.items()):
        node = index.nodes[i]
        out.left.append(LeftBN(node_label(node), node.output[0], reason.code, reason.message))
    if ctx.dry_run:
        return freed
    for chain in plan.chains:
        freed += forward.apply(index, chain)
    for b in backs:
        freed += backward.apply(index, b)
    for low in lowered:
        freed += lower.apply(index, low)
    return freed


def _fold_graph(graph: onnx.GraphProto, ctx: Context, outer: Optional[GraphIndex], opset: Optional[int] = None,
                lists_initializers: Optional[bool] = None) -> List[str]:
    """Fold one graph and its bodies; returns freed names this graph does not define (outer ones)."""
    index = ctx.index(graph, outer, opset, lists_initializers)
    freed: List[str] = []
    bodies = [g for node in graph.node for g in subgraphs(node)]
    for body in bodies:
        freed += _fold_graph(body, ctx, index, opset)
    if bodies and not ctx.dry_run:
        index = ctx.index(graph, outer, opset, lists_initializers)  # the bodies' reads have changed
    freed += _passes(index, ctx)
    if ctx.dry_run:
        return []
    index.drop_if_unused(freed)
    index.commit()
    local = set(index.producer) | set(index.initializers) | set(index.input_names)
    return [n for n in freed if n and n not in local]


def _fold_function(fn: onnx.FunctionProto, ctx: Context) -> None:
    """Functions have no initializers: fold them as a graph, then turn new constants into Constant nodes."""
    opset = next((o.version for o in fn.opset_import if o.domain in ("", "ai.onnx")), ctx.opset)
    graph = onnx.helper.make_graph(
        list(fn.node), fn.name, [onnx.helper.make_empty_tensor_value_info(n) for n in fn.input],
        [onnx.helper.make_empty_tensor_value_info(n) for n in fn.output],
    )
    # A function has its own name scope: its values get types of their own, never the main graph's.
    scoped = onnx.helper.make_model(graph, opset_imports=list(fn.opset_import) or [onnx.helper.make_opsetid("", opset)])
    model_types, ctx.types = ctx.types, TypeLookup(scoped)
    try:
        _fold_graph(graph, ctx, None, opset, lists_initializers=False)
    finally:
        ctx.types = model_types
    if ctx.dry_run:
        return
    constants = [
        onnx.helper.make_node("Constant", [], [t.name], name=t.name, value=numpy_helper.from_array(np.asarray(ctx.source(t)), t.name))
        for t in graph.initializer
    ]
    del fn.node[:]
    fn.node.extend(constants + list(graph.node))


def fold_model(model: onnx.ModelProto, source: Source, dry_run: bool = False, lower_standalone: bool = False) -> Outcome:
    """Fold ``model`` in place (unless ``dry_run``) and say what was done to each BN."""
    taken = all_names(model.graph, set())
    for fn in model.functions:
        taken.update(fn.input)
        taken.update(fn.output)
        for node in fn.node:
            taken.update(node.output)
            taken.add(node.name)
    ctx = Context(model.ir_version, opset_of(model), source, taken, TypeLookup(model), dry_run, lower_standalone)
    _fold_graph(model.graph, ctx, None)
    for fn in model.functions:
        _fold_function(fn, ctx)
    return ctx.out


def stats(model: onnx.ModelProto, nbytes: Optional[int] = None) -> ModelStats:
    """Counts of BNs, nodes and initializers (bodies and functions included), and the size in bytes:
    ``nbytes`` when the caller knows it (file sizes), else the serialized size (slow on big models)."""
    nodes = list(all_nodes(model))
    inits = list(initializers(model))
    external = sum(int(loc.get("length", 0)) for t in inits if (loc := external_location(t)) is not None)
    size = nbytes if nbytes is not None else model.ByteSize() + external
    return ModelStats(sum(map(is_batchnorm, nodes)), len(nodes), len(inits), size)
