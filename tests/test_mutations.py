"""Structure-aware mutations of real-looking models: rewired inputs, swapped op types, odd attributes,
broken or duplicated initializers, stale value_info, unsorted nodes, other opsets. Whatever the
mutation, bnfold exits 0 or 2 with one line; and where onnxruntime runs the mutated model, the
folded model runs too and computes the same (the byte-level fuzz of test_hostile cannot reach most
of these graphs: a flipped byte rarely parses)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from conftest import feeds_for, run_ort
from onnx import helper, numpy_helper

from bnfold.cli import cli
from bnfold.shapes import inconsistency
from models import Builder, deconv_decoder, mlp_bn1d, mobilenet_se, resnet_bottleneck

OPS = ["Conv", "Gemm", "MatMul", "BatchNormalization", "Identity", "Relu", "Add", "Mul", "Div", "Flatten"]
OPS += ["Reshape", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Dropout", "Cast"]
ATTRIBUTES = {
    "group": [0, 2, 3, -1],
    "epsilon": [0.0, -1.0, 1e30, float("nan")],
    "training_mode": [1],
    "transB": [0, 1],
    "alpha": [0.0, 2.0],
    "beta": [0.0, float("inf")],
    "axis": [-5, 0, 2, 7],
    "spatial": [0],
    "to": [1, 10, 7],
    "kernel_shape": [[2, 2], [3, 3]],
    "pads": [[1, 1, 1, 1], [-1, 0, 0, 0]],
}
DEMO = Path(__file__).resolve().parent.parent / "models" / "demo.onnx"
EXTREMES = [np.nan, np.inf, 0.0, -1.0, 1e38, 1e-40, 7e4]


def _fp16() -> onnx.ModelProto:
    b = Builder(seed=3, dtype=np.float16)
    x = b.input("x", [1, 4, 6, 6])
    return b.model(b.relu(b.bn(b.conv(x, 4, 8, 3), 8)))


SEEDS: dict[str, Callable[[], onnx.ModelProto]] = {
    "demo": lambda: onnx.load(str(DEMO)),
    "resnet": resnet_bottleneck,
    "mobilenet": mobilenet_se,
    "mlp": mlp_bn1d,
    "deconv": deconv_decoder,
    "fp16": _fp16,
}


def _mutate_node(g: onnx.GraphProto, rng: random.Random, names: list[str]) -> None:
    node = rng.choice(g.node)
    how = rng.randrange(6)
    if how == 0:
        node.op_type = rng.choice(OPS)
    elif how == 1 and node.input:
        node.input[rng.randrange(len(node.input))] = rng.choice(names)
    elif how == 2 and node.input:
        del node.input[rng.randrange(len(node.input))]
    elif how == 3:
        node.output[0] = rng.choice(names)
    elif how == 4:
        node.domain = "ai.onnx"
    else:
        name = rng.choice(sorted(ATTRIBUTES))
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute(name, rng.choice(ATTRIBUTES[name]))])


def _mutate_tensor(g: onnx.GraphProto, rng: random.Random) -> None:
    k = rng.randrange(len(g.initializer))
    t = g.initializer[k]
    how = rng.randrange(7)
    if how == 0:
        t.dims[:] = rng.choice([[], [1], list(t.dims)[::-1], [3, 0]])
    elif how == 1:
        t.data_type = rng.choice([10, 11, 7, 0, 999])
    elif how == 2:
        t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data) + 1)]
    elif how == 3:
        value = numpy_helper.to_array(t).astype(np.float64)
        if value.size:
            value.flat[rng.randrange(value.size)] = rng.choice(EXTREMES)
        with np.errstate(all="ignore"):
            t.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(t).dtype), t.name))
    elif how == 4:
        g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))  # overridable
    elif how == 5:
        g.initializer.add().CopyFrom(t)  # defined twice
    else:
        g.node.insert(0, helper.make_node("Constant", [], [t.name], value=t))
        del g.initializer[k]


def mutate(model: onnx.ModelProto, rng: random.Random) -> None:
    g = model.graph
    names = [n for node in g.node for n in list(node.input) + list(node.output)] + ["", "0"]
    values = [n for node in g.node for n in node.output]
    how = rng.randrange(10)
    if how < 4:
        _mutate_node(g, rng, names)
    elif how < 7:
        _mutate_tensor(g, rng)
    elif how == 7:
        shape = rng.choice([[2, 6], [1, 4, 1, 1], [1, 3, 5, 5], [2, 3, 4]])
        g.value_info.append(helper.make_tensor_value_info(rng.choice(values), onnx.TensorProto.FLOAT, shape))
    elif how == 8:
        i, j = rng.randrange(len(g.node)), rng.randrange(len(g.node))
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(g.node[i])
        b.CopyFrom(g.node[j])
        g.node[i].CopyFrom(b)
        g.node[j].CopyFrom(a)
    else:
        g.output.append(helper.make_tensor_value_info(rng.choice(values), onnx.TensorProto.FLOAT, None))


def _same(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], where: str) -> None:
    assert list(ref) == list(got), where
    for name, r in ref.items():
        g = got[name]
        assert (r.shape, r.dtype) == (g.shape, g.dtype), (where, name)
        if r.dtype.kind != "f":
            assert np.array_equal(r, g), (where, name)
            continue
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        finite = np.isfinite(r64)
        assert np.array_equal(finite, np.isfinite(g64)), (where, name, "inf/NaN positions differ")
        if finite.any():
            scale = max(float(np.abs(r64[finite]).max()), 1e-30)
            # loose: a mutation can make an output ill-conditioned (x / x-ish), and a wrong fold
            # is off by far more (the bugs this found were off by 7% to 50%)
            assert float(np.abs(r64[finite] - g64[finite]).max()) / scale <= 1e-2, (where, name)


def _campaign(seeds: dict[str, onnx.ModelProto], rng: random.Random, count: int, tmp_path: Path) -> tuple[set, int]:
    """``count`` mutations of the seed models, each folded through the CLI: the exit codes seen, and
    how many folded models were compared with their mutated original through onnxruntime."""
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    codes = set()
    compared = 0
    for k in range(count):
        name = rng.choice(sorted(seeds))
        model = onnx.ModelProto()
        model.CopyFrom(seeds[name])
        try:
            for _ in range(rng.choice([1, 1, 2])):
                mutate(model, rng)
        except (ValueError, TypeError):
            continue  # a mutation onnx's helpers cannot express
        path.write_bytes(model.SerializeToString())
        out.unlink(missing_ok=True)
        options = rng.choice([[], ["--strict"], ["--lower-standalone"]])
        result = CliRunner().invoke(cli, ["fold", str(path), "-o", str(out), "-q", *options])
        where = f"mutation {k} of {name} {options}"
        codes.add(result.exit_code)
        assert result.exit_code in (0, 2), (where, result.output)
        assert "Traceback" not in result.output, (where, result.output)
        if result.exit_code == 2:
            assert len(result.output.strip().splitlines()) == 1, (where, result.output)
            assert not out.exists(), where
            continue
        if inconsistency(model):
            continue  # some onnxruntime releases crash on graphs strict inference fails (verify refuses them)
        try:
            feeds = feeds_for(model, 0)
            ref = run_ort(model, feeds)
        except Exception:
            continue  # onnxruntime refuses the mutated model itself: no meaning to keep
        _same(ref, run_ort(onnx.load(str(out)), feeds), where)
        compared += 1
    return codes, compared


def test_structural_mutations_exit_cleanly_and_keep_meaning(tmp_path):
    rng = random.Random(3)  # here the previous release changed the meaning of mutations 72 and 187
    codes, compared = _campaign({name: make() for name, make in SEEDS.items()}, rng, 240, tmp_path)
    assert codes == {0, 2} and compared > 50, (codes, compared)


def test_mutations_of_layers_that_take_several_folds(tmp_path):
    """Seeds whose layers take a chain of BNs through steps, a BN on each side, a Concat's part, or
    a map through Transposes: the forms where a fold of one BN meets another's. On the previous
    release, mutation 200 here makes a backward fold write the weight its layer also reads as input."""
    from test_exporters import sequence_bn1d, tf_nhwc_affine
    from test_safety import bn_layer_bn, conv_bn_step_bn

    b = Builder(seed=6)
    x = b.input("x", [1, 8, 5, 5])
    cat = b.op("Concat", [b.conv(b.bn(x, 8), 8, 6, 1, pad=0), b.conv(b.relu(x), 8, 2, 1, pad=0)], axis=1)
    seeds = {
        "steps": conv_bn_step_bn("MaxPool", c=8),
        "steps_mul": conv_bn_step_bn("Mul", gamma1=3.0, c=8),
        "both_conv": bn_layer_bn(np.float32, "conv"),
        "both_gemm": bn_layer_bn(np.float32, "gemm"),
        "both_fp16": bn_layer_bn(np.float16, "conv"),
        "concat": b.model(b.bn(cat, 8)),
        "sequence": sequence_bn1d(bias=True),
        "nhwc": tf_nhwc_affine(bn_after=True),
    }
    codes, compared = _campaign(seeds, random.Random(41), 300, tmp_path)
    assert codes == {0, 2} and compared > 100, (codes, compared)
