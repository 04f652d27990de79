"""Write models/demo.onnx: a small network with foldable and non-foldable BatchNormalization layers.

python scripts/make_demo_models.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.models import Builder  # noqa: E402


def demo() -> onnx.ModelProto:
    b = Builder(seed=2024)
    x = b.input("image", ["batch", 3, 32, 32])
    # Stem and a residual block: Conv -> BN pairs that fold.
    y = b.relu(b.bn(b.conv(x, 3, 32, 3, stride=2, bias=False), 32))
    h = b.relu(b.bn(b.conv(y, 32, 32, 3, bias=False), 32))
    h = b.bn(b.conv(h, 32, 32, 3, bias=False), 32)
    y = b.relu(b.op("Add", [h, y]))
    # Depthwise-separable block, then a Caffe-style BN -> Mul -> Add scale layer.
    y = b.relu(b.bn(b.conv(y, 32, 32, 3, group=32, bias=False), 32))
    y = b.bn(b.conv(y, 32, 48, 1, pad=0, bias=False), 48)
    y = b.op("Mul", [y, b.const(b.rng.uniform(0.5, 1.5, (48, 1, 1)), "scale")])
    y = b.relu(b.op("Add", [y, b.const(b.randn(48, 1, 1), "shift")]))
    # Pre-activation BN after a Concat: nothing before it can absorb it.
    z = b.conv(y, 48, 16, 3)
    cat = b.op("Concat", [y, z], axis=1)
    y = b.relu(b.bn(cat, 64))
    # A BN on a Conv output that is also used elsewhere (the skip branch) stays too.
    c = b.conv(y, 64, 64, 1, pad=0)
    y = b.op("Add", [b.bn(c, 64), c])
    pooled = b.op("Flatten", [b.op("GlobalAveragePool", [y])], axis=1)
    # Classifier head: Linear + BatchNorm1d as MatMul + Add + BN.
    h = b.op("Add", [b.op("MatMul", [pooled, b.const(b.randn(64, 32), "fc1_w")]), b.const(b.randn(32), "fc1_b")])
    h = b.relu(b.bn(h, 32))
    return b.model(b.gemm(h, 32, 10, trans_b=1))


def main() -> None:
    out = ROOT / "models" / "demo.onnx"
    model = demo()
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out))
    print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
