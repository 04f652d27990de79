"""Loading and saving models without holding their weights in memory.

* ``load`` reads the graph only. Large inline tensors are located by a scan of the protobuf wire
  format and become references into the input file itself (like external data), so they are never
  parsed into protobuf; external data stays where it is.
* A :class:`Source` turns tensors into numpy arrays on demand: memory-mapped from their file, or
  computed (a folded weight is *deferred*: computed in float64 and cast once, at write time).
* ``save`` writes once, atomically: unchanged tensors are copied from their source file in bounded
  chunks, deferred ones are computed one at a time, whether the output is inline or external.
"""

from __future__ import annotations

import itertools
import mmap
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from .errors import BnfoldError
from .graph import graphs_of, model_graphs

PathLike = Union[str, os.PathLike]
TWO_GB = 2**31 - 1
EXTERNAL_THRESHOLD = 1024  # tensors at least this large go to the data file
LAZY_THRESHOLD = 4096  # inline tensors at least this large are read from the file only when needed
CHUNK = 16 << 20
SMALL = 1 << 20  # file-backed tensors below this are read with pread; larger ones memory-mapped
PENDING = "bnfold:deferred"  # external_data location of a tensor computed at write time


# -- protobuf wire format -----------------------------------------------------------------------
# Just enough to find initializers' raw_data in a serialized ModelProto: ModelProto.graph is field 7,
# GraphProto.initializer field 5, TensorProto.raw_data field 9, all length-delimited (wire type 2).

def _read_varint(buf, pos: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _write_all(f, data) -> int:
    """Write everything to an unbuffered file (a raw write may take only part of it)."""
    view, done = memoryview(data), 0
    while done < len(view):
        done += f.write(view[done:])
    return done


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int) -> bytes:
    return _varint(field << 3 | 2)


def _fields(buf, start: int, end: int) -> Iterator[Tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, field end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        begin = pos
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        value = pos
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, value = _read_varint(buf, pos)
            pos = value + length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("truncated field")
        yield number, wire, begin, value, pos


def _strip_raw_data(buf) -> Tuple[bytes, List[Optional[Tuple[int, int]]]]:
    """The model without the raw_data of its large main-graph initializers, and for each initializer
    (in order) the (offset, length) of its raw_data in ``buf``, or None where it was kept."""
    out, refs = bytearray(), []
    for number, wire, begin, value, end in _fields(buf, 0, len(buf)):
        if number != 7 or wire != 2:
            out += buf[begin:end]
            continue
        graph = bytearray()
        for g_number, g_wire, g_begin, g_value, g_end in _fields(buf, value, end):
            if g_number != 5 or g_wire != 2:
                graph += buf[g_begin:g_end]
                continue
            tensor, ref = bytearray(), None
            for t_number, t_wire, t_begin, t_value, t_end in _fields(buf, g_value, g_end):
                if t_number == 9 and t_wire == 2 and t_end - t_value >= LAZY_THRESHOLD:
                    ref = (t_value, t_end - t_value)
                else:
                    tensor += buf[t_begin:t_end]
            refs.append(ref)
            graph += _key(5) + _varint(len(tensor)) + tensor
        out += _key(7) + _varint(len(graph)) + graph
    return bytes(out), refs


# -- where tensor values come from ----------------------------------------------------------------

def external_location(tensor: onnx.TensorProto) -> Optional[dict]:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def set_location(tensor: onnx.TensorProto, location: str, offset: int = 0, length: int = 0) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _np_dtype(tensor: onnx.TensorProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


def _nbytes(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64)) * _np_dtype(tensor).itemsize


@dataclass
class Deferred:
    """A tensor value computed when it is needed (at write time), not when it is decided."""

    shape: Tuple[int, ...]
    dtype: np.dtype
    compute: Callable[[], np.ndarray]


def initializers(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every initializer of the model, bodies and functions included."""
    for g in model_graphs(model):
        yield from g.initializer


def data_files(model: onnx.ModelProto, base_dir: Path) -> Set[Path]:
    return {
        (base_dir / loc["location"]).resolve()
        for t in initializers(model)
        if (loc := external_location(t)) is not None and loc.get("location") != PENDING
    }


class Source:
    """Turns initializers into numpy arrays: inline ones parsed, file-backed ones memory-mapped (never
    read whole, never cached here), deferred ones computed."""

    def __init__(self, base_dir: Optional[Path], inline_refs: Optional[Set[str]] = None) -> None:
        self.base_dir = base_dir
        self.inline_refs = inline_refs or set()  # tensors that live inside the input .onnx file
        self.deferred: Dict[str, Deferred] = {}
        self._paths: Dict[str, Path] = {}
        self._fds: Dict[Path, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()

    def __call__(self, tensor: onnx.TensorProto) -> np.ndarray:
        info = external_location(tensor)
        if info is None:
            return numpy_helper.to_array(tensor)
        if info.get("location") == PENDING:
            return self.deferred[tensor.name].compute()
        path, dtype, shape = self._path(tensor, info), _np_dtype(tensor), tuple(tensor.dims)
        count, offset = int(np.prod(shape, dtype=np.int64)), int(info.get("offset", 0))
        if count == 0:
            return np.zeros(shape, dtype)
        if count * dtype.itemsize < SMALL:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return np.frombuffer(os.pread(fd, count * dtype.itemsize, offset), dtype=dtype).reshape(shape)
        # Mapped afresh for each use and unmapped when dropped: touched pages do not pile up in RSS.
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)

    def _path(self, tensor: onnx.TensorProto, info: dict) -> Path:
        location = info["location"]
        path = self._paths.get(location)
        if path is None:
            if self.base_dir is None:
                raise BnfoldError(f"tensor '{tensor.name}' has external data but the model has no folder")
            path = self._paths[location] = self.base_dir / location
        return path

    def defer(self, tensor: onnx.TensorProto, value: Deferred) -> None:
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        del tensor.dims[:]
        tensor.dims.extend(value.shape)
        set_location(tensor, PENDING)
        self.deferred[tensor.name] = value
        self.inline_refs.discard(tensor.name)

    def chunks(self, tensor: onnx.TensorProto) -> Iterator[memoryview]:
        """The tensor's little-endian bytes, in pieces of at most CHUNK bytes."""
        info = external_location(tensor)
        if info is None or info.get("location") == PENDING:
            array = np.ascontiguousarray(self(tensor))
            view = memoryview(array.reshape(-1).view(np.uint8))
            for start in range(0, len(view), CHUNK):
                yield view[start:start + CHUNK]
            return
        path, offset = self._path(tensor, info), int(info.get("offset", 0))
        length = int(info.get("length") or _nbytes(tensor))
        with open(path, "rb") as f:
            f.seek(offset)
            while length > 0:
                block = f.read(min(CHUNK, length))
                if not block:
                    raise BnfoldError(f"external data file {path} ended early")
                yield memoryview(block)
                length -= len(block)

    def write_to(self, tensor: onnx.TensorProto, out) -> int:
        """Append the tensor's bytes to the unbuffered file ``out``; returns how many. Unchanged bytes of
        a file are copied by the kernel (copy_file_range) where it can, never through Python."""
        info = external_location(tensor)
        if info is not None and info.get("location") != PENDING and hasattr(os, "copy_file_range"):
            path, offset = self._path(tensor, info), int(info.get("offset", 0))
            length = int(info.get("length") or _nbytes(tensor))
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            done = 0
            try:
                while done < length:
                    n = os.copy_file_range(fd, out.fileno(), length - done, offset + done)
                    if n == 0:
                        raise BnfoldError(f"external data file {path} ended early")
                    done += n
                return done
            except OSError:
                if done:  # the output already holds part of it: carry on from there in Python
                    raise
        written = 0
        for chunk in self.chunks(tensor):
            written += _write_all(out, chunk)
        return written

    def materialize(self, model: onnx.ModelProto, everything: bool = False) -> None:
        """Give deferred tensors, and those read from the input file, their bytes inline (so the model
        stands on its own); ``everything`` also brings in external data files."""
        for t in initializers(model):
            info = external_location(t)
            if info is None:
                continue
            if everything or info.get("location") == PENDING or t.name in self.inline_refs:
                raw = b"".join(bytes(c) for c in self.chunks(t))
                del t.external_data[:]
                t.ClearField("data_location")
                t.raw_data = raw
        self.inline_refs.clear()
        self.deferred.clear()


# -- loading ------------------------------------------------------------------------------------

def file_size(path: Path, model: onnx.ModelProto) -> int:
    """Bytes of a model file and its external data files."""
    return path.stat().st_size + sum(f.stat().st_size for f in data_files(model, path.parent) if f != path.resolve())


def check_external(model: onnx.ModelProto, base_dir: Path) -> None:
    sizes: Dict[str, int] = {}
    for t in initializers(model):
        info = external_location(t)
        if info is None:
            continue
        location = info.get("location", "")
        if location not in sizes:
            path = base_dir / location
            sizes[location] = path.stat().st_size if location and path.is_file() else -1
        if sizes[location] < 0:
            raise BnfoldError(f"external data file {base_dir / location} for tensor '{t.name}' is missing")
        if sizes[location] < int(info.get("offset", 0)) + _nbytes(t):
            raise BnfoldError(f"external data file {base_dir / location} is too short for tensor '{t.name}'")


def _parse(path: Path) -> Tuple[onnx.ModelProto, Set[str]]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise DecodeError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            stripped, refs = _strip_raw_data(buf)  # indexing an mmap exports no buffer
    model = onnx.ModelProto.FromString(stripped)
    inline: Set[str] = set()
    for tensor, ref in zip(model.graph.initializer, refs):
        if ref is not None:
            set_location(tensor, path.name, *ref)
            inline.add(tensor.name)
    return model, inline


def load(path: PathLike) -> onnx.ModelProto:
    """Read a model's graph; large weights stay in their files (see :func:`open_model`)."""
    return open_model(path)[0]


def open_model(path: PathLike) -> Tuple[onnx.ModelProto, Source]:
    """The model's graph and the :class:`Source` its weights are read from."""
    path = Path(path)
    if not path.exists():
        raise BnfoldError(f"{path}: no such file")
    if path.is_dir():
        raise BnfoldError(f"{path}: is a folder, not an ONNX file")
    try:
        model, inline = _parse(path)
    except (DecodeError, RuntimeError, ValueError, OSError, IndexError) as exc:
        raise BnfoldError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    if not model.HasField("graph") or not model.opset_import:
        raise BnfoldError(f"{path}: not an ONNX model (no graph or no opset)")
    newest = onnx.defs.onnx_opset_version()
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version > newest:
            raise BnfoldError(
                f"{path}: uses opset {o.version}, newer than the installed onnx {onnx.__version__} understands "
                f"({newest}); upgrade onnx (pip install -U onnx)"
            )
    check_external(model, path.parent)
    return model, Source(path.parent, inline)


# -- saving -------------------------------------------------------------------------------------

def approx_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensors that would be inline: what decides whether a model fits in one protobuf
    (2 GB), without paying for ByteSize() (which serializes the whole model)."""
    total = 0
    for t in initializers(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += _nbytes(t)
        elif t.HasField("raw_data"):
            total += len(t.raw_data)
        else:
            total += int(np.prod(t.dims, dtype=np.int64)) * 8
    return total


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp(path: Path, written: List[str]):
    """A new temporary file beside ``path`` (recorded in ``written``), open for unbuffered writing,
    with the mode a newly created file would get. It is written through the descriptor mkstemp
    opened: reopening with truncation would make ext4 flush the whole file on close."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    written.append(tmp)
    os.fchmod(fd, 0o666 & ~_umask())
    return os.fdopen(fd, "wb", buffering=0), tmp


def _externalize(model: onnx.ModelProto, source: Source, data_path: Path, out) -> None:
    """Move every large tensor to ``out`` (the data file), in model order."""
    offset = 0
    for t in initializers(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            length = source.write_to(t, out)
        else:
            if not t.HasField("raw_data"):
                if _nbytes(t) < EXTERNAL_THRESHOLD or t.data_type == onnx.TensorProto.STRING:
                    continue
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
            if len(t.raw_data) < EXTERNAL_THRESHOLD:
                continue
            length = _write_all(out, t.raw_data)
        set_location(t, data_path.name, offset, length)
        offset += length
    source.inline_refs.clear()
    source.deferred.clear()


def _copy_fields(src, dst, skip: str) -> None:
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _write_inline(model: onnx.ModelProto, source: Source, f) -> None:
    """Serialize ``model`` with every main-graph tensor's bytes spliced in from its source, so that
    no weight is copied into protobuf (field order does not matter to a protobuf parser)."""
    graph = model.graph
    bodies = itertools.islice(graphs_of(graph), 1, None)  # only main-graph tensors are spliced
    if any(t.data_location == onnx.TensorProto.EXTERNAL for g in bodies for t in g.initializer):
        source.materialize(model, everything=True)
    skeleton, graph_skeleton = onnx.ModelProto(), onnx.GraphProto()
    _copy_fields(model, skeleton, "graph")
    _copy_fields(graph, graph_skeleton, "initializer")
    entries = []  # (header bytes, tensor or None, payload length)
    for t in graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            body = t.SerializeToString()
            entries.append((_key(5) + _varint(len(body)) + body, None, 0))
            continue
        meta = onnx.TensorProto()
        _copy_fields(t, meta, "external_data")
        meta.ClearField("data_location")
        head = meta.SerializeToString()
        length = _nbytes(t)
        head += _key(9) + _varint(length)
        entries.append((_key(5) + _varint(len(head) + length) + head, t, length))
    graph_bytes = graph_skeleton.SerializeToString()
    graph_len = len(graph_bytes) + sum(len(h) + n for h, _, n in entries)
    _write_all(f, skeleton.SerializeToString())
    _write_all(f, _key(7) + _varint(graph_len))
    _write_all(f, graph_bytes)
    for head, tensor, _ in entries:
        _write_all(f, head)
        if tensor is not None:
            source.write_to(tensor, f)


def save(model: onnx.ModelProto, path: PathLike, *, source: Optional[Source] = None,
         external: Optional[bool] = None) -> int:
    """Write ``model`` to ``path`` atomically (temporary files in the same folder, then renames).

    ``external`` None chooses: external data when the model already has some (beyond the input
    file's own inline weights) or would pass 2 GB. External data goes to one file beside the output,
    named after it (``OUT.onnx.data``). Returns the bytes written (model and data file)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise BnfoldError(f"{path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise BnfoldError(f"{path}: cannot write in folder {path.parent} (permission denied)")
    source = source or Source(None)
    has_external = any(
        (loc := external_location(t)) is not None and loc.get("location") != PENDING and t.name not in source.inline_refs
        for t in initializers(model)
    )
    if external is None:
        external = has_external or approx_bytes(model) > TWO_GB - (64 << 20)
    if not external and approx_bytes(model) > TWO_GB - (64 << 20):
        raise BnfoldError(f"{path}: the model is over 2 GB and must be written with external data")
    data_path = path.with_name(path.name + ".data")
    written: List[str] = []
    try:
        tmp_data = None
        if external:
            out, tmp_data = _temp(data_path, written)
            with out:  # unbuffered: kernel copies append at the file's position
                _externalize(model, source, data_path, out)
        f, tmp = _temp(path, written)
        with f:
            if external:
                _write_all(f, model.SerializeToString())
            else:
                _write_inline(model, source, f)
        if tmp_data:
            os.replace(tmp_data, data_path)
        os.replace(tmp, path)
    except BaseException:
        for name in written:
            if os.path.exists(name):
                os.unlink(name)
        raise
    return path.stat().st_size + (data_path.stat().st_size if external else 0)
