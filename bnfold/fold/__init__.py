"""The fold: :func:`plan_model` decides (a value), :func:`apply` rewrites.

* :mod:`.plan`: ``plan_model(model, store) -> FoldPlan`` over every graph, body and function.
* :mod:`.forward`, :mod:`.backward`, :mod:`.lower`: one module per family of rewrites, each a pure
  ``plan`` and an ``apply``.
* :mod:`.common`: the BN check, the affine map, and the one rewrite of a layer's weight and bias.
* :mod:`.apply`: the only mutation.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from ..proto import (
    ONNX_DOMAINS,
    could_hold_subgraphs,
    external_location,
    has_graph_attribute,
    initializers,
    subgraphs,
)
from ..report import ModelStats
from .apply import apply
from .plan import FoldPlan, GraphPlan, plan_model

__all__ = ["FoldPlan", "GraphPlan", "apply", "plan_model", "stats"]


def stats(model: onnx.ModelProto, nbytes: int | None = None) -> ModelStats:
    """Counts of BNs, nodes and initializers (bodies and functions included), and the size in bytes:
    ``nbytes`` when the caller knows it (file sizes), else the serialized size (slow on big models).
    One walk over the nodes; initializers are counted, not visited, unless the size is needed."""
    bns = nodes = inits = 0

    def walk(graph_nodes: Iterable[onnx.NodeProto]) -> None:
        nonlocal bns, nodes, inits
        for node in graph_nodes:
            nodes += 1
            op, domain = node.op_type, node.domain
            if op == "BatchNormalization" and domain in ONNX_DOMAINS:
                bns += 1
            elif could_hold_subgraphs(op, domain) and has_graph_attribute(node):
                for g in subgraphs(node):
                    inits += len(g.initializer)
                    walk(g.node)

    inits += len(model.graph.initializer)
    walk(model.graph.node)
    for fn in model.functions:
        walk(fn.node)
    if nbytes is None:
        external = sum(int(loc.get("length", 0) or 0) for t in initializers(model) if (loc := external_location(t)))
        nbytes = model.ByteSize() + external
    return ModelStats(bns, nodes, inits, nbytes)
