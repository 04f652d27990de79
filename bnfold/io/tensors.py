"""Where tensor values come from: inline bytes, external data files confined to the model's
folder, or a computation deferred to write time."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx

from ..errors import BnfoldError
from ..graph import Deferred, Value
from ..proto import (
    external_location,
    fill,
    initializers,
    np_dtype,
    set_location,
    tensor_nbytes,
    tensor_type,
    to_array,
)

CHUNK = 16 << 20
SMALL = 1 << 20  # file-backed tensors below this are read with one pread; larger ones into an array
PENDING = "bnfold:deferred"  # external_data location of a tensor computed at write time


@dataclass(frozen=True)
class Location:
    """A validated external-data location: a regular file inside the model's folder, and a byte
    range that lies inside it."""

    path: Path
    offset: int
    length: int


def _int_field(info: dict[str, str], key: str, tensor: str) -> int | None:
    text = info.get(key)
    if text is None or text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise BnfoldError(f"tensor '{tensor}': external data {key} '{text}' is not an integer") from None
    if value < 0:
        raise BnfoldError(f"tensor '{tensor}': external data {key} {value} is negative")
    return value


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


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
        raise BnfoldError(f"{path}: not a regular file" + (f" ({what})" if what else ""))
    return st


def locate(tensor: onnx.TensorProto, base_dir: Path, *, model_file: Path | None = None) -> Location:
    """Validate where a file-backed tensor's bytes are, the way onnx's loader does, and stricter:
    a relative path without '..', that stays inside ``base_dir`` once links are resolved, naming a
    regular file with one link (the model file itself, where its own large weights are, may have
    more), whose size holds ``offset + length`` bytes. Raises BnfoldError."""
    info = external_location(tensor) or {}
    name = tensor.name
    location = info.get("location", "")
    if not location or "\0" in location:
        raise BnfoldError(f"tensor '{name}': external data has no usable location")
    parts = location.replace("\\", "/").split("/")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise BnfoldError(
            f"tensor '{name}': external data location '{location}' is absolute; "
            "only paths inside the model's folder are read"
        )
    if ".." in parts:
        raise BnfoldError(f"tensor '{name}': external data location '{location}' climbs out of the model's folder")
    folder = base_dir.resolve()
    path = base_dir / location
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise BnfoldError(f"external data file {path} for tensor '{name}' is missing") from None
    if not _inside(real, folder):
        raise BnfoldError(f"tensor '{name}': external data '{location}' leads out of the model's folder (a link)")
    st = regular_file(real, f"external data (of tensor '{name}', location '{location}')")
    if st.st_nlink > 1 and (model_file is None or real != model_file.resolve()):
        raise BnfoldError(
            f"tensor '{name}': external data file '{location}' has other hard links, which may lie "
            "outside the model's folder; copy it (cp) to read it"
        )
    offset = _int_field(info, "offset", name) or 0
    try:
        needed = tensor_nbytes(tensor)
    except ValueError as exc:
        raise BnfoldError(f"tensor '{name}': {exc}") from None
    length = _int_field(info, "length", name)
    if length is not None and length != needed:
        raise BnfoldError(
            f"tensor '{name}': external data length {length} disagrees with its shape and type ({needed} bytes)"
        )
    if offset + needed > st.st_size:
        raise BnfoldError(
            f"external data file {path} is too short for tensor '{name}' "
            f"(needs bytes {offset} to {offset + needed}, has {st.st_size})"
        )
    return Location(real, offset, needed)


def _inline(tensor: onnx.TensorProto, model_file: Path) -> Location:
    """Where an inline tensor's bytes lie in the model file itself (found by the wire scan): the file
    the user named, a link to it followed; no location string of the model's own is read."""
    info = external_location(tensor) or {}
    offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
    real = model_file.resolve()
    if offset + length > regular_file(real).st_size:
        raise BnfoldError(f"{model_file}: changed while it was read (it is shorter now)")
    return Location(real, offset, length)


def _write_all(f: BinaryIO, data: bytes | memoryview) -> int:
    """Write everything to an unbuffered file (a raw write may take only part of it)."""
    view, done = memoryview(data), 0
    while done < len(view):
        done += f.write(view[done:])
    return done


class Source:
    """Turns initializers into numpy arrays: inline ones parsed, file-backed ones read with explicit
    reads (a memory map of a file that shrinks kills the process with SIGBUS; a short read is an error) (never
    read whole, never cached here), deferred ones computed. Implements :class:`graph.TensorStore`."""

    def __init__(
        self, base_dir: Path | None, inline_refs: set[str] | None = None, model_file: Path | None = None
    ) -> None:
        self.base_dir = base_dir
        self.model_file = model_file
        self.inline_refs = inline_refs or set()  # tensors that live inside the input .onnx file
        self.deferred: dict[str, Deferred] = {}
        self._locations: dict[tuple[str, ...], Location] = {}
        self._fds: dict[Path, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()

    def _pending(self, tensor: onnx.TensorProto) -> bool:
        info = external_location(tensor)
        return info is not None and info.get("location") == PENDING and tensor.name in self.deferred

    def location(self, tensor: onnx.TensorProto) -> Location:
        """The validated location of a file-backed tensor (BnfoldError when it is not acceptable)."""
        key = (tensor.name, *(f"{e.key}={e.value}" for e in tensor.external_data))
        loc = self._locations.get(key)
        if loc is None:
            if self.base_dir is None:
                raise BnfoldError(f"tensor '{tensor.name}' has external data but the model has no folder")
            if tensor.name in self.inline_refs and self.model_file is not None:
                loc = _inline(tensor, self.model_file)  # the file the user named, wherever a link leads
            else:
                loc = locate(tensor, self.base_dir, model_file=self.model_file)
            self._locations[key] = loc
        return loc

    def files(self) -> set[Path]:
        """The resolved paths of the data files of every location validated so far (all of them once
        the model is opened: :func:`.load.check_tensors`)."""
        return {loc.path for loc in self._locations.values()}

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    # -- TensorStore ---------------------------------------------------------------------------
    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            try:
                return to_array(tensor)
            except Exception as exc:  # onnx raises several types for values that do not fit the dims
                raise BnfoldError(
                    f"tensor '{tensor.name}': its values do not match its type and dims ({type(exc).__name__})"
                ) from None
        if self._pending(tensor):
            return self.deferred[tensor.name].compute()
        loc, dtype, shape = self.location(tensor), np_dtype(tensor.data_type), tuple(tensor.dims)
        if 0 < loc.length < SMALL:
            data = os.pread(self._fd(loc.path), loc.length, loc.offset)
            if len(data) != loc.length:
                raise BnfoldError(f"{loc.path}: changed while it was read (it ended early)")
            return np.frombuffer(data, dtype=dtype).reshape(shape)
        return _map(loc, dtype, shape)

    def write(self, tensor: onnx.TensorProto, value: Value) -> None:
        name = tensor.name
        self.inline_refs.discard(name)
        if isinstance(value, np.ndarray):
            fill(tensor, value)
            self.deferred.pop(name, None)
            return
        tensor.data_type = tensor_type(value.dtype)
        del tensor.dims[:]
        tensor.dims.extend(value.shape)
        set_location(tensor, PENDING)
        self.deferred[name] = value

    def snapshot(self, tensor: onnx.TensorProto) -> Callable[[], np.ndarray]:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            value = self.read(tensor)
            return lambda: value
        if self._pending(tensor):
            return self.deferred[tensor.name].compute
        loc, dtype, shape = self.location(tensor), np_dtype(tensor.data_type), tuple(tensor.dims)
        return lambda: _map(loc, dtype, shape)

    # -- bytes out -----------------------------------------------------------------------------
    def is_file_backed(self, tensor: onnx.TensorProto) -> bool:
        return tensor.data_location == onnx.TensorProto.EXTERNAL and not self._pending(tensor)

    def chunks(self, tensor: onnx.TensorProto) -> Iterator[memoryview]:
        """The tensor's little-endian bytes, in pieces of at most CHUNK bytes."""
        if not self.is_file_backed(tensor):
            array = np.ascontiguousarray(self.read(tensor))
            view = memoryview(array.reshape(-1).view(np.uint8).data)
            for start in range(0, len(view), CHUNK):
                yield view[start : start + CHUNK]
            return
        loc = self.location(tensor)
        length = loc.length
        with open(loc.path, "rb") as f:
            f.seek(loc.offset)
            while length > 0:
                block = f.read(min(CHUNK, length))
                if not block:
                    raise BnfoldError(f"external data file {loc.path} ended early")
                yield memoryview(block)
                length -= len(block)

    def write_to(self, tensor: onnx.TensorProto, out: BinaryIO) -> int:
        """Append the tensor's bytes to the unbuffered file ``out``; returns how many. Unchanged bytes of
        a file are copied by the kernel (copy_file_range) where it can, never through Python."""
        if self.is_file_backed(tensor) and hasattr(os, "copy_file_range"):
            loc = self.location(tensor)
            fd, done = self._fd(loc.path), 0
            try:
                while done < loc.length:
                    n = os.copy_file_range(fd, out.fileno(), loc.length - done, loc.offset + done)
                    if n == 0:
                        raise BnfoldError(f"external data file {loc.path} ended early")
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
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            if everything or self._pending(t) or t.name in self.inline_refs:
                raw = b"".join(bytes(c) for c in self.chunks(t))
                del t.external_data[:]
                t.ClearField("data_location")
                t.raw_data = raw
        self.inline_refs.clear()
        self.deferred.clear()
        self._locations.clear()


def _map(loc: Location, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor's bytes, read afresh for each use (nothing is cached here) with explicit reads: a
    file that is shorter than when it was opened is a BnfoldError, where touching a memory map of it
    would end the process with SIGBUS."""
    if loc.length == 0:
        return np.zeros(shape, dtype)
    out = np.empty(loc.length, np.uint8)
    view, done = out.data, 0
    with open(loc.path, "rb", buffering=0) as f:
        f.seek(loc.offset)
        while done < loc.length:
            n = f.readinto(view[done : done + CHUNK])
            if not n:
                raise BnfoldError(f"{loc.path}: changed while it was read (it ended early)")
            done += n
    return out.view(dtype).reshape(shape)
