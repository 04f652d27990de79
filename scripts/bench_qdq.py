"""onnxruntime CPU latency of a quantization-aware (QDQ) network before and after bnfold folds its
BatchNormalizations, at ORT_ENABLE_ALL (the level deployments run at), interleaved.

The network is the P4 form: every Conv reads its input through QuantizeLinear -> DequantizeLinear,
its weight through DequantizeLinear (int8, per channel) and its bias through DequantizeLinear
(int32, scale x_scale * w_scale, as onnxruntime's quantizer writes it), then BatchNormalization -> Relu ->
QuantizeLinear -> DequantizeLinear, as quantization-aware training exports it; the BN statistics are
calibrated on random inputs. With the BN in place, onnxruntime cannot put the Conv into a quantized
kernel; folded, the Conv sits between DequantizeLinear and QuantizeLinear. The script prints the
median latency of each model, their ratio, the largest output difference, and which quantized
kernels onnxruntime chose in each (from its optimized model).

    python scripts/bench_qdq.py --runs 30 --threads 1 --size 224
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import bnfold  # noqa: E402
from tests.models import calibrate  # noqa: E402
from tests.test_quantized import Q  # noqa: E402

WIDTHS = [
    (3, 32, 2),
    (32, 64, 2),
    (64, 64, 1),
    (64, 128, 2),
    (128, 128, 1),
    (128, 256, 2),
    (256, 256, 1),
    (256, 256, 1),
]


def relu_quantized(q: Q, x: str) -> str:
    """Relu -> QuantizeLinear -> DequantizeLinear, uint8 with zero point 0 (a ReLU's output range)."""
    s, z = q.b.const(np.float32(0.05), "ascale"), q.b.const(np.uint8(0), "azp", dtype=np.uint8)
    return q.b.op("DequantizeLinear", [q.b.op("QuantizeLinear", [q.b.relu(x), s, z]), s, z])


def p4_network(size: int) -> onnx.ModelProto:
    q = Q(seed=7)
    y = q.activation(q.b.input("x", [1, 3, size, size]), 0.05)
    for cin, cout, stride in WIDTHS:
        w = q.b.randn(cout, cin, 3, 3, scale=float(np.sqrt(2.0 / (cin * 9))))
        wq, w_scale = q.weight(w, "int8", axis=0)
        b_scale = (np.float32(0.05) * w_scale).astype(np.float32)  # onnxruntime's quantizer: x_scale * w_scale
        b_ints = np.rint(q.b.randn(cout, scale=0.05) / b_scale).astype(np.int32)
        bias = q.b.op("DequantizeLinear", [q.b.const(b_ints, "bq", dtype=np.int32), q.b.const(b_scale, "bs")], axis=0)
        conv = q.b.op("Conv", [y, wq, bias], "conv", pads=[1] * 4, strides=[stride] * 2)
        y = relu_quantized(q, q.bn(conv, cout, negative=()))
    return calibrate(q.b.model(q.b.op("GlobalAveragePool", [y])), batch=1)


def session(model: onnx.ModelProto, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # not the warning that an optimized model is hardware-specific
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def kernels(model: onnx.ModelProto, threads: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        session(model, threads, path)
        ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return ", ".join(
        f"{op} {n}" for op, n in sorted(ops.items()) if op in ("Conv", "QLinearConv", "BatchNormalization", "FusedConv")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    original = p4_network(args.size)
    folded, report = bnfold.fold(original)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)}
    sessions = {"original": session(original, args.threads), "folded": session(folded, args.threads)}
    outputs = {name: s.run(None, feeds)[0] for name, s in sessions.items()}  # and a warm-up
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    print(
        f"onnxruntime {ort.__version__}, {args.threads} thread(s), input 1x3x{args.size}x{args.size}, {args.runs} interleaved runs"
    )
    print(f"bnfold folded {len(report.folded)} of {len(report.folded) + len(report.left)} BNs")
    print(f"{'model':10} {'median ms':>10} {'min ms':>8}  kernels after ORT_ENABLE_ALL")
    for name in sessions:
        model = original if name == "original" else folded
        print(
            f"{name:10} {statistics.median(times[name]) * 1e3:10.1f} {min(times[name]) * 1e3:8.1f}  {kernels(model, args.threads)}"
        )
    ratio = statistics.median(times["original"]) / statistics.median(times["folded"])
    diff = float(np.max(np.abs(outputs["original"] - outputs["folded"])))
    print(
        f"speed-up {ratio:.2f}x; largest output difference {diff:.3g} (max |output| {float(np.abs(outputs['original']).max()):.3g})"
    )


if __name__ == "__main__":
    main()
