"""Float16 fidelity: how far is a folded float16 model from the float32 model it came from?

Each network is built by the project's builders, its BN statistics calibrated from the activations
that reach them, then converted to float16. The columns are the error against the float32 model
(max|d| / max|ref| over the outputs, 3 samples, onnxruntime CPU, optimizations off) of the unfolded
float16 model, of bnfold's fold of it, and of each peer's fold of it (those installed).

    python scripts/fidelity.py
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import feeds_for  # noqa: E402

import bnfold  # noqa: E402
from tests.models import ARCHITECTURES, calibrate, resnet50_layout  # noqa: E402

NETWORKS: dict[str, Callable[[], onnx.ModelProto]] = {
    "resnet_bottleneck": ARCHITECTURES["resnet_bottleneck"],
    "mobilenet_se": ARCHITECTURES["mobilenet_se"],
    "inception": ARCHITECTURES["inception"],
    "resnet50": lambda: resnet50_layout(224),
}


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    return out


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = {i.name: i.type for i in sess.get_inputs()}
    cast = {k: v.astype(np.float16 if "float16" in names[k] else np.float32) for k, v in feeds.items() if k in names}
    return [o.astype(np.float64) for o in sess.run(None, cast)]


def error(ref32: onnx.ModelProto, model: onnx.ModelProto) -> float:
    worst = 0.0
    for seed in range(3):
        feeds = feeds_for(ref32, seed, {"N": 1})
        for a, b in zip(run(ref32, feeds), run(model, feeds), strict=False):
            worst = max(worst, float(np.abs(a - b).max() / np.abs(a).max()))
    return worst


def onnxruntime_fold(model: onnx.ModelProto) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ort.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(path)
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return onnx.load(str(path))


def peers() -> dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]]:
    tools: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {"onnxruntime": onnxruntime_fold}
    try:
        import onnxoptimizer

        tools["onnxoptimizer"] = lambda m: onnxoptimizer.optimize(m, ["fuse_bn_into_conv"])
    except ImportError:
        pass
    try:
        import onnxslim

        tools["onnxslim"] = lambda m: onnxslim.slim(m)
    except ImportError:
        pass
    try:
        import onnxsim

        tools["onnxsim"] = lambda m: onnxsim.simplify(m)[0]
    except ImportError:
        pass
    return tools


def count_bn(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def main() -> None:
    tools = peers()
    print("| model | float16 unfolded | bnfold | " + " | ".join(tools) + " |")
    print("|---|---|---|" + "---|" * len(tools))
    for name, make in NETWORKS.items():
        fp32 = calibrate(make(), {"N": 2})
        fp16 = to_float16(fp32)
        cells = [f"{error(fp32, fp16):.2e}"]
        folded, _ = bnfold.fold(fp16)
        cells.append(f"{error(fp32, folded):.2e}" + (f" ({count_bn(folded)} BN left)" if count_bn(folded) else ""))
        for fold in tools.values():
            result: str | None
            try:
                other = fold(fp16)
                result = f"{error(fp32, other):.2e}" + (f" ({count_bn(other)} BN left)" if count_bn(other) else "")
            except Exception as exc:  # a peer that fails is reported, not fatal
                result = f"failed ({type(exc).__name__})"
            cells.append(result)
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
