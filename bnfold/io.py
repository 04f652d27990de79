"""Loading and saving models: clear errors for bad files, external weights read only when needed,
atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from .errors import BnfoldError

PathLike = Union[str, os.PathLike]


def external_location(tensor: onnx.TensorProto) -> Optional[dict]:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


class TensorLoader:
    """Turns initializers into numpy arrays; external data is memory-mapped, never read whole."""

    def __init__(self, base_dir: Optional[Path]) -> None:
        self.base_dir = base_dir

    def __call__(self, tensor: onnx.TensorProto) -> np.ndarray:
        info = external_location(tensor)
        if info is None:
            return numpy_helper.to_array(tensor)
        if self.base_dir is None:
            raise BnfoldError(f"tensor '{tensor.name}' has external data but the model has no folder")
        path = self.base_dir / info["location"]
        if not path.is_file():
            raise BnfoldError(f"external data file {path} for tensor '{tensor.name}' is missing")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        shape = tuple(tensor.dims)
        offset = int(info.get("offset", 0))
        count = int(np.prod(shape, dtype=np.int64))
        if path.stat().st_size < offset + count * dtype.itemsize:
            raise BnfoldError(f"external data file {path} is too short for tensor '{tensor.name}'")
        if count == 0:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


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
    return model


def save(model: onnx.ModelProto, path: PathLike) -> int:
    """Write ``model`` to ``path`` atomically (temporary file in the same folder, then rename).
    Returns the number of bytes written."""
    path = Path(path)
    data = model.SerializeToString()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent or "."))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(data)
