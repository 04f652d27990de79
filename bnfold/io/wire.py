"""Just enough of the protobuf wire format to find initializers' raw_data in a serialized ModelProto
without parsing it: bytes in, bytes out, nothing else imported.

ModelProto.graph is field 7, GraphProto.initializer field 5, TensorProto.raw_data field 9, all
length-delimited (wire type 2). The scan only ever *removes* a raw_data field from a tensor and
records where its bytes are; every other byte is copied as it was, so that protobuf parses the
result exactly as it would have parsed the input. Where the scan cannot be sure of that, it raises
:class:`WireError` and the caller parses the whole file instead.
"""

from __future__ import annotations

from collections.abc import Iterator

MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_RAW_DATA = 7, 5, 9
TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 13, 14
LENGTH_DELIMITED = 2
MAX_VARINT_BYTES = 10

Ref = tuple[int, int] | None  # (offset, length) of a raw_data payload in the input


class WireError(ValueError):
    """The bytes are not what the scanner can handle with certainty (not necessarily a bad file)."""


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    for _ in range(MAX_VARINT_BYTES):
        if pos >= len(buf):
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
    raise WireError("varint longer than 10 bytes")


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(field: int, wire: int = LENGTH_DELIMITED) -> bytes:
    return varint(field << 3 | wire)


def fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, field end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        begin = pos
        tag, pos = read_varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise WireError("field number 0")
        value = pos
        if wire == 0:
            _, pos = read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == LENGTH_DELIMITED:
            length, value = read_varint(buf, pos)
            pos = value + length
        elif wire == 5:
            pos += 4
        else:  # groups (3, 4) and reserved types: leave them to protobuf
            raise WireError(f"wire type {wire}")
        if pos > end:
            raise WireError("truncated field")
        yield number, wire, begin, value, pos


def _tensor(buf: bytes, start: int, end: int, threshold: int) -> tuple[bytes, Ref]:
    """A tensor's bytes without its raw_data when that is large and unambiguous, and where it was."""
    raw = [(v, e) for n, w, _, v, e in fields(buf, start, end) if n == TENSOR_RAW_DATA and w == LENGTH_DELIMITED]
    located = any(n in (TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION) for n, *_ in fields(buf, start, end))
    # Several raw_data fields (protobuf keeps the last), or a tensor that already names a location:
    # copied as it is, and protobuf decides.
    if len(raw) != 1 or located or raw[0][1] - raw[0][0] < threshold:
        return bytes(buf[start:end]), None
    value, stop = raw[0]
    out = bytearray()
    for n, w, begin, _, e in fields(buf, start, end):
        if not (n == TENSOR_RAW_DATA and w == LENGTH_DELIMITED):
            out += buf[begin:e]
    return bytes(out), (value, stop - value)


def strip_raw_data(buf: bytes, threshold: int) -> tuple[bytes, list[Ref]]:
    """The model without the raw_data of its large main-graph initializers, and for each
    main-graph initializer (in the order protobuf will list them) the (offset, length) of its
    raw_data in ``buf``, or None where the tensor was kept whole."""
    out = bytearray()
    refs: list[Ref] = []
    for number, wire, begin, value, end in fields(buf, 0, len(buf)):
        if number != MODEL_GRAPH or wire != LENGTH_DELIMITED:
            out += buf[begin:end]
            continue
        graph = bytearray()
        for g_number, g_wire, g_begin, g_value, g_end in fields(buf, value, end):
            if g_number != GRAPH_INITIALIZER or g_wire != LENGTH_DELIMITED:
                graph += buf[g_begin:g_end]
                continue
            if g_end - g_value < threshold:  # too small to hold a raw_data worth leaving in the file
                graph += buf[g_begin:g_end]
                refs.append(None)
                continue
            tensor, ref = _tensor(buf, g_value, g_end, threshold)
            refs.append(ref)
            graph += key(GRAPH_INITIALIZER) + varint(len(tensor)) + tensor
        out += key(MODEL_GRAPH) + varint(len(graph)) + graph
    return bytes(out), refs
