"""Arrays in .npz files, read and written as untrusted data: the zip directory is checked before
anything is decompressed, nothing is unpickled, and a file is written whole or not at all.

numpy's own ``np.load``/``np.savez`` are not used: ``np.load`` takes a file that starts like a .npy
for one, reads members of any name, and allocates what a header claims; ``np.savez(f, **arrays)``
cannot store an array named ``file`` or ``allow_pickle``.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO

import numpy as np

from ..errors import BnfoldError
from ..options import PathLike
from .save import atomic_file, check_destination
from .tensors import regular_file

SUFFIX = ".npy"
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip
READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)


def _header(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a .npy header (formats 1.0 and 2.0, the ones numpy writes for plain arrays)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
    return tuple(shape), np.dtype(dtype)


def _members(z: zipfile.ZipFile, path: Path, budget: int, spent: int) -> tuple[Iterable[zipfile.ZipInfo], int]:
    """The members, once the directory says each is a plain .npy, stored or deflated, unencrypted,
    and that together they fit ``budget`` (``spent`` already used by other files)."""
    infos, names = z.infolist(), set()
    for info in infos:
        name = info.filename
        if not name.endswith(SUFFIX):
            raise BnfoldError(f"{path}: member '{name}' is not a .npy array (numpy.savez names them NAME.npy)")
        if name in names:
            raise BnfoldError(f"{path}: member '{name}' appears twice")
        names.add(name)
        if info.flag_bits & 0x1:
            raise BnfoldError(f"{path}: member '{name}' is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise BnfoldError(
                f"{path}: member '{name}' uses compression method {info.compress_type} (not stored or deflated)"
            )
    spent += sum(info.file_size for info in infos)
    check_budget(f"{path}: its arrays", spent, budget)
    return infos, spent


def check_budget(what: str, nbytes: float, budget: int, advice: str = "") -> None:
    """Refuse ``what`` when its ``nbytes`` exceed the inputs' ``budget`` (max_input_bytes)."""
    if nbytes > budget:
        raise BnfoldError(
            f"{what} would take {nbytes / 2**20:,.0f} MiB, over the {budget / 2**20:,.0f} MiB allowed; "
            f"{advice}raise max_input_bytes (--max-input-bytes)"
        )


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, budget: int) -> np.ndarray:
    with z.open(info) as f:
        shape, dtype = _header(f)
        if dtype.hasobject:
            raise ValueError("it holds Python objects (pickles are never loaded)")
        size = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        check_budget(f"{path}: its arrays", size, budget)
        if size > info.file_size:
            raise ValueError(f"its header claims {size} bytes of data in a member of {info.file_size}")
    with z.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def read_npz(path: PathLike, budget: int, spent: int = 0) -> tuple[dict[str, np.ndarray], int]:
    """The arrays of an .npz file by name, and the bytes counted against ``budget`` so far."""
    path = Path(path)
    regular_file(path, "an .npz file")
    arrays: dict[str, np.ndarray] = {}
    member = ""
    try:
        with open(path, "rb") as raw:
            if raw.read(4) not in ZIP_MAGIC:
                raise BnfoldError(f"{path}: not an .npz file (a zip of .npy arrays, as numpy.savez writes)")
            raw.seek(0)
            with zipfile.ZipFile(raw) as z:
                infos, spent = _members(z, path, budget, spent)
                for info in infos:
                    member = info.filename
                    arrays[member[: -len(SUFFIX)]] = _read_member(z, info, path, budget)
    except BnfoldError:
        raise
    except MemoryError:
        raise BnfoldError(f"{path}: not enough memory to load its arrays") from None
    except READ_ERRORS as exc:
        where = f"member '{member}'" if member else "the zip directory"
        raise BnfoldError(f"{path}: {where}: cannot read ({type(exc).__name__}: {exc})") from None
    return arrays, spent


def write_npz(path: PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` as an .npz (each under its own name, whatever it is) atomically: a temporary
    file beside ``path``, renamed over it once complete. The caller has checked the destination
    (:func:`.save.check_destination`)."""
    with atomic_file(Path(path)) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, array in arrays.items():
            with z.open(name + SUFFIX, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


__all__ = ["check_budget", "check_destination", "read_npz", "write_npz"]
