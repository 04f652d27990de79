"""Writing a model once, atomically: unchanged tensors are copied from their source file in bounded
chunks (by the kernel where it can), deferred ones are computed one at a time, whether the output is
inline or external."""

from __future__ import annotations

import fcntl
import itertools
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx

from ..errors import BnfoldError
from ..options import PathLike
from ..proto import external_location, from_array, graphs_of, initializers, set_location, tensor_nbytes, to_array
from .load import parse
from .tensors import Source, _write_all
from .wire import key, varint

TWO_GB = 2**31 - 1
EXTERNAL_THRESHOLD = 1024  # tensors at least this large go to the data file


def located_and_bytes(model: onnx.ModelProto) -> tuple[list[onnx.TensorProto], int]:
    """The initializers with an external location, and the bytes of every tensor if all were
    inline: what decides whether a model fits in one protobuf (2 GB), without paying for
    ByteSize() (which serializes the whole model). One pass over the initializers."""
    located, total = [], 0
    for t in initializers(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            located.append(t)
            total += tensor_nbytes(t)
        elif t.HasField("raw_data"):
            total += len(t.raw_data)
        else:
            total += int(np.prod(t.dims, dtype=np.int64)) * 8
    return located, total


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp(path: Path, written: list[str], buffering: int = 0) -> tuple[BinaryIO, str]:
    """A new temporary file beside ``path`` (recorded in ``written``), open for writing (unbuffered
    unless ``buffering`` says otherwise), with the mode a newly created file would get. It is written
    through the descriptor mkstemp opened: reopening with truncation would make ext4 flush the whole
    file on close. The name is short, whatever the length of ``path``'s."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:32]}.", suffix=".tmp", dir=str(path.parent))
    written.append(tmp)
    os.fchmod(fd, 0o666 & ~_umask())
    return os.fdopen(fd, "wb", buffering=buffering), tmp


def _remove(names: list[str]) -> None:
    """Remove what a failed write left (best effort: the failure itself is what gets reported)."""
    for name in names:
        try:
            os.unlink(name)
        except OSError:
            pass


def not_written(path: Path, exc: OSError) -> BnfoldError:
    """A failure of the environment while writing (a full disk, a name too long, no permission, a
    failed rename): the user's to fix, said in one line."""
    return BnfoldError(f"{path}: not written ({exc.strerror or type(exc).__name__}); nothing was left behind")


def check_destination(path: Path, protected: Iterable[Path] = (), what: str = "the output") -> None:
    """Refuse (BnfoldError) to write ``path`` where it would be a folder, an existing file that is
    not a regular file (a FIFO, a device: a link is replaced, never written through), in a folder
    that does not exist or cannot be written, or one of ``protected`` (resolved paths: the input
    models and their data files), a link to one included."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise BnfoldError(f"{path}: cannot use as {what} ({exc.strerror})") from None
    if path.is_dir():
        raise BnfoldError(f"{path}: is a folder; name a file for {what}")
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise BnfoldError(f"{path}: exists and is not a regular file; name a file for {what}")
    if not path.parent.is_dir():
        raise BnfoldError(f"{path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise BnfoldError(f"{path}: cannot write in folder {path.parent} (permission denied)")
    if path.resolve() in set(protected):
        raise BnfoldError(f"{path}: is an input model or one of its data files; choose another path for {what}")


@contextmanager
def atomic_file(path: Path, buffering: int = 1 << 20) -> Iterator[BinaryIO]:
    """A file (buffered unless ``buffering`` is 0) that becomes ``path`` only once everything was
    written to it and synced (a temporary file beside it, renamed over it); on any failure nothing is
    left and ``path`` is as it was. Failures of the environment become BnfoldError."""
    written: list[str] = []
    try:
        f, tmp = _temp(path, written, buffering=buffering)
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        written.clear()
    except OSError as exc:
        raise not_written(path, exc) from None
    finally:
        _remove(written)
    _fsync_dir(path.parent)


@contextmanager
def _folder_locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (flock on the folder itself: no file is made): two runs
    writing one output choose its data file name, rename and clean up one after the other, so that
    the model left there is always one run's, with its own data."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks: as before, unserialized
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _externalize(model: onnx.ModelProto, source: Source, data_path: Path, out: BinaryIO) -> None:
    """Move every large tensor to ``out`` (the data file), in model order."""
    offset = 0
    for t in initializers(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            length = source.write_to(t, out)
        else:
            if not t.HasField("raw_data"):
                if tensor_nbytes(t) < EXTERNAL_THRESHOLD or t.data_type == onnx.TensorProto.STRING:
                    continue
                t.CopyFrom(from_array(to_array(t), t.name))
            if len(t.raw_data) < EXTERNAL_THRESHOLD:
                continue
            length = _write_all(out, t.raw_data)
        set_location(t, data_path.name, offset, length)
        offset += length
    source.inline_refs.clear()
    source.deferred.clear()


def _copy_fields(src: Any, dst: Any, skip: str) -> None:
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


def _write_inline(model: onnx.ModelProto, source: Source, f: BinaryIO, splice: bool) -> None:
    """Serialize ``model`` with every main-graph tensor's bytes spliced in from its source, so that
    no weight is copied into protobuf (field order does not matter to a protobuf parser).
    ``splice`` False: no tensor of the model is file-backed or deferred, nothing to splice."""
    graph = model.graph
    if not splice:
        _write_all(f, model.SerializeToString())
        return
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
            entries.append((key(5) + varint(len(body)) + body, None, 0))
            continue
        meta = onnx.TensorProto()
        _copy_fields(t, meta, "external_data")
        meta.ClearField("data_location")
        head = meta.SerializeToString()
        length = tensor_nbytes(t)
        head += key(9) + varint(length)
        entries.append((key(5) + varint(len(head) + length) + head, t, length))
    graph_bytes = graph_skeleton.SerializeToString()
    graph_len = len(graph_bytes) + sum(len(h) + n for h, _, n in entries)
    _write_all(f, skeleton.SerializeToString())
    _write_all(f, key(7) + varint(graph_len))
    _write_all(f, graph_bytes)
    for head, tensor, _ in entries:
        _write_all(f, head)
        if tensor is not None:
            source.write_to(tensor, f)


def _live_locations(path: Path) -> set[str]:
    """The data files the model now at ``path`` uses (none when there is no readable model)."""
    if not path.is_file():
        return set()
    try:
        model, _ = parse(path)
    except Exception:  # whatever is there is not a model we could break
        return set()
    return {loc["location"] for t in initializers(model) if (loc := external_location(t)) and "location" in loc}


def _data_path(path: Path, live: set[str]) -> Path:
    """Where the new data file goes: ``OUT.data``, or ``OUT.1.data`` when the model now at ``path``
    uses the first, so that the new pair never overwrites the data of the pair it replaces."""
    for name in (f"{path.name}.data", f"{path.name}.1.data"):
        if name not in live:
            return path.with_name(name)
    raise BnfoldError(f"{path}: the model there uses both {path.name}.data and {path.name}.1.data")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a folder; the renames are still atomic
    finally:
        os.close(fd)


def _relabel(model: onnx.ModelProto, old: str, new: str) -> None:
    """Point the tensors written to data file ``old`` at ``new`` (same bytes, another name)."""
    for t in initializers(model):
        for entry in t.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new


def save(model: onnx.ModelProto, path: PathLike, *, source: Source | None = None, external: bool | None = None) -> int:
    """Write ``model`` to ``path`` so that a crash or a failed rename at any point leaves either the
    old model (with its data) or the new one (with its data), never a mix.

    Both files are written to temporary names in the output folder and fsynced; the data file is
    renamed to a name the current model at ``path`` does not use; the model is renamed over
    ``path`` last (the commit point); the folder is fsynced. Only then is a data file of the old
    pair that bnfold named (``OUT.data``/``OUT.1.data``) and the new model does not use removed.
    With a data file, the choice of its name, the renames and the removal hold a lock on the folder,
    so that concurrent runs writing one output leave one run's model with its own data.
    ``external`` None chooses: external data when the model already has some (beyond the input
    file's own inline weights) or would pass 2 GB. Environment failures (a full disk, a failed
    rename) are BnfoldError, with nothing left behind. Returns the bytes written (model and data)."""
    path = Path(path)
    check_destination(path)
    source = source or Source(None)
    located, nbytes = located_and_bytes(model)
    has_external = any(source.is_file_backed(t) and t.name not in source.inline_refs for t in located)
    if external is None:
        external = has_external or nbytes > TWO_GB - (64 << 20)
    elif not external and nbytes > TWO_GB - (64 << 20):
        raise BnfoldError(f"{path}: the model is over 2 GB and must be written with external data")
    if not external:
        with atomic_file(path, buffering=0) as f:  # unbuffered: kernel copies append at the file's position
            _write_inline(model, source, f, splice=bool(located))
        return path.stat().st_size
    written: list[str] = []
    try:
        return _save_external(model, path, source, written)
    except OSError as exc:
        raise not_written(path, exc) from None
    finally:
        _remove(written)


def _save_external(model: onnx.ModelProto, path: Path, source: Source, written: list[str]) -> int:
    """:func:`save` with a data file; temporary files are recorded in ``written``."""
    data_path = _data_path(path, _live_locations(path))  # a first guess, checked again under the lock
    out, tmp_data = _temp(data_path, written)
    with out:  # unbuffered: kernel copies append at the file's position
        _externalize(model, source, data_path, out)
        os.fsync(out.fileno())
    with _folder_locked(path.parent):
        live = _live_locations(path)
        chosen = _data_path(path, live)
        if chosen != data_path:  # another run wrote the output meanwhile, with data under that name
            _relabel(model, data_path.name, chosen.name)
            data_path = chosen
        f, tmp = _temp(path, written)
        with f:
            _write_all(f, model.SerializeToString())
            os.fsync(f.fileno())
        os.replace(tmp_data, data_path)
        written.remove(tmp_data)
        written.append(str(data_path))  # not yet used by any model: removed if the commit fails
        os.replace(tmp, path)  # the commit point
        written.clear()
        _fsync_dir(path.parent)
        for old in live - {data_path.name}:
            if old in (f"{path.name}.data", f"{path.name}.1.data") and (path.parent / old).is_file():
                _remove([str(path.parent / old)])
    return path.stat().st_size + data_path.stat().st_size
