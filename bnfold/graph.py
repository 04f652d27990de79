"""A small index over an ONNX GraphProto: producers, consumers, initializers and unique names.

Nodes are referred to by their position in ``graph.node``. Rewrites go through the index so that it
stays true, and :meth:`GraphIndex.commit` writes the surviving nodes back in their original order.
Tensor values are read and written through a :class:`TensorStore` (what holds the bytes is not this
module's business).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx

from .errors import BnfoldError
from .proto import (
    ONNX_DOMAINS,
    all_names,
    could_hold_subgraphs,
    has_graph_attribute,
    has_subgraphs,
    outer_names,
    subgraphs,
)


@dataclass(frozen=True)
class Deferred:
    """A tensor value computed when it is needed (at write time), not when it is decided."""

    shape: tuple[int, ...]
    dtype: np.dtype
    compute: Callable[[], np.ndarray]


Value = np.ndarray | Deferred


class TensorStore(Protocol):
    """Where initializer values come from and go to."""

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The tensor's value now."""

    def write(self, tensor: onnx.TensorProto, value: Value) -> None:
        """Give ``tensor`` (name kept) a new value."""

    def snapshot(self, tensor: onnx.TensorProto) -> Callable[[], np.ndarray]:
        """A function giving the value the tensor has now, even after it is written again."""


class Names(Protocol):
    """The names a new name must differ from."""

    def __contains__(self, name: object) -> bool: ...

    def add(self, name: str) -> None: ...


class GraphIndex:
    """Who produces and who reads each value of one graph.

    A node with bodies (If/Loop/Scan) counts as a reader of every outer name its bodies use. A body's
    index has ``outer`` set: names it does not define are looked up there.
    """

    def __init__(
        self,
        graph: onnx.GraphProto,
        *,
        store: TensorStore,
        lists_initializers: bool = False,
        taken_names: Names | None = None,
        outer: GraphIndex | None = None,
    ) -> None:
        self.graph = graph
        self.store = store
        # IR 3 main graphs list every initializer among the inputs; subgraphs never do.
        self.lists_initializers = lists_initializers
        self.outer = outer
        self._field: list[onnx.NodeProto] = graph.node[:]  # the entries as read: commit moves them
        self.nodes: list[onnx.NodeProto | None] = list(self._field)
        self._order: list[tuple[int, int]] = [(i, 0) for i in range(len(self.nodes))]  # position on commit
        tensors = graph.initializer[:]
        # The initializers' names in the field's order (commit filters the field by them, without
        # reading each name from protobuf again), and by name.
        self._initializer_names = [t.name for t in tensors]
        self.initializers: dict[str, onnx.TensorProto] = dict(zip(self._initializer_names, tensors, strict=False))
        if len(self.initializers) < len(tensors):
            twice = next(name for name, count in Counter(self._initializer_names).items() if count > 1)
            raise BnfoldError(
                f"tensor '{twice}': defined twice among the initializers of one graph "
                "(which of the two values a runtime uses is not defined)"
            )
        self._value_info_names: list[str] | None = None  # read by names(), kept for commit
        self.input_names = [i.name for i in graph.input]
        self.output_names = [o.name for o in graph.output]
        self.graph_outputs = set(self.output_names)
        # IR >= 4: an initializer listed among the inputs is a default a caller may override.
        # IR 3: every initializer must be listed as an input, and that says nothing.
        self.overridable = set() if lists_initializers else set(self.input_names) & set(self.initializers)
        self.taken: Names = taken_names if taken_names is not None else all_names(graph, set())
        self._dropped: set[str] = set()
        self.finished = False  # set by commit: the index no longer describes the graph
        self.holds_bodies = False  # a node of this graph has subgraphs (If/Loop/Scan)
        self.revision: dict[str, int] = {}  # bumped when an initializer gets new values
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        # Per node, as linked: its op type, and the names it reads and writes (read once from protobuf).
        self.ops: list[str] = [""] * len(self.nodes)
        self._links: list[tuple[tuple[str, ...], tuple[str, ...]]] = [((), ())] * len(self.nodes)
        for i, node in enumerate(self.nodes):
            self._link(i, node)  # type: ignore[arg-type]  # every node is there before any removal

    # -- structure -----------------------------------------------------------------------------
    @staticmethod
    def _reads(node: onnx.NodeProto) -> list[str]:
        names = [n for n in node.input if n]
        if has_subgraphs(node):
            for g in subgraphs(node):
                names.extend(sorted(outer_names(g)))
        return names

    def _link(self, i: int, node: onnx.NodeProto) -> None:
        """Record what node ``i`` reads and writes. Called for every node of a graph: its names are
        read from protobuf once, by slices (half the cost of iterating the fields)."""
        op = node.op_type
        if could_hold_subgraphs(op, node.domain) and has_graph_attribute(node):
            self.holds_bodies = True
            reads = tuple(self._reads(node))
        else:
            reads = tuple(node.input[:])
            if "" in reads:
                reads = tuple([name for name in reads if name])
        outputs = tuple(node.output[:])
        self.ops[i] = op
        self._links[i] = (reads, outputs)
        consumers, producer = self.consumers, self.producer
        for name in reads:
            users = consumers.get(name)
            if users is None:
                consumers[name] = [i]
            else:
                users.append(i)
        for name in outputs:
            if name:
                producer[name] = i

    def _unlink(self, i: int) -> None:
        reads, outputs = self._links[i]
        consumers, producer = self.consumers, self.producer
        for name in reads:
            users = consumers.get(name)
            if users:
                try:
                    users.remove(i)
                except ValueError:  # not linked as a reader of it
                    pass
        for name in outputs:
            if producer.get(name) == i:
                del producer[name]
        self._links[i] = ((), ())

    def reads(self, i: int) -> tuple[str, ...]:
        """The names node ``i`` reads (inputs that are not empty; for a node with bodies, also the
        outer names they use), as it was linked."""
        return self._links[i][0]

    def node(self, i: int) -> onnx.NodeProto:
        node = self.nodes[i]
        if node is None:
            raise KeyError(f"node {i} was removed")
        return node

    def node_of(self, name: str) -> onnx.NodeProto | None:
        i = self.producer.get(name)
        return None if i is None else self.nodes[i]

    def readers(self, name: str) -> list[int]:
        return self.consumers.get(name, [])

    def uses(self, name: str) -> int:
        """How many node inputs and graph outputs read ``name``."""
        return len(self.readers(name)) + (name in self.graph_outputs)

    def live_nodes(self) -> Iterator[int]:
        return (i for i, n in enumerate(self.nodes) if n is not None)

    def defines(self, name: str) -> bool:
        return name in self.producer or name in self.initializers or name in self.input_names

    def visible(self, name: str) -> bool:
        """Whether ``name`` is defined in this graph or an enclosing one."""
        return self.defines(name) or (self.outer is not None and self.outer.visible(name))

    def check_structure(self, where: str) -> None:
        """Refuse (BnfoldError) a graph that is not one, as onnx's checker and onnxruntime do: a value
        defined twice (a graph input listed twice; a node output that is also a graph input, an
        initializer, another node's output, or a value of an enclosing graph), a node input or graph
        output defined nowhere, or a cycle. An initializer also listed as an input is one value (IR 3
        lists them all; from IR 4 it is an overridable default), and a body's inputs and initializers
        may reuse an enclosing graph's names (they hide them inside the body), as onnx's scoping says.
        Acyclic graphs whose nodes are out of order are accepted as they are."""
        if len(set(self.input_names)) < len(self.input_names):
            twice = next(n for n, count in Counter(self.input_names).items() if count > 1)
            raise BnfoldError(f"{where}: value '{twice}' is listed twice among the graph inputs")
        defined = set(self.input_names) | set(self.initializers)
        defined.update(t.values.name for t in self.graph.sparse_initializer)
        outer, producer, in_order = self.outer, self.producer, True
        for reads, outputs in self._links:  # one pass: sets only, no protobuf reads
            if not defined.issuperset(reads):
                for name in reads:
                    if name in defined or (outer is not None and outer.visible(name)):
                        continue
                    if name not in producer:
                        raise BnfoldError(f"{where}: value '{name}' is read by a node but defined nowhere")
                    in_order = False  # written by a node further on
            if "" in outputs:
                outputs = tuple(o for o in outputs if o)
            if (
                outer is not None
                or not defined.isdisjoint(outputs)
                or (len(outputs) > 1 and len(set(outputs)) < len(outputs))
            ):
                seen = set()
                for name in outputs:
                    if name in defined or name in seen or (outer is not None and outer.visible(name)):
                        raise BnfoldError(f"{where}: value '{name}' is defined twice ({self._definitions(name)})")
                    seen.add(name)
            defined.update(outputs)
        missing = [o for o in self.output_names if o not in defined and not (outer is not None and outer.visible(o))]
        if missing:
            raise BnfoldError(f"{where}: graph output '{missing[0]}' is defined nowhere")
        if not in_order:
            cycle = self._cycle()
            if cycle:
                raise BnfoldError(f"{where}: the nodes form a cycle ({' -> '.join(cycle)})")

    def _definitions(self, name: str) -> str:
        """What defines ``name`` in this graph and the graphs around it, in words."""
        found = []
        if name in self.input_names or name in self.initializers:
            found.append("a graph input" if name in self.input_names else "an initializer")
        writers = [n for n, (_, outputs) in zip(self.nodes, self._links, strict=False) if name in outputs]
        found += [f"output of {n.op_type} '{n.name}'" for n in writers if n is not None]
        if self.outer is not None and self.outer.visible(name):
            found.append("a value of the enclosing graph")
        return ", ".join(found)

    def _cycle(self) -> list[str]:
        """The values along one cycle of the graph's nodes (empty when there is none)."""
        producer = self.producer
        waiting = [0] * len(self._links)
        users: dict[int, list[int]] = {}
        for k, (reads, _) in enumerate(self._links):
            for p in {producer[n] for n in reads if n in producer}:
                waiting[k] += 1
                users.setdefault(p, []).append(k)
        ready = [k for k, count in enumerate(waiting) if not count]
        while ready:
            for u in users.get(ready.pop(), ()):
                waiting[u] -= 1
                if not waiting[u]:
                    ready.append(u)
        stuck = {k for k, count in enumerate(waiting) if count}
        if not stuck:
            return []
        # Walk back from a stuck node along stuck producers until a node repeats: that is a cycle.
        path: list[int] = []
        seen: dict[int, int] = {}
        k = min(stuck)
        while k not in seen:
            seen[k] = len(path)
            path.append(k)
            k = next(producer[n] for n in self._links[k][0] if producer.get(n) in stuck)
        loop = path[seen[k] :]  # each node reads a value of the node after it (the last, of the first)
        values = [
            next(n for n in self._links[a][0] if producer.get(n) == b)
            for a, b in zip(loop, loop[1:] + loop[:1], strict=False)
        ]
        values.reverse()  # in the direction the values flow
        return values + values[:1]

    def is_overridable(self, name: str) -> bool:
        """Whether a caller may feed another value for ``name`` (an IR >= 4 initializer-input)."""
        if name in self.initializers:
            return name in self.overridable
        return self.outer is not None and not self.defines(name) and self.outer.is_overridable(name)

    def names(self) -> set[str]:
        """Every value and node name of the graph, as :func:`.proto.all_names` collects them, from
        the index (valid while nothing was rewritten, and only for a graph without bodies)."""
        if self.holds_bodies:
            raise ValueError("a graph with bodies: use proto.all_names")
        names = set(self.producer)
        for more in (self.consumers, self.initializers, self.input_names, self.output_names):
            names.update(more)
        self._value_info_names = [v.name for v in self.graph.value_info]
        names.update(self._value_info_names)
        names.update([n.name for n in self.nodes if n is not None])
        names.discard("")
        return names

    # -- rewriting -----------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        """A name used nowhere in the model (subgraphs included)."""
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def snapshot(self, name: str) -> Callable[[], np.ndarray] | None:
        """For an initializer: a function giving the value it has now, even after it is replaced."""
        tensor = self.initializers.get(name)
        return None if tensor is None else self.store.snapshot(tensor)

    def add_initializer(self, value: Value, base: str) -> str:
        name = self.fresh(base)
        tensor = self.graph.initializer.add()  # add() returns the stored message; append() copies
        tensor.name = name
        self.store.write(tensor, value)
        self.initializers[name] = tensor
        self._initializer_names.append(name)
        if self.lists_initializers:
            self.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(value.shape)))
        return name

    def replace_initializer(self, name: str, value: Value) -> None:
        """New values of the same shape and dtype, in the existing TensorProto (name kept)."""
        self.store.write(self.initializers[name], value)
        self.revision[name] = self.revision.get(name, 0) + 1

    def replace_node(self, i: int, node: onnx.NodeProto) -> None:
        self.node(i)  # KeyError for a node already removed
        self._unlink(i)
        self.nodes[i] = node
        self._link(i, node)

    def remove_node(self, i: int) -> None:
        self.node(i)  # KeyError for a node already removed
        self._unlink(i)
        self.nodes[i] = None
        self.ops[i] = ""

    def insert_nodes(self, at: int, nodes: list[onnx.NodeProto]) -> None:
        """Add nodes that :meth:`commit` writes where node ``at`` stands, in the order given."""
        for k, node in enumerate(nodes, start=1):
            self.nodes.append(node)
            self.ops.append("")
            self._links.append(((), ()))
            self._order.append((self._order[at][0], k))
            self._link(len(self.nodes) - 1, node)

    def drop_if_unused(self, names: Iterable[str]) -> None:
        """Remove initializers and constant-producing nodes that nothing reads any more."""
        pending = list(names)
        consumers, outputs = self.consumers, self.graph_outputs
        while pending:
            name = pending.pop()
            if not name or consumers.get(name) or name in outputs:  # self.uses(name), inlined
                continue
            if name in self.initializers and name not in self.overridable:
                del self.initializers[name]
                self._dropped.add(name)
            elif name in self.producer:
                i = self.producer[name]
                node = self.node(i)
                if any(self.uses(o) for o in node.output if o) or not _pure(node):
                    continue
                self.remove_node(i)
                pending.extend(node.input)

    def commit(self) -> None:
        """Write nodes, initializers and declarations back to the GraphProto, in linear time. The
        index is finished then: a graph rewritten again needs an index of its own."""
        graph = self.graph
        nodes, field = self.nodes, self._field
        if len(nodes) == len(field) == len(graph.node):  # nothing inserted: same positions, same order
            for node, entry in zip(nodes, field, strict=False):
                if node is not None and node is not entry:
                    entry.CopyFrom(node)  # a node replaced by a new message
            _keep_only(graph.node, [node is None for node in nodes])
        else:
            order = sorted(range(len(nodes)), key=self._order.__getitem__)
            kept = [n for n in (nodes[i] for i in order) if n is not None]
            del graph.node[:]
            graph.node.extend(kept)
        dropped = self._dropped
        if dropped:
            names = _names(graph.initializer, self._initializer_names)
            _keep_only(graph.initializer, [name in dropped for name in names])
            # IR 3 lists every initializer as an input: those that were dropped go from the inputs too.
            _keep_only(graph.input, [name in dropped for name in _names(graph.input, None)])
        self._dropped = set()
        producer, initializers, inputs = self.producer, self.initializers, set(self.input_names)
        names = _names(graph.value_info, self._value_info_names)
        _keep_only(
            graph.value_info,
            [name not in producer and name not in initializers and name not in inputs for name in names],
        )
        self.nodes = []
        self._field = []
        self.ops = []
        self._links = []
        self.producer.clear()
        self.consumers.clear()
        self.finished = True


def _names(field: Any, known: list[str] | None) -> list[str]:
    """The names of a repeated field's entries, in order: ``known`` when it still matches the field
    (reading each name from protobuf costs about a microsecond)."""
    return known if known is not None and len(known) == len(field) else [item.name for item in field]


def _keep_only(field: Any, gone: list[bool]) -> None:
    """Delete the entries of a repeated message field whose flag in ``gone`` is set, in linear time,
    the others keeping their order.

    Deleting one entry moves every entry after it, so many deletions are quadratic (a 100k-node
    graph with value_info took minutes), and rebuilding the field copies every entry kept. A stable
    sort on the flags moves the entries themselves (protobuf sorts a list of them and puts them
    back), and the gone ones, now last, are cut off in one deletion."""
    count = sum(gone)
    if not count:
        return
    # list.sort computes the keys once each, in the list's order: the n-th call is for entry n
    # (next(flags, entry) returns the next flag; the default is never used).
    field.sort(key=functools.partial(next, iter(gone)))
    del field[len(field) - count :]


def _pure(node: onnx.NodeProto) -> bool:
    # Only nodes that compute constants are removed when orphaned; anything else stays as it was.
    return node.domain in ONNX_DOMAINS and not any(True for _ in subgraphs(node))
