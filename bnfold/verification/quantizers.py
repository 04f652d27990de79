"""Quantized activations in verification. A correct fold of a quantization-aware network changes
a layer's output by float rounding, and a later QuantizeLinear turns that into a whole step where a
value lies on a rounding boundary; the step then travels through every layer after it, and by the
network's output a correct fold can differ by more than the scaled criterion's bound while a wrong
one differs by as little (issue 26 measured 3.7e-3 for both on a ResNet-18).

So each segment between quantizers is compared on its own: every QuantizeLinear of activations that
the candidate keeps as it is (same input name, same scale and zero point) is removed from the
candidate, whose DequantizeLinear then reads the original's integers, fed as an input; the
quantizer's input (the float value the segment computed) is compared per channel, like a layer. A
boundary then flips nothing, and an error is seen in the segment and the channel it is made in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..proto import ONNX_DOMAINS, constant_node_value


def _constants(graph: onnx.GraphProto, wanted: set[str]) -> dict[str, np.ndarray]:
    """The values of the graph's constants named in ``wanted`` (initializers held in the model,
    Constant nodes): only those, as a graph of many layers would spend a second on the others."""
    values = {
        t.name: numpy_helper.to_array(t)
        for t in graph.initializer
        if t.name in wanted and t.data_location != onnx.TensorProto.EXTERNAL
    }
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ONNX_DOMAINS and node.output and node.output[0] in wanted:
            value = constant_node_value(node)
            if value is not None:
                values[node.output[0]] = value
    return values


def _quantizers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """QuantizeLinear nodes of the main graph by output name."""
    return {
        n.output[0]: n
        for n in graph.node
        if n.op_type == "QuantizeLinear" and n.domain in ONNX_DOMAINS and len(n.output) == 1 and len(n.input) >= 2
    }


def _params(node: onnx.NodeProto, constants: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...] | None:
    values = [constants.get(name) for name in node.input[1:3] if name]
    if any(v is None for v in values):
        return None
    return tuple(v for v in values if v is not None)


def fed_quantizers(original: onnx.ModelProto, candidate: onnx.ModelProto) -> list[tuple[str, str]]:
    """(input, output) of each activation QuantizeLinear that both models have alike: the same input
    and output names, equal constant scale and zero point, the same attributes. Quantizers of
    constants (a weight's) and those feeding graph outputs are not fed."""
    ref_q, cand_q = _quantizers(original.graph), _quantizers(candidate.graph)
    if not ref_q or not cand_q:
        return []
    wanted = {name for node in [*ref_q.values(), *cand_q.values()] for name in node.input[:3] if name}
    ref_c, cand_c = _constants(original.graph, wanted), _constants(candidate.graph, wanted)
    outputs = {o.name for o in original.graph.output} | {o.name for o in candidate.graph.output}
    fed = []
    for out, node in ref_q.items():
        other = cand_q.get(out)
        if other is None or out in outputs or node.input[0] in ref_c or other.input[0] != node.input[0]:
            continue
        a, b = _params(node, ref_c), _params(other, cand_c)
        same = a is not None and b is not None and len(a) == len(b)
        same = same and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
        if same and list(node.attribute) == list(other.attribute):
            fed.append((node.input[0], out))
    return fed


def fed_from_reference(model: onnx.ModelProto, names: Sequence[str], types: Mapping[str, int]) -> onnx.ModelProto:
    """``model`` without the QuantizeLinear nodes writing ``names``, which become graph inputs."""
    if not names:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    wanted = set(names)
    kept = [n for n in out.graph.node if not (n.op_type == "QuantizeLinear" and n.output and n.output[0] in wanted)]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    for name in names:
        elem = types.get(name) or onnx.TensorProto.UINT8
        out.graph.input.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return out
