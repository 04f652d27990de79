"""Element types and static shapes of values, from the model's declarations, with onnx shape
inference run at most once, only when a declaration is missing."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import onnx

from .proto import subgraphs

Dims = List[Optional[int]]
TypeInfo = Tuple[int, Optional[Dims]]  # (elem_type, dims or None for unknown rank)


def _collect(graph: onnx.GraphProto, into: Dict[str, TypeInfo]) -> Dict[str, TypeInfo]:
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


class TypeLookup:
    """Static element type and shape of each value of one model (or one function's scope)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.known: Optional[Dict[str, TypeInfo]] = None
        self.inferred = False

    def get(self, name: str) -> Optional[TypeInfo]:
        if self.known is None:
            self.known = _collect(self.model.graph, {})
        info = self.known.get(name)
        if (info is None or info[1] is None or not info[0]) and not self.inferred:
            self.inferred = True
            try:
                _collect(onnx.shape_inference.infer_shapes(self.model, strict_mode=False).graph, self.known)
            except Exception:  # inference is a convenience: without it a fold is only declined
                pass
            info = self.known.get(name)
        return info

    def rank(self, name: str) -> Optional[int]:
        info = self.get(name)
        return None if info is None or info[1] is None else len(info[1])

    def static_shape(self, name: str) -> Optional[Tuple[int, ...]]:
        info = self.get(name)
        if info is None or info[1] is None or any(d is None for d in info[1]):
            return None
        return tuple(d for d in info[1] if d is not None)

    def elem_type(self, name: str) -> int:
        info = self.get(name)
        return info[0] if info else 0
