"""The wire-format scan agrees with protobuf's parser on every input it accepts, and refuses (so that
the loader parses the file whole) what it cannot be sure of."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from bnfold.io import load as io_load
from bnfold.io.wire import WireError, key, strip_raw_data, varint

THRESHOLD = 8


def restored(buf: bytes, threshold: int = THRESHOLD) -> onnx.ModelProto:
    """What the loader builds from the scan: the stripped model, with each stripped raw_data put back."""
    stripped, refs = strip_raw_data(buf, threshold)
    model = onnx.ModelProto.FromString(stripped)
    assert len(refs) == len(model.graph.initializer)
    for tensor, ref in zip(model.graph.initializer, refs, strict=False):
        if ref is not None:
            offset, length = ref
            assert not tensor.HasField("raw_data")
            tensor.raw_data = buf[offset : offset + length]
    return model


def agrees(buf: bytes) -> None:
    try:
        expected = onnx.ModelProto.FromString(buf)
    except DecodeError:
        with pytest.raises((WireError, DecodeError)):
            restored(buf)
        return
    try:
        got = restored(buf)
    except WireError:
        return  # the loader falls back to protobuf: agreement by construction
    assert got == expected


tensor_strategy = st.builds(
    lambda name, n, dtype, raw, extra: _tensor(name, n, dtype, raw, extra),
    st.text(min_size=0, max_size=6),
    st.integers(0, 40),
    st.sampled_from([np.float32, np.float16, np.int64, np.uint8]),
    st.booleans(),
    st.booleans(),
)


def _tensor(name: str, n: int, dtype, raw: bool, extra: bool) -> onnx.TensorProto:
    values = (np.arange(n) % 7).astype(dtype)
    t = numpy_helper.from_array(values, name)
    if not raw and dtype == np.float32:
        t.ClearField("raw_data")
        t.float_data.extend(values.tolist())
    if extra:
        t.doc_string = "d" * n
        t.segment.begin = 1
    return t


@st.composite
def models(draw) -> bytes:
    inits = draw(st.lists(tensor_strategy, max_size=6))
    node = helper.make_node("Identity", ["x"], ["y"], name=draw(st.text(max_size=4)))
    graph = helper.make_graph(
        [node],
        draw(st.text(max_size=4)),
        [helper.make_tensor_value_info("x", 1, [1])],
        [helper.make_tensor_value_info("y", 1, [1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], doc_string=draw(st.text(max_size=5)))
    buf = model.SerializeToString()
    # Concatenated messages merge: repeated fields append, singular fields take the last value.
    return buf + draw(
        st.sampled_from([b"", buf, helper.make_model(helper.make_graph([], "h", [], [])).SerializeToString()])
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models())
def test_scan_agrees_with_protobuf(buf):
    agrees(buf)


@settings(max_examples=150, deadline=None)
@given(models(), st.integers(0, 2000), st.integers(0, 255))
def test_scan_of_a_corrupted_model_agrees_or_refuses(buf, pos, byte):
    b = bytearray(buf)
    b[pos % len(b)] = byte
    agrees(bytes(b))


def _model_with(tensor_bytes: bytes) -> bytes:
    graph = helper.make_graph([], "g", [], []).SerializeToString() + key(5) + varint(len(tensor_bytes)) + tensor_bytes
    return key(7) + varint(len(graph)) + graph


def test_two_raw_data_fields_the_last_wins():
    first = numpy_helper.from_array(np.ones(16, np.float32), "w").SerializeToString()
    second = key(9) + varint(64) + np.full(16, 2.0, np.float32).tobytes()
    buf = _model_with(first + second)
    assert numpy_helper.to_array(onnx.ModelProto.FromString(buf).graph.initializer[0])[0] == 2.0
    agrees(buf)
    assert numpy_helper.to_array(restored(buf).graph.initializer[0])[0] == 2.0


def test_a_tensor_that_already_names_a_location_is_kept_whole():
    t = numpy_helper.from_array(np.ones(16, np.float32), "w")
    t.data_location = onnx.TensorProto.EXTERNAL
    _, refs = strip_raw_data(_model_with(t.SerializeToString()), THRESHOLD)
    assert refs == [None]


@pytest.mark.parametrize(
    "buf",
    [
        b"\x00\x00\x00",  # field number 0
        key(7) + varint(100) + b"\x01",  # truncated
        b"\x0b\x0c",  # a group
        b"\xff" * 11,  # an endless varint
        key(7) + varint(3) + key(5, 0) + b"\x01",  # initializer with the wrong wire type
    ],
    ids=["field-0", "truncated", "group", "long-varint", "wrong-wire-type"],
)
def test_hand_made_oddities_agree_or_refuse(buf):
    agrees(buf)


def test_the_loader_falls_back_to_protobuf(tmp_path, monkeypatch):
    monkeypatch.setattr(io_load, "SCAN_BYTES", 0)
    first = numpy_helper.from_array(np.ones(2048, np.float32), "w").SerializeToString()
    second = key(9) + varint(8192) + np.full(2048, 3.0, np.float32).tobytes()
    path = tmp_path / "dup.onnx"
    opset = helper.make_opsetid("", 17).SerializeToString()
    path.write_bytes(_model_with(first + second) + key(8) + varint(len(opset)) + opset)
    model, inline = io_load.parse(path)
    assert inline == set()  # two raw_data fields: kept whole, parsed by protobuf
    assert numpy_helper.to_array(model.graph.initializer[0])[0] == 3.0
