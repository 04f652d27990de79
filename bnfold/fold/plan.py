"""Decide, for every BN of a model, what happens to it: ``plan_model(model) -> FoldPlan``.

Nothing here mutates the model. Each graph (the main graph, every If/Loop/Scan body, every
model-local function) is planned the same way: forward folds into producers, backward folds into
consumers for what is left, and, when asked, lowering of the rest to Mul+Add. ``inspect``,
``--dry-run`` and the fold report are renderings of the plan; :func:`bnfold.fold.apply.apply`
carries it out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from ..constants import Constants
from ..graph import GraphIndex, TensorStore
from ..options import FoldOptions
from ..proto import ONNX_DOMAINS, model_names, node_label, opset_of, subgraphs
from ..report import FoldedBN, LeftBN, Reason
from ..shapes import TypeLookup
from . import backward, concat, forward, lower, reparam
from .common import Scope
from .planning import Notes, Planning
from .safety import Hazard


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


@dataclass(frozen=True)
class Family:
    """A family of folds: its module's ``plan_step``, and the option that turns it on (None: always)."""

    name: str
    step: Callable[[Planning], None]
    option: str | None = None


# The fold families, in the order each graph is planned: a family sees what the ones before it took
# (Planning.left holds the BNs still free, with their reasons). A new family is a module with a
# plan_step, one entry here, and its rewrite in apply.
FAMILIES: tuple[Family, ...] = (
    Family("forward", forward.plan_step),
    Family("concat", concat.plan_step),
    Family("backward", backward.plan_step),
    Family("reparameterize", reparam.plan_step, option="reparameterize"),
    Family("lower", lower.plan_step, option="lower_standalone"),
)


def _bodies(scope: Scope, env: Env, types: TypeLookup | None, where: str, notes: Notes) -> list[GraphPlan]:
    index, bodies = scope.index, []
    for i in index.live_nodes() if index.holds_bodies else ():
        node = index.node(i)
        for k, body in enumerate(subgraphs(node)):
            label = f"{where} > {node.op_type} '{node_label(node)}' body {k}"
            inner = make_scope(body, env, types, scope, lists_initializers=False, opset=scope.opset, where=label)
            bodies.append(_plan_graph(inner, env, types, label, notes))
    return bodies


def _plan_graph(scope: Scope, env: Env, types: TypeLookup | None, where: str, notes: Notes) -> GraphPlan:
    """Plan a graph's bodies, then the graph: each family in turn (:data:`FAMILIES`)."""
    bodies = _bodies(scope, env, types, where, notes)
    p = Planning(scope, env.options, notes)
    for family in FAMILIES:
        if family.option is None or getattr(env.options, family.option):
            family.step(p)
    for i, reason in sorted(p.left.items()):
        node = scope.index.node(i)
        notes.left.append(
            LeftBN(node_label(node), node.output[0] if node.output else "", reason.code.value, reason.message)
        )
    return GraphPlan(
        where,
        len(scope.index.nodes),
        tuple(p.chains),
        tuple(p.backs),
        tuple(p.lowered),
        tuple(p.splits),
        tuple(sorted(p.left.items())),
        tuple(p.reparams),
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
    notes = Notes()
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
