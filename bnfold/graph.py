"""A small index over an ONNX GraphProto: producers, consumers, constants and unique names.

Nodes are referred to by their position in ``graph.node``. Rewrites go through the index so that it
stays true, and :meth:`GraphIndex.commit` writes the surviving nodes back in their original order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List, Optional, Set, Union

import numpy as np
import onnx
from onnx import numpy_helper

if TYPE_CHECKING:
    from .io import Deferred, Source
    from .types import TypeLookup

ONNX_DOMAINS = ("", "ai.onnx")
MAX_CONSTANT_DEPTH = 64  # constant subgraphs are small; deeper chains are not evaluated


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def graphs_of(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph``, then every body inside it (If/Loop/Scan, at any depth)."""
    yield graph
    for node in graph.node:
        for g in subgraphs(node):
            yield from graphs_of(g)


def model_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph with its bodies, then the bodies inside model-local functions."""
    yield from graphs_of(model.graph)
    for fn in model.functions:
        for node in fn.node:
            for g in subgraphs(node):
                yield from graphs_of(g)


def all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node of the model: graphs, bodies and functions."""
    for g in model_graphs(model):
        yield from g.node
    for fn in model.functions:
        yield from fn.node


def outer_names(graph: onnx.GraphProto) -> Set[str]:
    """Names a (sub)graph reads from enclosing scopes: used inside, defined nowhere inside."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    used: Set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for g in subgraphs(node):
            used |= outer_names(g)
        defined.update(node.output)
    used.update(o.name for o in graph.output)
    return used - defined


def all_names(graph: onnx.GraphProto, into: Set[str]) -> Set[str]:
    """Every value and node name in a graph and its subgraphs."""
    for seq in (graph.input, graph.output, graph.value_info):
        into.update(v.name for v in seq)
    into.update(t.name for t in graph.initializer)
    for node in graph.node:
        into.update(node.input)
        into.update(node.output)
        into.add(node.name)
        for g in subgraphs(node):
            all_names(g, into)
    into.discard("")
    return into


class GraphIndex:
    """Who produces and who reads each value of one graph, and which values are constants.

    A node with bodies (If/Loop/Scan) counts as a reader of every outer name its bodies use. A body's
    index has ``outer`` set: names it does not define are looked up there. Constants are initializers
    (unless a caller may override them), Constant nodes, and small subgraphs that :mod:`bnfold.constants`
    evaluates; ``types`` gives the static types and shapes some of those need.
    """

    def __init__(
        self,
        graph: onnx.GraphProto,
        *,
        ir_version: int,
        opset: int,
        source: "Source",
        taken_names: Optional[Set[str]] = None,
        outer: Optional["GraphIndex"] = None,
        types: Optional["TypeLookup"] = None,
        lists_initializers: Optional[bool] = None,
    ) -> None:
        self.graph = graph
        self.types = types
        # IR 3 main graphs list every initializer among the inputs; subgraphs never do.
        self.lists_initializers = ir_version < 4 if lists_initializers is None else lists_initializers
        self._depth = 0
        self.ir_version = ir_version
        self.opset = opset
        self.outer = outer
        self.source = source
        self.nodes: List[Optional[onnx.NodeProto]] = list(graph.node)
        self._order: List[tuple] = [(i, 0) for i in range(len(self.nodes))]  # position on commit
        self.initializers: Dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.input_names = [i.name for i in graph.input]
        self.output_names = [o.name for o in graph.output]
        self.graph_outputs = set(self.output_names)
        # IR >= 4: an initializer listed among the inputs is a default a caller may override.
        # IR 3: every initializer must be listed as an input, and that says nothing.
        self.overridable = set() if self.lists_initializers else set(self.input_names) & set(self.initializers)
        self.taken = taken_names if taken_names is not None else all_names(graph, set())
        self._constants: Dict[str, Optional[np.ndarray]] = {}
        self._dropped: Set[str] = set()
        self.producer: Dict[str, int] = {}
        self.consumers: Dict[str, List[int]] = {}
        for i, node in enumerate(self.nodes):
            self._link(i, node)

    # -- structure -----------------------------------------------------------------------------
    def _reads(self, node: onnx.NodeProto) -> Iterable[str]:
        names = [n for n in node.input if n]
        for g in subgraphs(node):
            names.extend(sorted(outer_names(g)))
        return names

    def _link(self, i: int, node: onnx.NodeProto) -> None:
        for name in self._reads(node):
            self.consumers.setdefault(name, []).append(i)
        for name in node.output:
            if name:
                self.producer[name] = i

    def _unlink(self, i: int, node: onnx.NodeProto) -> None:
        for name in self._reads(node):
            users = self.consumers.get(name, [])
            if i in users:
                users.remove(i)
        for name in node.output:
            if self.producer.get(name) == i:
                del self.producer[name]

    def node_of(self, name: str) -> Optional[onnx.NodeProto]:
        i = self.producer.get(name)
        return None if i is None else self.nodes[i]

    def readers(self, name: str) -> List[int]:
        return self.consumers.get(name, [])

    def uses(self, name: str) -> int:
        """How many node inputs and graph outputs read ``name``."""
        return len(self.readers(name)) + (name in self.graph_outputs)

    def live_nodes(self) -> Iterator[int]:
        return (i for i, n in enumerate(self.nodes) if n is not None)

    # -- constants -----------------------------------------------------------------------------
    def is_overridable(self, name: str) -> bool:
        if name in self.initializers:
            return name in self.overridable
        return self.outer is not None and name not in self.producer and self.outer.is_overridable(name)

    def constant(self, name: str) -> Optional[np.ndarray]:
        """The value of ``name`` when it cannot change between runs, else None.

        Values of file-backed and deferred initializers are not kept: each call maps (or computes)
        afresh, so that mapped pages are released once the caller is done with them."""
        tensor = self.initializers.get(name)
        if tensor is not None and tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None if name in self.overridable else self.source(tensor)
        if name not in self._constants:
            if self._depth >= MAX_CONSTANT_DEPTH:
                return None
            self._constants[name] = None  # guards against cycles in malformed graphs
            self._depth += 1
            try:
                self._constants[name] = self._evaluate(name)
            finally:
                self._depth -= 1
        return self._constants[name]

    def _evaluate(self, name: str) -> Optional[np.ndarray]:
        if name in self.initializers:
            if name in self.overridable:
                return None
            return self.source(self.initializers[name])
        node = self.node_of(name)
        if node is None:
            if self.outer is not None and name not in self.input_names:
                return self.outer.constant(name)
            return None
        if node.domain not in ONNX_DOMAINS:
            return None
        if node.op_type == "Constant":
            return constant_node_value(node)
        return self._evaluate_node(node)

    def _evaluate_node(self, node: onnx.NodeProto) -> Optional[np.ndarray]:
        from .constants import EVALUATORS, TYPE_ONLY, Operand, evaluate

        if node.op_type not in EVALUATORS:
            return None
        type_only = TYPE_ONLY.get(node.op_type, ())
        operands: List[Optional[Operand]] = []
        for slot, name in enumerate(node.input):
            value = None if not name or self.is_overridable(name) else self.constant(name)
            if value is not None:
                operands.append(Operand(value))
            elif not name:
                operands.append(None)
            elif slot in type_only and self.types is not None:
                elem = self.types.elem_type(name)
                dtype = onnx.helper.tensor_dtype_to_np_dtype(elem) if elem else None
                operands.append(Operand(None, dtype, self.types.static_shape(name)))
            else:
                return None
        return evaluate(node, operands, self.opset)

    # -- rewriting -----------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        """A name used nowhere in the model (subgraphs included)."""
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def value_thunk(self, name: str) -> Callable[[], np.ndarray]:
        """A function giving the value ``name`` has now, even after the initializer is replaced."""
        tensor = self.initializers.get(name)
        if tensor is None or tensor.data_location != onnx.TensorProto.EXTERNAL:
            value = self.constant(name)
            return lambda: value
        deferred = self.source.deferred.get(name)
        if deferred is not None and external_is_pending(tensor):
            return deferred.compute
        meta = onnx.TensorProto()
        meta.CopyFrom(tensor)  # file-backed: no bytes to copy, only where they are
        return lambda: self.source(meta)

    def _store(self, tensor: onnx.TensorProto, value: Union[np.ndarray, "Deferred"]) -> None:
        if isinstance(value, np.ndarray):
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
            self._constants[tensor.name] = value
        else:
            self.source.defer(tensor, value)
            self._constants.pop(tensor.name, None)

    def add_initializer(self, value: Union[np.ndarray, "Deferred"], base: str) -> str:
        name = self.fresh(base)
        tensor = self.graph.initializer.add()  # add() returns the stored message; append() copies
        tensor.name = name
        self._store(tensor, value)
        self.initializers[name] = tensor
        if self.lists_initializers:
            self.graph.input.append(
                onnx.helper.make_tensor_value_info(name, tensor.data_type, list(value.shape))
            )
        return name

    def replace_initializer(self, name: str, value: Union[np.ndarray, "Deferred"]) -> None:
        """New values of the same shape and dtype, in the existing TensorProto (name kept)."""
        tensor = self.initializers[name]
        self.source.inline_refs.discard(name)
        if isinstance(value, np.ndarray):
            tensor.Clear()
            tensor.name = name
        self._store(tensor, value)

    def replace_node(self, i: int, node: onnx.NodeProto) -> None:
        self._unlink(i, self.nodes[i])
        self.nodes[i] = node
        self._link(i, node)

    def remove_node(self, i: int) -> None:
        self._unlink(i, self.nodes[i])
        self.nodes[i] = None

    def insert_nodes(self, at: int, nodes: List[onnx.NodeProto]) -> None:
        """Add nodes that :meth:`commit` writes where node ``at`` stands, in the order given."""
        for k, node in enumerate(nodes, start=1):
            self.nodes.append(node)
            self._order.append((self._order[at][0], k))
            self._link(len(self.nodes) - 1, node)

    def drop_if_unused(self, names: Iterable[str]) -> None:
        """Remove initializers and constant-producing nodes that nothing reads any more."""
        pending = list(names)
        while pending:
            name = pending.pop()
            if not name or self.uses(name):
                continue
            if name in self.initializers and name not in self.overridable:
                del self.initializers[name]
                self._constants.pop(name, None)
                self._dropped.add(name)
            elif name in self.producer:
                i = self.producer[name]
                node = self.nodes[i]
                if any(self.uses(o) for o in node.output if o) or not _pure(node):
                    continue
                self.remove_node(i)
                pending.extend(node.input)

    def commit(self) -> None:
        """Write nodes, initializers and declarations back to the GraphProto."""
        graph = self.graph
        order = sorted(range(len(self.nodes)), key=self._order.__getitem__)
        kept = [self.nodes[i] for i in order if self.nodes[i] is not None]
        del graph.node[:]
        graph.node.extend(kept)
        for k in reversed(range(len(graph.initializer))):  # delete in place: extend() would copy every tensor
            if graph.initializer[k].name in self._dropped:
                del graph.initializer[k]
        # IR 3 lists every initializer as an input: those that were dropped go from the inputs too.
        for vi in [i for i in graph.input if i.name in self._dropped]:
            graph.input.remove(vi)
        self._dropped.clear()
        live = set(self.producer) | set(self.initializers) | set(self.input_names)
        for vi in [v for v in graph.value_info if v.name not in live]:
            graph.value_info.remove(vi)
        self.nodes = list(graph.node)
        self._order = [(i, 0) for i in range(len(self.nodes))]
        self.producer.clear()
        self.consumers.clear()
        for i, node in enumerate(self.nodes):
            self._link(i, node)


def external_is_pending(tensor: onnx.TensorProto) -> bool:
    from .io import PENDING

    return any(e.key == "location" and e.value == PENDING for e in tensor.external_data)


def _pure(node: onnx.NodeProto) -> bool:
    # Only nodes that compute constants are removed when orphaned; anything else stays as it was.
    return node.domain in ONNX_DOMAINS and not any(True for _ in subgraphs(node))


def constant_node_value(node: onnx.NodeProto) -> Optional[np.ndarray]:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def opset_of(model: onnx.ModelProto, domain: str = "") -> int:
    for o in model.opset_import:
        if o.domain in ((domain,) if domain else ONNX_DOMAINS):
            return o.version
    return 0
