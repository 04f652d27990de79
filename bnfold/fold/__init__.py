"""The fold pipeline: decide for every BN of a model, then rewrite what folds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import onnx

from ..graph import GraphIndex, all_names, opset_of, subgraphs
from ..io import external_location
from ..report import FoldedBN, LeftBN, ModelStats
from . import forward
from .common import is_batchnorm, node_label


@dataclass
class Outcome:
    folded: List[FoldedBN] = field(default_factory=list)
    left: List[LeftBN] = field(default_factory=list)
    absorbed: List[str] = field(default_factory=list)


class RankLookup:
    """Rank of a value from the model's declarations, running onnx shape inference once if needed."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.ranks: Optional[Dict[str, int]] = None
        self.inferred = False

    def __call__(self, name: str) -> Optional[int]:
        if self.ranks is None:
            self.ranks = _declared_ranks(self.model.graph, {})
        if name not in self.ranks and not self.inferred:
            self.inferred = True
            try:
                inferred = onnx.shape_inference.infer_shapes(self.model, strict_mode=False)
                _declared_ranks(inferred.graph, self.ranks)
            except Exception:  # inference is a convenience; without it the fold is only declined
                pass
        return self.ranks.get(name)


def _declared_ranks(graph: onnx.GraphProto, into: Dict[str, int]) -> Dict[str, int]:
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.HasField("shape"):
            into[vi.name] = len(t.shape.dim)
    for init in graph.initializer:
        into[init.name] = len(init.dims)
    for node in graph.node:
        for g in subgraphs(node):
            _declared_ranks(g, into)
    return into


def fold_graph(index: GraphIndex, rank_of: Callable[[str], Optional[int]], dry_run: bool) -> Outcome:
    plan = forward.plan(index, rank_of)
    out = Outcome()
    for chain in plan.chains:
        producer = index.nodes[chain.producer]
        for i in chain.steps:
            node = index.nodes[i]
            if i in chain.bns:
                out.folded.append(FoldedBN(node_label(node), node.output[0], node_label(producer), chain.target.op))
            else:
                out.absorbed.append(f"{node.op_type} '{node_label(node)}'")
    for i, reason in sorted(plan.left.items()):
        node = index.nodes[i]
        out.left.append(LeftBN(node_label(node), node.output[0], reason.code, reason.message))
    if not dry_run:
        for chain in plan.chains:
            index.drop_if_unused(forward.apply(index, chain))
        index.commit()
    return out


def fold_model(model: onnx.ModelProto, load_tensor: Callable[[onnx.TensorProto], np.ndarray], dry_run: bool = False) -> Outcome:
    """Fold ``model`` in place (unless ``dry_run``) and say what was done to each BN."""
    index = GraphIndex(
        model.graph,
        ir_version=model.ir_version,
        opset=opset_of(model),
        load_tensor=load_tensor,
        taken_names=all_names(model.graph, set()),
    )
    return fold_graph(index, RankLookup(model), dry_run)


def stats(model: onnx.ModelProto) -> ModelStats:
    counts = {"bn": 0, "nodes": 0, "inits": 0, "external": 0}

    def walk(graph: onnx.GraphProto) -> None:
        counts["inits"] += len(graph.initializer)
        for t in graph.initializer:
            loc = external_location(t)
            if loc is not None:
                counts["external"] += int(loc.get("length", 0))
        for node in graph.node:
            counts["nodes"] += 1
            counts["bn"] += is_batchnorm(node)
            for g in subgraphs(node):
                walk(g)

    walk(model.graph)
    return ModelStats(counts["bn"], counts["nodes"], counts["inits"], model.ByteSize() + counts["external"])
