"""Small ONNX model builders for tests, the demo model and benchmarks (no torch needed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.proto import from_array, tensor_type  # bfloat16 whatever the onnx version

FLOAT, FLOAT16, DOUBLE = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE


class Builder:
    """Write graphs tersely: every helper returns the name of the value it produced."""

    def __init__(
        self, opset: int = 17, ir_version: int | None = None, seed: int = 0, dtype=np.float32, he_init: bool = False
    ) -> None:
        self.he_init = he_init  # conv weights with std sqrt(2 / fan_in): activations stay bounded in deep nets
        self.opset = opset
        self.ir_version = ir_version
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.count: dict[str, int] = {}

    def name(self, base: str) -> str:
        k = self.count.get(base, 0)
        self.count[base] = k + 1
        return f"{base}{k}"

    def input(self, name: str, shape: Sequence[int | str | None], elem=None) -> str:
        self.inputs.append(
            helper.make_tensor_value_info(name, elem or self._elem(), None if shape is None else list(shape))
        )
        return name

    def output(self, name: str, elem=None, shape=None) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem or self._elem(), shape))
        return name

    def _elem(self) -> int:
        return tensor_type(self.dtype)

    def const(self, value, base: str = "c", dtype=None) -> str:
        name = self.name(base)
        self.inits.append(from_array(np.asarray(value, dtype=dtype or self.dtype), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], base: str | None = None, outputs: int = 1, **attrs) -> str:
        name = self.name(base or op_type.lower())
        outs = [name] + [f"{name}_out{i}" for i in range(1, outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        return name

    def randn(self, *shape, scale=0.2):
        return (self.rng.standard_normal(shape) * scale).astype(self.dtype)

    # -- layers ------------------------------------------------------------------------------------
    def conv(self, x, cin, cout, k=3, group=1, bias=True, stride=1, pad=None, dims=2, **attrs) -> str:
        scale = float(np.sqrt(2.0 / (cin // group * k**dims))) if self.he_init else 0.2
        w = self.const(self.randn(cout, cin // group, *([k] * dims), scale=scale), "w")
        ins = [x, w] + ([self.const(self.randn(cout), "b")] if bias else [])
        if pad is None:
            pad = k // 2
        if "auto_pad" not in attrs:
            attrs["pads"] = [pad] * (2 * dims)
        return self.op("Conv", ins, "conv", group=group, strides=[stride] * dims, **attrs)

    def conv_transpose(self, x, cin, cout, k=2, group=1, bias=True, stride=2, dims=2, **attrs) -> str:
        w = self.const(self.randn(cin, cout // group, *([k] * dims)), "wt")
        ins = [x, w] + ([self.const(self.randn(cout), "b")] if bias else [])
        return self.op("ConvTranspose", ins, "deconv", group=group, strides=[stride] * dims, **attrs)

    def bn_params(self, c, shape=None):
        shape = shape or (c,)
        return [
            self.const(self.rng.uniform(0.5, 1.5, shape), "gamma"),
            self.const(self.rng.standard_normal(shape) * 0.1, "beta"),
            self.const(self.rng.standard_normal(shape) * 0.1, "mean"),
            self.const(self.rng.uniform(0.5, 2.0, shape), "var"),
        ]

    def bn(self, x, c, epsilon=None, outputs=1, params=None, **attrs) -> str:
        if epsilon is not None:
            attrs["epsilon"] = epsilon
        return self.op("BatchNormalization", [x] + (params or self.bn_params(c)), "bn", outputs=outputs, **attrs)

    def relu(self, x) -> str:
        return self.op("Relu", [x])

    def gemm(self, x, k, n, trans_b=0, bias=True, **attrs) -> str:
        w = self.const(self.randn(n, k) if trans_b else self.randn(k, n), "fc_w")
        ins = [x, w] + ([self.const(self.randn(n), "fc_b")] if bias else [])
        return self.op("Gemm", ins, "gemm", transB=trans_b, **attrs)

    def model(self, *outputs: str, elem=None, shape=None, domains=()) -> onnx.ModelProto:
        for o in outputs:
            self.output(o, elem, shape)
        inputs = list(self.inputs)
        if self.ir_version and self.ir_version < 4:  # IR 3 lists every initializer as a graph input
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        graph = helper.make_graph(self.nodes, "g", inputs, self.outputs, self.inits)
        kw = {"ir_version": self.ir_version} if self.ir_version else {}
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, 1) for d in domains]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="bnfold-tests", **kw)
        if not self.ir_version:
            model.ir_version = min(model.ir_version, 10)  # what the installed onnxruntime reads
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except onnx.shape_inference.InferenceError:
            return model  # custom domains: the caller declares output shapes
        for out, typed in zip(model.graph.output, inferred.graph.output, strict=False):
            if not out.type.tensor_type.HasField("shape"):
                out.type.CopyFrom(typed.type)
        return model


# -- realistic architectures ----------------------------------------------------------------------


def resnet_bottleneck(seed=0, blocks=2, c=16) -> onnx.ModelProto:
    b = Builder(seed=seed)
    x = b.input("input", ["N", 3, 16, 16])
    y = b.relu(b.bn(b.conv(x, 3, c * 4, 3, bias=False), c * 4))
    for _ in range(blocks):
        h = b.relu(b.bn(b.conv(y, c * 4, c, 1, bias=False, pad=0), c))
        h = b.relu(b.bn(b.conv(h, c, c, 3, bias=False), c))
        h = b.bn(b.conv(h, c, c * 4, 1, bias=False, pad=0), c * 4)
        y = b.relu(b.op("Add", [h, y]))
    pooled = b.op("GlobalAveragePool", [y])
    flat = b.op("Flatten", [pooled], axis=1)
    return b.model(b.gemm(flat, c * 4, 10, trans_b=1))


def mobilenet_se(seed=0, c=8) -> onnx.ModelProto:
    b = Builder(seed=seed)
    x = b.input("image", [1, 3, 16, 16])
    y = b.op("Clip", [b.bn(b.conv(x, 3, c, 3, stride=2, bias=False), c), b.const(0.0, "lo"), b.const(6.0, "hi")])
    for cout in (16, 24):
        dw = b.relu(b.bn(b.conv(y, c, c, 3, group=c, bias=False), c))
        # squeeze-and-excitation: the BN-free branch multiplies the depthwise output
        se = b.op("GlobalAveragePool", [dw])
        se = b.relu(b.conv(se, c, 4, 1, pad=0))
        se = b.op("Sigmoid", [b.conv(se, 4, c, 1, pad=0)])
        y = b.op("Mul", [dw, se])
        y = b.bn(b.conv(y, c, cout, 1, bias=False, pad=0), cout)
        c = cout
    return b.model(y)


def densenet_preact(seed=0, growth=4, layers=3) -> onnx.ModelProto:
    """Pre-activation dense block: BN -> Relu -> Conv on a Concat; those BNs can fold nowhere forward."""
    b = Builder(seed=seed)
    x = b.input("x", [2, 8, 8, 8])
    feats, c = b.conv(x, 8, 8, 3), 8
    for _ in range(layers):
        h = b.relu(b.bn(feats, c))
        h = b.conv(h, c, growth, 3, bias=False)
        feats = b.op("Concat", [feats, h], axis=1)
        c += growth
    return b.model(b.relu(b.bn(feats, c)))


def inception(seed=0) -> onnx.ModelProto:
    b = Builder(seed=seed)
    x = b.input("x", [1, 8, 12, 12])
    br1 = b.relu(b.bn(b.conv(x, 8, 4, 1, bias=False, pad=0), 4))
    br2 = b.relu(b.bn(b.conv(b.relu(b.bn(b.conv(x, 8, 6, 1, bias=False, pad=0), 6)), 6, 8, 3, bias=False), 8))
    br3 = b.relu(b.bn(b.conv(b.relu(b.bn(b.conv(x, 8, 2, 1, bias=False, pad=0), 2)), 2, 4, 5, bias=False), 4))
    pool = b.op("MaxPool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    br4 = b.relu(b.bn(b.conv(pool, 8, 4, 1, bias=False, pad=0), 4))
    return b.model(b.op("Concat", [br1, br2, br3, br4], axis=1))


def mlp_bn1d(seed=0) -> onnx.ModelProto:
    """Linear+BatchNorm1d as torch exports it: Gemm(transB=1) and MatMul(+Add) both."""
    b = Builder(seed=seed)
    x = b.input("features", ["batch", 20])
    h = b.relu(b.bn(b.gemm(x, 20, 32, trans_b=1), 32))
    mm = b.op("MatMul", [h, b.const(b.randn(32, 16), "w")])
    h = b.relu(b.bn(b.op("Add", [mm, b.const(b.randn(16), "b")]), 16))
    h = b.relu(b.bn(b.op("MatMul", [h, b.const(b.randn(16, 8), "w")]), 8))
    return b.model(b.gemm(h, 8, 3))


def deconv_decoder(seed=0) -> onnx.ModelProto:
    b = Builder(seed=seed)
    z = b.input("z", [1, 16, 4, 4])
    y = b.relu(b.bn(b.conv_transpose(z, 16, 8, 2, bias=False), 8))
    y = b.relu(b.bn(b.conv_transpose(y, 8, 8, 3, group=2, stride=2, pads=[1, 1, 1, 1], output_padding=[1, 1]), 8))
    y = b.relu(b.bn(b.conv_transpose(y, 8, 4, 2, group=4), 4))
    return b.model(b.op("Sigmoid", [b.conv(y, 4, 3, 3)]))


def conv3d_net(seed=0) -> onnx.ModelProto:
    b = Builder(seed=seed)
    x = b.input("clip", [1, 3, 4, 8, 8])
    y = b.relu(b.bn(b.conv(x, 3, 8, 3, dims=3, bias=False), 8))
    y = b.relu(b.bn(b.conv(y, 8, 8, 3, group=8, dims=3, stride=2), 8))
    y = b.relu(b.bn(b.conv(y, 8, 12, 1, dims=3, pad=0), 12))
    return b.model(b.op("GlobalAveragePool", [y]))


def resnet50_layout(resolution: int = 224, seed: int = 50) -> onnx.ModelProto:
    """ResNet-50's layout (53 Conv+BN pairs, about 25.5 M parameters, ~100 MB inline)."""
    b = Builder(seed=seed, he_init=True)
    x = b.input("input", ["N", 3, resolution, resolution])
    y = b.relu(b.bn(b.conv(x, 3, 64, 7, stride=2, bias=False), 64))
    y = b.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            s = stride if i == 0 else 1
            h = b.relu(b.bn(b.conv(y, cin, width, 1, pad=0, bias=False), width))
            h = b.relu(b.bn(b.conv(h, width, width, 3, stride=s, bias=False), width))
            h = b.bn(b.conv(h, width, width * 4, 1, pad=0, bias=False), width * 4)
            short = y if i else b.bn(b.conv(y, cin, width * 4, 1, stride=s, pad=0, bias=False), width * 4)
            y = b.relu(b.op("Add", [h, short]))
            cin = width * 4
    y = b.op("Flatten", [b.op("GlobalAveragePool", [y])], axis=1)
    return b.model(b.gemm(y, 2048, 1000, trans_b=1))


def calibrate(
    model: onnx.ModelProto, dims: dict[str, int] | None = None, batch: int = 4, seed: int = 0
) -> onnx.ModelProto:
    """The model with every main-graph BN's mean and var set to the per-channel statistics of the
    activations that reach it on random inputs, in graph order (each BN sees inputs normalized by
    the BNs before it), as a BN in a trained network has: activations stay healthy in depth, and
    folding errors show at their true size."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    bns = [n for n in g.node if n.op_type == "BatchNormalization"]
    stats = {n: None for bn in bns for n in bn.input[3:5]}
    inits = {t.name: t for t in g.initializer}
    values = {n: numpy_helper.to_array(inits[n]) for n in stats}
    for n in stats:
        g.initializer.remove(inits[n])
        g.input.append(helper.make_tensor_value_info(n, inits[n].data_type, list(inits[n].dims)))
    have = {o.name for o in g.output}
    for bn in bns:
        if bn.input[0] not in have:
            g.output.append(helper.make_tensor_value_info(bn.input[0], inits[bn.input[1]].data_type, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        if i.name in stats:
            continue
        shape = [d if isinstance(d, int) else (dims or {}).get(d, batch) for d in i.shape]
        feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    for bn in bns:
        act = sess.run([bn.input[0]], {**feeds, **values})[0].astype(np.float64)
        axes = tuple(k for k in range(act.ndim) if k != 1)
        mean, var = bn.input[3], bn.input[4]
        values[mean] = act.mean(axis=axes).astype(values[mean].dtype)
        values[var] = np.maximum(act.var(axis=axes), 1e-6).astype(values[var].dtype)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(values[t.name], t.name))
    return out


def perturb_channel(
    folded: onnx.ModelProto, original: onnx.ModelProto, factor: float = 1.01, channel: int = 0, at: float = 0.5
) -> tuple:
    """A wrong candidate: one output channel (weight row and bias) of a folded layer scaled by
    ``factor``: the middle one by default, ``at`` the fraction of the way through the folded layers
    (0: the first, 1: the last). Returns the model and the BN output name of that layer."""
    bn_outputs = [n.output[0] for n in original.graph.node if n.op_type == "BatchNormalization"]
    layers = [
        n for n in folded.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm") and n.output[0] in bn_outputs
    ]
    layer = layers[min(int(len(layers) * at), len(layers) - 1)]
    out = onnx.ModelProto()
    out.CopyFrom(folded)
    node = next(n for n in out.graph.node if n.output[0] == layer.output[0])
    inits = {t.name: t for t in out.graph.initializer}
    for slot in (1, 2):
        t = inits[node.input[slot]]
        a = numpy_helper.to_array(t).copy()
        if node.op_type == "Gemm" and slot == 1 and not any(x.name == "transB" and x.i for x in node.attribute):
            a[:, channel] *= factor
        elif node.op_type == "ConvTranspose" and slot == 1:  # (C_in, C_out/group, k...)
            group = next((x.i for x in node.attribute if x.name == "group"), 1)
            per_in, per_out = a.shape[0] // group, a.shape[1]
            g = channel // per_out
            a[g * per_in : (g + 1) * per_in, channel % per_out] *= factor
        else:
            a[channel] *= factor
        t.CopyFrom(numpy_helper.from_array(a, t.name))
    return out, layer.output[0]


def with_epsilon(model: onnx.ModelProto, epsilon: float, times: bool = False) -> onnx.ModelProto:
    """The model with every BN's epsilon replaced by ``epsilon`` (with ``times``: by its own, 1e-5
    where it has none, times ``epsilon``): folding it gives a wrong-epsilon fold."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in out.graph.node:
        if n.op_type == "BatchNormalization":
            own = 1e-5
            for a in list(n.attribute):
                if a.name == "epsilon":
                    own = a.f
                    n.attribute.remove(a)
            n.attribute.append(helper.make_attribute("epsilon", own * epsilon if times else epsilon))
    return out


ARCHITECTURES = {
    "resnet_bottleneck": resnet_bottleneck,
    "mobilenet_se": mobilenet_se,
    "densenet_preact": densenet_preact,
    "inception": inception,
    "mlp_bn1d": mlp_bn1d,
    "deconv_decoder": deconv_decoder,
    "conv3d_net": conv3d_net,
}
