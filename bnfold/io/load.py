"""Reading a model's graph; large weights stay in their files.

Large inline tensors are located by a scan of the protobuf wire format (:mod:`.wire`) and become
references into the input file itself, like external data, so they are never parsed into protobuf.
Where the scan is unsure, the whole file is parsed by protobuf instead.
"""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path
from typing import Dict, List, Set, Tuple, Union

import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from ..errors import BnfoldError
from ..proto import (
    all_nodes,
    external_location,
    initializers,
    model_graphs,
    np_dtype,
    set_location,
    tensor_nbytes,
)
from .tensors import PENDING, Source, data_files
from .wire import WireError, strip_raw_data

PathLike = Union[str, "os.PathLike[str]"]
LAZY_THRESHOLD = 4096  # inline tensors at least this large are read from the file only when needed


def regular_file(path: Path, what: str = "") -> os.stat_result:
    """The file's status, when it is a regular file (a FIFO would block, a folder is no model)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BnfoldError(f"{path}: no such file") from None
    except OSError as exc:
        raise BnfoldError(f"{path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise BnfoldError(f"{path}: is a folder, not {what or 'an ONNX file'}")
    if not stat.S_ISREG(st.st_mode):
        raise BnfoldError(f"{path}: not a regular file")
    return st


def file_size(path: Path, model: onnx.ModelProto) -> int:
    """Bytes of a model file and its external data files."""
    own = path.resolve()
    return path.stat().st_size + sum(
        f.stat().st_size for f in data_files(model, path.parent) if f != own and f.is_file()
    )


def check_external(model: onnx.ModelProto, source: Source) -> None:
    """Every external location is validated before anything is read (see :func:`.tensors.locate`)."""
    seen: Dict[str, None] = {}
    for t in initializers(model):
        info = external_location(t)
        if info is None:
            continue
        if info.get("location") == PENDING and t.name not in source.deferred:
            raise BnfoldError(f"tensor '{t.name}': external data location '{PENDING}' is reserved")
        seen.setdefault(t.name)
        source.location(t)


def check_tensor(tensor: onnx.TensorProto) -> None:
    """A tensor's declared type and shape agree with the bytes it holds (BnfoldError otherwise), so
    that nothing later meets an impossible tensor."""
    name = tensor.name
    try:
        np_dtype(tensor.data_type)
        nbytes = tensor_nbytes(tensor)
    except ValueError as exc:
        raise BnfoldError(f"tensor '{name}': {exc}") from None
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type == onnx.TensorProto.STRING:
        return
    if tensor.HasField("raw_data"):
        if len(tensor.raw_data) != nbytes:
            raise BnfoldError(f"tensor '{name}': {len(tensor.raw_data)} bytes of raw_data for dims "
                              f"{list(tensor.dims)} of {onnx.TensorProto.DataType.Name(tensor.data_type)} ({nbytes} bytes)")
        return
    try:
        numpy_helper.to_array(tensor)
    except Exception as exc:  # onnx raises several types for values that do not match the dims
        raise BnfoldError(f"tensor '{name}': its values do not match its type and dims ({type(exc).__name__})") from None


def check_tensors(model: onnx.ModelProto) -> None:
    """Every initializer of the model is a possible tensor."""
    for t in initializers(model):
        check_tensor(t)


def check_model(model: onnx.ModelProto, where: str) -> None:
    """What bnfold needs of any model before deciding anything: a graph, a known opset, possible
    tensors. BnfoldError (a bad model) otherwise."""
    if not model.HasField("graph") or not model.opset_import:
        raise BnfoldError(f"{where}: not an ONNX model (no graph or no opset)")
    newest = onnx.defs.onnx_opset_version()
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version > newest:
            raise BnfoldError(
                f"{where}: uses opset {o.version}, newer than the installed onnx {onnx.__version__} understands "
                f"({newest}); upgrade onnx (pip install -U onnx)"
            )
    if not _names_are_text(model):
        raise BnfoldError(f"{where}: a name in the model is not valid UTF-8")
    check_tensors(model)


def _names_are_text(model: onnx.ModelProto) -> bool:
    """Protobuf hands back a string field that is not valid UTF-8 as bytes, and refuses it when it
    is written back: such a model would fail halfway through a rewrite."""
    values: List[object] = [o.domain for o in model.opset_import]
    for g in model_graphs(model):
        values.append(g.name)
        for seq in (g.input, g.output, g.value_info, g.initializer):
            values.extend(v.name for v in seq)
    for fn in model.functions:
        values.extend([fn.name, fn.domain, *fn.input, *fn.output, *fn.attribute])
    for node in all_nodes(model):
        values.extend([node.name, node.op_type, node.domain, *node.input, *node.output])
        values.extend(a.name for a in node.attribute)
    for t in initializers(model):
        values.extend(e.key for e in t.external_data)
        values.extend(e.value for e in t.external_data)
    return not any(isinstance(v, bytes) for v in values)


def parse(path: Path) -> Tuple[onnx.ModelProto, Set[str]]:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise DecodeError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                stripped, refs = strip_raw_data(buf, LAZY_THRESHOLD)  # type: ignore[arg-type]
            except WireError:
                return onnx.ModelProto.FromString(buf[:]), set()
    model = onnx.ModelProto.FromString(stripped)
    inline: Set[str] = set()
    if len(refs) != len(model.graph.initializer):  # the scan and protobuf disagree: trust protobuf
        return onnx.ModelProto.FromString(path.read_bytes()), set()
    for tensor, ref in zip(model.graph.initializer, refs):
        if ref is not None:
            set_location(tensor, path.name, *ref)
            inline.add(tensor.name)
    return model, inline


def open_model(path: PathLike) -> Tuple[onnx.ModelProto, Source]:
    """The model's graph and the :class:`Source` its weights are read from."""
    path = Path(path)
    regular_file(path)
    try:
        model, inline = parse(path)
    except (DecodeError, RuntimeError, ValueError, OSError, IndexError) as exc:
        raise BnfoldError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    check_model(model, str(path))
    source = Source(path.parent, inline, path)
    check_external(model, source)
    return model, source


def load(path: PathLike) -> onnx.ModelProto:
    """Read a model's graph; large weights stay in their files (see :func:`open_model`)."""
    return open_model(path)[0]
