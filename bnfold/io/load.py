"""Reading a model's graph; large weights stay in their files.

Large inline tensors are located by a scan of the protobuf wire format (:mod:`.wire`) and become
references into the input file itself, like external data, so they are never parsed into protobuf.
Where the scan is unsure, the whole file is parsed by protobuf instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from ..errors import BnfoldError
from ..options import PathLike
from ..proto import (
    external_location,
    initializers,
    set_location,
)
from ..report import NOT_CHECKED
from .tensors import PENDING, Source, regular_file
from .wire import WireError, strip_raw_data

ModelLike = PathLike | onnx.ModelProto  # what the API takes as a model: a path or a proto
SCAN_BYTES = 64 << 20  # larger files are scanned, not parsed whole
LAZY_THRESHOLD = 4096  # inline tensors at least this large are read from the file only when needed


def file_size(path: Path, source: Source) -> int:
    """Bytes of a model file and its external data files (as opened: ``source`` has validated them)."""
    own = path.resolve()
    return path.stat().st_size + sum(f.stat().st_size for f in source.files() if f != own and f.is_file())


KNOWN_TYPES = frozenset(t for t in onnx.TensorProto.DataType.values() if t)


def check_tensors(model: onnx.ModelProto, source: Source | None = None) -> None:
    """Every initializer has a known element type and no negative dimension, and with ``source``
    every external location is validated (:func:`.tensors.locate`), in one pass, before anything is
    read. Whether inline bytes match is checked when they are read (:meth:`.tensors.Source.read`):
    most are never read."""
    for t in initializers(model):
        if t.data_type not in KNOWN_TYPES:
            raise BnfoldError(f"tensor '{t.name}': unknown element type {t.data_type}")
        dims = t.dims[:]  # a slice: a list at half the cost of iterating the field
        if dims and min(dims) < 0:
            raise BnfoldError(f"tensor '{t.name}': negative dimension in {dims}")
        if source is not None and t.data_location == onnx.TensorProto.EXTERNAL:
            if (external_location(t) or {}).get("location") == PENDING and t.name not in source.deferred:
                raise BnfoldError(f"tensor '{t.name}': external data location '{PENDING}' is reserved")
            source.location(t)


def check_model(model: onnx.ModelProto, where: str, source: Source | None = None) -> None:
    """What bnfold needs of any model before deciding anything: a graph, a known opset, possible
    tensors (and with ``source``, acceptable external locations). BnfoldError (a bad model) otherwise."""
    if not model.HasField("graph") or not model.opset_import:
        raise BnfoldError(f"{where}: not an ONNX model (no graph or no opset)")
    newest = onnx.defs.onnx_opset_version()
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version > newest:
            raise BnfoldError(
                f"{where}: uses opset {o.version}, newer than the installed onnx {onnx.__version__} understands "
                f"({newest}); upgrade onnx (pip install -U onnx)"
            )
    check_tensors(model, source)


class FileChanged(OSError):
    """The file is shorter than it was when it was opened: another program is writing it."""


class FileBytes:
    """A file's bytes by index and by slice, read with pread through a window of WINDOW bytes: what
    the wire scan needs of a large model, without a memory map (touching the map of a file that
    shrinks meanwhile ends the process with SIGBUS; a short read here is :class:`FileChanged`)."""

    WINDOW = 1 << 20

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.start, self.block = 0, b""

    def __len__(self) -> int:
        return self.size

    def read(self, start: int, count: int) -> bytes:
        data = os.pread(self.fd, count, start)
        if len(data) != count:
            raise FileChanged("the file changed while it was read")
        return data

    def _window(self, start: int, stop: int) -> bool:
        """Make bytes [start, stop) part of the window where they fit in one."""
        if self.start <= start and stop <= self.start + len(self.block):
            return True
        if stop - start > self.WINDOW:
            return False
        self.start, self.block = start, self.read(start, min(self.WINDOW, self.size - start))
        return True

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            start, stop, _ = key.indices(self.size)
            if stop <= start:
                return b""
            if not self._window(start, stop):
                return self.read(start, stop - start)
            return self.block[start - self.start : stop - self.start]
        if not 0 <= key < self.size:
            raise IndexError(key)
        self._window(key, key + 1)
        return self.block[key - self.start]


def parse(path: Path) -> tuple[onnx.ModelProto, set[str]]:
    """The model, and the names of the initializers whose bytes were left in the file. Files up to
    SCAN_BYTES are parsed whole by protobuf; larger ones are scanned so that their large weights
    stay in the file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise DecodeError("empty file")
        buf = FileBytes(f.fileno(), size)
        if size <= SCAN_BYTES:
            return onnx.ModelProto.FromString(buf.read(0, size)), set()
        try:
            stripped, refs = strip_raw_data(buf, LAZY_THRESHOLD)  # type: ignore[arg-type]
        except WireError:
            return onnx.ModelProto.FromString(buf.read(0, size)), set()
        model = onnx.ModelProto.FromString(stripped)
        if len(refs) != len(model.graph.initializer):  # the scan and protobuf disagree: trust protobuf
            return onnx.ModelProto.FromString(buf.read(0, size)), set()
    inline: set[str] = set()
    for tensor, ref in zip(model.graph.initializer, refs, strict=False):
        if ref is not None:
            set_location(tensor, path.name, *ref)
            inline.add(tensor.name)
    return model, inline


def open_model(path: PathLike) -> tuple[onnx.ModelProto, Source]:
    """The model's graph and the :class:`Source` its weights are read from."""
    path = Path(path)
    regular_file(path)
    try:
        model, inline = parse(path)
    except FileChanged:
        raise BnfoldError(
            f"{path}: changed while it was read (it is shorter now); read it again once it is complete"
        ) from None
    except (DecodeError, RuntimeError, ValueError, OSError, IndexError) as exc:
        raise BnfoldError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    source = Source(path.parent, inline, path)
    check_model(model, str(path), source)
    return model, source


def load(path: PathLike) -> onnx.ModelProto:
    """Read a model's graph; large weights stay in their files (see :func:`open_model`)."""
    return open_model(path)[0]


CHECKER_LIMIT = 1 << 31  # onnx's checker takes a proto up to 2 GB; a file of any size


def checker_problem(model: Path | onnx.ModelProto) -> str | None:
    """What ``onnx.checker.check_model(full_check=True)`` says of a model file or proto: None when it
    passes, else the first line of its message."""
    if isinstance(model, onnx.ModelProto) and model.ByteSize() >= CHECKER_LIMIT:
        return NOT_CHECKED + "it is over 2 GB in memory (give an output path to check the file)"
    try:
        onnx.checker.check_model(str(model) if isinstance(model, Path) else model, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError, and ValueError for protos over 2 GB
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        text = lines[0] if lines else type(exc).__name__
        return text if len(text) <= 300 else text[:297] + "..."
    return None
