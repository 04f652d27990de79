"""Carry out a :class:`FoldPlan`: the only place the fold mutates a model."""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import TensorStore
from ..proto import from_array, subgraphs
from ..shapes import TypeLookup
from . import backward, batch, concat, forward, lower, reparam
from .common import Scope
from .plan import Env, FoldPlan, GraphPlan, function_graph, make_scope, model_env


def _apply_graph(
    graph: onnx.GraphProto,
    plan: GraphPlan,
    env: Env,
    types: TypeLookup | None,
    outer: Scope | None,
    lists_initializers: bool,
    opset: int,
) -> list[str]:
    """Rewrite one graph and its bodies; returns freed names this graph does not define (for a body:
    names of the enclosing graphs)."""
    if len(graph.node) != plan.nodes:
        raise ValueError(f"the plan for the {plan.where} was made for another graph")

    def scope() -> Scope:
        return make_scope(graph, env, types, outer, lists_initializers=lists_initializers, opset=opset)

    planned = plan.scope
    if planned is not None and planned.index.graph is graph and not planned.index.finished and not plan.bodies:
        current = planned  # nothing was rewritten since it was planned: its index and constants hold
    else:
        current = scope()
    bodies = [g for node in graph.node for g in subgraphs(node)] if plan.bodies else []
    freed: list[str] = []
    for body, body_plan in zip(bodies, plan.bodies, strict=False):
        freed += _apply_graph(body, body_plan, env, types, current, False, opset)
    if bodies:
        current = scope()  # the bodies' reads have changed
    # A layer that takes a BN after it (forward) and one before it (backward) takes both at once.
    before = {b.consumer: b for b in plan.backward}
    prepared = batch.prepare(current, [c for c in plan.forward if c.producer not in before])
    for chain in plan.forward:
        also = before.pop(chain.producer, None)
        if also is None:
            freed += forward.apply(current, chain, prepared.pop(chain.producer, None))
        else:
            freed += backward.apply_with(current, also, chain)
    for r in plan.reparam:
        freed += reparam.apply(current, r)
    for split in plan.concat:
        freed += concat.apply(current, split, before)
    for b in plan.backward:
        if before.get(b.consumer) is b:  # not folded together with a forward fold above
            freed += backward.apply(current, b)
    for low in plan.lowered:
        freed += lower.apply(current, low)
    index = current.index
    index.drop_if_unused(freed)
    index.commit()
    if outer is None:
        return []  # no enclosing graph to free names in
    return [n for n in freed if n and not index.defines(n)]


def _apply_function(fn: onnx.FunctionProto, plan: GraphPlan, env: Env) -> None:
    """Functions have no initializers: fold them as a graph, then turn new constants into Constant nodes."""
    graph, types, opset = function_graph(fn)
    _apply_graph(graph, plan, env, types, None, False, opset or env.opset)
    constants = [
        onnx.helper.make_node(
            "Constant", [], [t.name], name=t.name, value=from_array(np.asarray(env.store.read(t)), t.name)
        )
        for t in graph.initializer
    ]
    del fn.node[:]
    fn.node.extend(constants + list(graph.node))


def apply(model: onnx.ModelProto, plan: FoldPlan, store: TensorStore) -> None:
    """Rewrite ``model`` in place as ``plan`` (made by ``plan_model`` for this model) decided."""
    env = plan.env
    if env is None or env.taken.model is not model or env.store is not store:
        env = model_env(model, store)  # a plan made for a copy, or with another store
    _apply_graph(model.graph, plan.main, env, TypeLookup(model), None, model.ir_version < 4, env.opset)
    for fn, fn_plan in zip(model.functions, plan.functions, strict=False):
        _apply_function(fn, fn_plan, env)
