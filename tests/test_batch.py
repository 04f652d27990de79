"""The batched shortcuts (BN maps computed together, forward folds of small layers cleared and
scaled together) must decide and write exactly what the per-fold path does: same folds, same
reasons, same hazards, same bytes. Each model mixes ordinary layers with every condition the
per-fold check refuses or warns about, so that a shortcut which skipped one of them would differ."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import feeds_for, rel_error, run_ort
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import bnfold
from bnfold.fold import batch, common

SCENARIOS = (
    "plain",
    "plain",
    "plain",
    "bias",
    "extreme_scale",
    "tiny_scale",
    "dead_channel",
    "overflow",
    "flush",
    "spread",
    "inflation",
    "nan_weight",
    "negative_var",
    "bias_overflow",
    "shared_params",
    "near_top",
)


def _layer(rng: np.random.Generator, scenario: str, c: int, dtype: np.dtype):
    """(weight, conv bias or None, gamma, beta, mean, var) for one scenario."""
    w = rng.normal(0, 0.5, (c, c, 1, 1))
    bias = rng.normal(0, 0.2, c) if scenario == "bias" else None
    gamma = rng.uniform(0.5, 1.5, c)
    beta, mean, var = rng.normal(0, 0.3, c), rng.normal(0, 0.3, c), rng.uniform(0.5, 2.0, c)
    top = float(np.finfo(dtype).max)
    if scenario == "extreme_scale":
        gamma[rng.integers(c)] = 5e3
    elif scenario == "tiny_scale":
        gamma[rng.integers(c)] = 1e-5
    elif scenario == "dead_channel":
        gamma[rng.integers(c)] = 0.0
    elif scenario == "overflow":
        w[0] = top / 4
        gamma[0] = 8.0
    elif scenario == "flush":
        w[0] = float(np.finfo(dtype).tiny) * 4
        gamma[0] = 1e-2
    elif scenario == "spread":
        gamma[0] = 200.0
    elif scenario == "inflation":
        gamma[:] = 60.0
    elif scenario == "nan_weight":
        w[0, 0] = np.nan
    elif scenario == "negative_var":
        var[0] = -1.0
    elif scenario == "bias_overflow":
        beta[0] = top
        mean[0] = -top
    elif scenario == "near_top":
        w[0] = top / 2
        gamma[0] = 1.0
        var[0] = 1.0 - 1e-5
    return w, bias, gamma, beta, mean, var


def _with_body(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with an If node beside its layers: apply then builds a new index for the main
    graph (the bodies are rewritten first), and :func:`batch.prepare` computes its own values."""
    branch = helper.make_graph(
        [helper.make_node("Identity", ["v"], ["branch_out"])],
        "branch",
        [],
        [helper.make_tensor_value_info("branch_out", model.graph.input[1].type.tensor_type.elem_type, None)],
    )
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "condition"))
    model.graph.node.append(
        helper.make_node("If", ["condition"], ["if_out"], name="if", then_branch=branch, else_branch=branch)
    )
    model.graph.output.append(
        helper.make_tensor_value_info("if_out", model.graph.input[1].type.tensor_type.elem_type, None)
    )
    return model


def _model(seed: int, dtype=np.float32, layers: int = 48, channels: int = 4) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits, outputs = [], [], []
    for i in range(layers):
        scenario = SCENARIOS[rng.integers(len(SCENARIOS))]
        w, bias, *params = _layer(rng, scenario, channels, np.dtype(dtype))
        inits.append(numpy_helper.from_array(w.astype(dtype), f"w{i}"))
        conv_inputs = ["x", f"w{i}"]
        if bias is not None:
            inits.append(numpy_helper.from_array(bias.astype(dtype), f"cb{i}"))
            conv_inputs.append(f"cb{i}")
        names = [f"{p}{i}" for p in "gbmv"]
        if scenario == "shared_params" and i:
            names = [f"{p}0" for p in "gbmv"]  # the BN of layer 0's parameters, read again
        else:
            inits += [numpy_helper.from_array(p.astype(dtype), n) for p, n in zip(params, names, strict=False)]
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", *names], [f"y{i}"], name=f"bn{i}"))
        if i % 3:
            nodes.append(helper.make_node("Conv", conv_inputs, [f"c{i}"], name=f"conv{i}"))
            outputs.append(helper.make_tensor_value_info(f"y{i}", elem, [1, channels, 3, 3]))
            continue
        # A Gemm (transB, so that its output channels are the weight's rows) with a C of each form.
        inits[[t.name for t in inits].index(f"w{i}")] = numpy_helper.from_array(w[:, :, 0, 0].astype(dtype), f"w{i}")
        c_shape = [(), (channels,), (1, channels), (2, channels), None][int(rng.integers(5))]
        gemm_inputs = ["v", f"w{i}"]
        if c_shape is not None:
            inits.append(numpy_helper.from_array(rng.normal(0, 0.2, c_shape).astype(dtype), f"gc{i}"))
            gemm_inputs.append(f"gc{i}")
        beta = float(rng.choice([1.0, 0.5, -2.0]))
        nodes.append(helper.make_node("Gemm", gemm_inputs, [f"c{i}"], name=f"gemm{i}", transB=1, beta=beta))
        outputs.append(helper.make_tensor_value_info(f"y{i}", elem, [2, channels]))
    graph = helper.make_graph(
        nodes,
        "batched",
        [
            helper.make_tensor_value_info("x", elem, [1, channels, 3, 3]),
            helper.make_tensor_value_info("v", elem, [2, channels]),
        ],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model


def _per_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch, "clear", lambda scope, chains: set())
    monkeypatch.setattr(batch, "prepare", lambda scope, chains: {})
    monkeypatch.setattr(common, "batch_affines", lambda index: {})


def _outcome(model: onnx.ModelProto, **options):
    folded, report = bnfold.fold(model, **options)
    return folded.SerializeToString(), report.to_dict()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_batched_equals_per_fold(seed: int, dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(seed, dtype)
    if seed % 2:
        model = _with_body(model)
    fast, fast_report = _outcome(model)
    fast_strict = _outcome(model, strict=True)
    with monkeypatch.context() as m:
        _per_fold(m)
        slow, slow_report = _outcome(model)
        slow_strict = _outcome(model, strict=True)
    assert fast_report == slow_report
    assert fast == slow
    assert fast_strict == slow_strict


def test_batched_numerics_match_onnxruntime() -> None:
    model = _model(7, np.float32)
    folded, report = bnfold.fold(model)
    assert report.folded and report.left and report.warnings  # every kind of outcome is present
    feeds = feeds_for(model, 0)
    ref, got = run_ort(model, feeds), run_ort(folded, feeds)
    # The layers that folded, where the original is finite (a weight near the float32 limit
    # overflows on random inputs, folded or not).
    compared = [f.output for f in report.folded if np.isfinite(ref[f.output]).all()]
    assert len(compared) >= 20
    for name in compared:
        assert rel_error(ref[name], got[name]) <= 1e-5, name
    # A deliberately wrong scale on one folded weight is seen.
    broken = onnx.ModelProto()
    broken.CopyFrom(folded)
    conv = next(n for n in broken.graph.node if n.output[0] == compared[0])
    w = next(t for t in broken.graph.initializer if t.name == conv.input[1])
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(1.001), w.name))
    assert rel_error(ref[compared[0]], run_ort(broken, feeds)[compared[0]]) > 1e-5


def test_the_shortcuts_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """The equality above means something only if the batched path is the one that ran."""
    calls = {"cleared": 0, "prepared": 0, "affines": 0}
    clear, prepare, affines = batch.clear, batch.prepare, common.batch_affines

    def counted_clear(scope, chains):
        found = clear(scope, chains)
        calls["cleared"] += len(found)
        return found

    def counted_prepare(scope, chains):
        found = prepare(scope, chains)
        calls["prepared"] += len(found)
        return found

    def counted_affines(index):
        found = affines(index)
        calls["affines"] += len(found)
        return found

    monkeypatch.setattr(batch, "clear", counted_clear)
    monkeypatch.setattr(batch, "prepare", counted_prepare)
    monkeypatch.setattr(common, "batch_affines", counted_affines)
    model = _model(3, np.float32, layers=64)
    _, report = bnfold.fold(model)
    assert calls["affines"] >= 40 and calls["cleared"] >= 10 and calls["prepared"] >= 10
    assert calls["cleared"] < len(report.folded)  # hazards and refusals took the per-fold path


def test_names_from_the_index_are_the_models_names() -> None:
    """The names a new name must avoid, collected from the main graph's index, are those a walk over
    the model collects."""
    from bnfold.graph import GraphIndex
    from bnfold.io.tensors import Source
    from bnfold.proto import model_names

    for model in (_model(4, np.float32), onnx.load(str(Path(__file__).parent.parent / "models" / "demo.onnx"))):
        model.graph.value_info.append(helper.make_tensor_value_info("only_declared", 1, [1]))
        model.graph.node[0].name = "a_node_name"
        index = GraphIndex(model.graph, store=Source(None), taken_names=set())
        assert index.names() == model_names(model)


def test_a_careless_shortcut_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clearing every chain (skipping the per-fold check) changes the outcome on these models."""
    model = _model(1, np.float32)
    honest = _outcome(model)
    monkeypatch.setattr(batch, "clear", lambda scope, chains: set(range(len(chains))))
    assert _outcome(model) != honest


def test_the_cyclic_collector_is_resumed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fold pauses Python's cyclic collector and leaves it as it found it, also on an error."""
    import gc
    import weakref

    import bnfold.api
    from bnfold.fold import plan as plan_module

    seen = []
    planner = plan_module.plan_model

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return planner(*args, **kwargs)

    class Cycle:
        pass

    def cyclic_spy(*args, **kwargs):
        garbage = Cycle()
        garbage.me = garbage  # type: ignore[attr-defined]
        found.append(weakref.ref(garbage))
        return spy(*args, **kwargs)

    found: list = []
    monkeypatch.setattr(bnfold.api, "plan_model", cyclic_spy)
    assert gc.isenabled()
    frozen = gc.get_freeze_count()  # Python 3.12 starts with some objects frozen
    bnfold.fold(_model(0, layers=3))
    assert seen == [False] and gc.isenabled()
    # Nothing the fold made stays frozen, nothing frozen before is released, and cyclic garbage
    # made during the fold is still collected.
    if frozen:
        assert max(frozen - 100, 0) < gc.get_freeze_count() <= frozen  # (a few freed meanwhile)
    else:
        assert not gc.get_freeze_count()
    gc.collect()
    assert found[0]() is None
    # Objects the process froze itself stay frozen.
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        bnfold.fold(_model(0, layers=3))
        assert max(frozen - 100, 0) < gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()
    monkeypatch.setattr(bnfold.api, "plan_model", spy)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(bnfold.api, "plan_model", broken)
    with pytest.raises(RuntimeError):
        bnfold.fold(_model(0, layers=3))
    assert gc.isenabled()
    gc.disable()
    try:
        monkeypatch.setattr(bnfold.api, "plan_model", spy)
        bnfold.fold(_model(0, layers=3))
        assert not gc.isenabled()
    finally:
        gc.enable()


@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.booleans()), max_size=40))
@settings(max_examples=200, deadline=None)
def test_a_field_keeps_its_other_entries_in_order(entries) -> None:
    """The filter of a repeated field (commit's, for initializers and declarations) removes exactly
    the flagged entries, duplicate names included, and keeps the others, unchanged, in order."""
    from bnfold.graph import _keep_only, _names

    graph = onnx.GraphProto()
    for k, (name, _) in enumerate(entries):
        graph.value_info.append(helper.make_tensor_value_info(name, 1, [k]))
    names = _names(graph.value_info, None)
    assert names == [name for name, _ in entries]
    assert _names(graph.value_info, names[:-1]) == names  # a stale list is read again
    _keep_only(graph.value_info, [gone for _, gone in entries])
    kept = [(name, k) for k, (name, gone) in enumerate(entries) if not gone]
    assert [(v.name, v.type.tensor_type.shape.dim[0].dim_value) for v in graph.value_info] == kept


@pytest.mark.parametrize("body", [False, True])
def test_commit_removes_what_was_dropped_and_declared_dead(body: bool) -> None:
    """After a fold, the initializers of folded BNs and the declarations of renamed values are gone,
    everything else is still there in its order, whether the names were read in planning (no body)
    or are read by the commit (with an If, the main graph is indexed again before its rewrite)."""
    model = _with_body(_model(2, np.float32)) if body else _model(2, np.float32)
    for node in model.graph.node:
        model.graph.value_info.append(helper.make_tensor_value_info(node.output[0], 1, None))
    folded, report = bnfold.fold(model)
    unused_before = {t.name for t in model.graph.initializer} - {n for node in model.graph.node for n in node.input}
    used = {n for node in folded.graph.node for n in node.input} | unused_before  # those it leaves as they were
    produced = {o for node in folded.graph.node for o in node.output}
    inits = [t.name for t in folded.graph.initializer]
    assert set(inits) <= used and len(set(inits)) == len(inits)
    survivors = [t.name for t in model.graph.initializer if t.name in set(inits)]
    assert inits[: len(survivors)] == survivors  # in their order, new ones after them
    declared = [v.name for v in folded.graph.value_info]
    assert declared and set(declared) <= produced
    assert declared == [n for n in (v.name for v in model.graph.value_info) if n in produced]
    assert report.folded
