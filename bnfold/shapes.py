"""Element types and static shapes of values: what onnx shape inference finds from the graph inputs,
initializers and nodes, and where it finds nothing, the model's own declarations.

Inference comes first because declarations can be stale: a graph edited after export often keeps
value_info entries of the values it had before, and onnxruntime computes with the shapes the nodes
give, not with what value_info says. A fold decided on a stale rank (a MatMul's, a lowered BN's)
would compute something else. Inference runs at most once per lookup table, at the first lookup:
a model whose folds never ask for a type (Conv+BN alone) never pays for it."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import onnx

from .proto import graphs_of, subgraphs

Dims = list[int | None]
TypeInfo = tuple[int, Dims | None]  # (elem_type, dims or None for unknown rank)


def _collect(graph: onnx.GraphProto, into: dict[str, TypeInfo]) -> dict[str, TypeInfo]:
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if not vi.type.HasField("tensor_type"):
            continue
        t = vi.type.tensor_type
        dims = None
        if t.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        old = into.get(vi.name)
        if old is None or (old[1] is None and dims is not None) or not old[0]:
            into[vi.name] = (
                t.elem_type or (old[0] if old else 0),
                dims if dims is not None else (old[1] if old else None),
            )
    for init in graph.initializer:
        into[init.name] = (init.data_type, list(init.dims))
    for node in graph.node:
        for g in subgraphs(node):
            _collect(g, into)
    return into


def _bare(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` as shape inference should see it: without value_info and the main graph's
    output shapes, the main graph's nodes in topological order, the default domain spelled "".
    Inference reads nodes in order and knows the default domain only as ""; onnxruntime runs
    unsorted graphs and reads "ai.onnx" as "" too."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    for graph in graphs_of(bare.graph):
        del graph.value_info[:]
        for node in graph.node:
            if node.domain == "ai.onnx":
                node.domain = ""
    for output in bare.graph.output:
        output.type.tensor_type.ClearField("shape")
    order = _topological(bare.graph.node)
    if order != sorted(order):
        nodes = [bare.graph.node[k] for k in order]
        del bare.graph.node[:]
        bare.graph.node.extend(nodes)
    return bare


def _inferred(model: onnx.ModelProto) -> dict[str, TypeInfo]:
    """The types onnx shape inference gives each value from the nodes alone (:func:`_bare`)."""
    try:
        return _collect(onnx.shape_inference.infer_shapes(_bare(model), strict_mode=False).graph, {})
    except Exception:  # inference is a convenience: without it, only the declarations are known
        return {}


def inconsistency(model: onnx.ModelProto) -> str | None:
    """What strict onnx shape inference finds wrong with the nodes of ``model`` (:func:`_bare`), or
    None. onnxruntime resolves a graph with the same inference functions, and some releases crash
    outright on graphs they fail (1.20 to 1.26 on a ConvTranspose whose weight has rank 1) where
    later ones refuse them."""
    try:
        onnx.shape_inference.infer_shapes(_bare(model), strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    except Exception:  # too large to serialize (2 GB), say: not a verdict on the graph
        return None
    return None


def _topological(nodes: Sequence[onnx.NodeProto]) -> list[int]:
    """Positions of ``nodes`` with every node after the producers of its inputs, otherwise in their
    order; nodes on a cycle (a malformed graph) come last, in their order."""
    producer = {name: k for k, node in enumerate(nodes) for name in node.output if name}
    waiting = [0] * len(nodes)
    users: dict[int, list[int]] = {}
    for k, node in enumerate(nodes):
        for p in {producer[name] for name in node.input if name in producer} - {k}:
            waiting[k] += 1
            users.setdefault(p, []).append(k)
    ready = [k for k, count in enumerate(waiting) if not count]
    order: list[int] = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for u in users.get(k, ()):
            waiting[u] -= 1
            if not waiting[u]:
                heapq.heappush(ready, u)
    return order + [k for k, count in enumerate(waiting) if count]


def _merge(inferred: dict[str, TypeInfo], declared: dict[str, TypeInfo]) -> dict[str, TypeInfo]:
    """Inferred types completed by declared ones; where the two contradict each other (element type,
    rank or a dimension), the value's type is unknown: no fold is decided on it."""
    known = dict(declared)
    for name, (elem, dims) in inferred.items():
        old = known.get(name)
        if old is None:
            known[name] = (elem, dims)
        elif _contradict(old, (elem, dims)):
            known[name] = (0, None)
        else:
            known[name] = (elem or old[0], dims if dims is not None else old[1])
    return known


def _contradict(a: TypeInfo, b: TypeInfo) -> bool:
    if a[0] and b[0] and a[0] != b[0]:
        return True
    if a[1] is None or b[1] is None:
        return False
    return len(a[1]) != len(b[1]) or any(
        x is not None and y is not None and x != y for x, y in zip(a[1], b[1], strict=False)
    )


class TypeLookup:
    """Static element type and shape of each value of one model (or one function's scope)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.known: dict[str, TypeInfo] | None = None

    def get(self, name: str) -> TypeInfo | None:
        if self.known is None:
            self.known = _merge(_inferred(self.model), _collect(self.model.graph, {}))
        return self.known.get(name)

    def rank(self, name: str) -> int | None:
        info = self.get(name)
        return None if info is None or info[1] is None else len(info[1])

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        info = self.get(name)
        if info is None or info[1] is None or any(d is None for d in info[1]):
            return None
        return tuple(d for d in info[1] if d is not None)

    def elem_type(self, name: str) -> int:
        info = self.get(name)
        return info[0] if info else 0
