"""Loading and saving models: clear errors for bad files, external weights read only when needed
and streamed on save, atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Set, Union

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from .errors import BnfoldError
from .graph import subgraphs

PathLike = Union[str, os.PathLike]
TWO_GB = 2**31 - 1
EXTERNAL_THRESHOLD = 1024  # tensors at least this large go to the data file
CHUNK = 16 << 20


def external_location(tensor: onnx.TensorProto) -> Optional[dict]:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def initializers(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every initializer of the model, subgraphs included."""
    def walk(graph: onnx.GraphProto):
        yield from graph.initializer
        for node in graph.node:
            for g in subgraphs(node):
                yield from walk(g)
    yield from walk(model.graph)
    for fn in model.functions:
        for node in fn.node:
            for g in subgraphs(node):
                yield from walk(g)


def data_files(model: onnx.ModelProto, base_dir: Path) -> Set[Path]:
    return {(base_dir / loc["location"]).resolve() for t in initializers(model) if (loc := external_location(t))}


class TensorLoader:
    """Turns initializers into numpy arrays; external data is memory-mapped, never read whole."""

    def __init__(self, base_dir: Optional[Path]) -> None:
        self.base_dir = base_dir

    def __call__(self, tensor: onnx.TensorProto) -> np.ndarray:
        info = external_location(tensor)
        if info is None:
            return numpy_helper.to_array(tensor)
        path = self._path(tensor, info)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        shape = tuple(tensor.dims)
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=int(info.get("offset", 0)), shape=shape)

    def _path(self, tensor: onnx.TensorProto, info: dict) -> Path:
        if self.base_dir is None:
            raise BnfoldError(f"tensor '{tensor.name}' has external data but the model has no folder")
        return self.base_dir / info["location"]


def check_external(model: onnx.ModelProto, base_dir: Path) -> None:
    for t in initializers(model):
        info = external_location(t)
        if info is None:
            continue
        path = base_dir / info.get("location", "")
        if not info.get("location") or not path.is_file():
            raise BnfoldError(f"external data file {path} for tensor '{t.name}' is missing")
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        need = int(info.get("offset", 0)) + int(np.prod(t.dims, dtype=np.int64)) * itemsize
        if path.stat().st_size < need:
            raise BnfoldError(f"external data file {path} is too short for tensor '{t.name}'")


def load(path: PathLike) -> onnx.ModelProto:
    """Read a model without its external data (that is read on demand through :class:`TensorLoader`)."""
    path = Path(path)
    if not path.exists():
        raise BnfoldError(f"{path}: no such file")
    if path.is_dir():
        raise BnfoldError(f"{path}: is a folder, not an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
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
    return model


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp(path: Path) -> str:
    """A temporary file beside ``path``, with the mode a newly created file would get."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return tmp


def _copy_range(src: Path, offset: int, length: int, dst) -> None:
    with open(src, "rb") as f:
        f.seek(offset)
        while length > 0:
            block = f.read(min(CHUNK, length))
            if not block:
                raise BnfoldError(f"external data file {src} ended early")
            dst.write(block)
            length -= len(block)


def _externalize(model: onnx.ModelProto, source_dir: Optional[Path], data_path: Path, out) -> None:
    """Write every large tensor to ``out`` (the data file), in model order; unchanged external
    tensors are copied from their source file in bounded chunks, never loaded whole."""
    offset = 0
    for t in initializers(model):
        info = external_location(t)
        if info is not None:
            src = (source_dir or Path(".")) / info["location"]
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            length = int(info.get("length", int(np.prod(t.dims, dtype=np.int64)) * itemsize))
            _copy_range(src, int(info.get("offset", 0)), length, out)
        else:
            if not t.HasField("raw_data"):
                if int(np.prod(t.dims, dtype=np.int64)) * 4 < EXTERNAL_THRESHOLD or t.data_type == onnx.TensorProto.STRING:
                    continue
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
            if len(t.raw_data) < EXTERNAL_THRESHOLD:
                continue
            length = len(t.raw_data)
            out.write(t.raw_data)
            t.ClearField("raw_data")
        del t.external_data[:]
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        offset += length


def _internalize(model: onnx.ModelProto, source_dir: Optional[Path]) -> None:
    loader = TensorLoader(source_dir)
    for t in initializers(model):
        if external_location(t) is not None:
            t.CopyFrom(numpy_helper.from_array(np.array(loader(t)), t.name))


def save(model: onnx.ModelProto, path: PathLike, *, source_dir: Optional[Path] = None,
         external: Optional[bool] = None) -> int:
    """Write ``model`` to ``path`` atomically (temporary files in the same folder, then renames).

    ``external`` None chooses: external data when the model already has some or would pass 2 GB.
    External data goes to one file beside the output, named after it (``OUT.onnx.data``).
    Returns the bytes written (model and data file)."""
    path = Path(path)
    has_external = any(external_location(t) is not None for t in initializers(model))
    if external is None:
        external = has_external or model.ByteSize() > TWO_GB
    written: List[str] = []
    try:
        if external:
            data_path = path.with_name(path.name + ".data")
            tmp_data = _temp(data_path)
            written.append(tmp_data)
            with open(tmp_data, "wb") as out:
                _externalize(model, source_dir, data_path, out)
        else:
            if has_external:
                _internalize(model, source_dir)
            if model.ByteSize() > TWO_GB:
                raise BnfoldError(f"{path}: the model is over 2 GB and must be written with external data")
        tmp = _temp(path)
        written.append(tmp)
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString())
        if external:
            os.replace(tmp_data, data_path)
        os.replace(tmp, path)
    except BaseException:
        for name in written:
            if os.path.exists(name):
                os.unlink(name)
        raise
    size = path.stat().st_size
    if external:
        size += path.with_name(path.name + ".data").stat().st_size
    return size
