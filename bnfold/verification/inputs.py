"""The inputs both models are run on: seeded random data shaped from the graph inputs, or arrays
the user gives (.npz)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx

from ..errors import BnfoldError, OptionError
from ..io.arrays import check_budget, read_npz
from ..proto import np_dtype

DEFAULT_DIM = 1
Dim = int | str | None
Spec = tuple[str, np.dtype, list[Dim]]


def input_specs(model: onnx.ModelProto) -> list[Spec]:
    """(name, dtype, dims) of each graph input a caller must feed (initializers excluded)."""
    inits = {t.name for t in model.graph.initializer}
    specs: list[Spec] = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims: list[Dim] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        try:
            dtype = np_dtype(t.elem_type)
        except ValueError:
            raise BnfoldError(f"graph input '{vi.name}' has no usable element type ({t.elem_type})") from None
        specs.append((vi.name, dtype, dims))
    return specs


def resolve_shape(
    name: str, dims: Sequence[Dim], dim_sizes: Mapping[str, int], shapes: Mapping[str, Sequence[int]]
) -> tuple[int, ...]:
    if name in shapes:
        return tuple(int(d) for d in shapes[name])
    out = []
    for d in dims:
        if isinstance(d, int) and d > 0:
            out.append(d)
        else:
            out.append(int(dim_sizes.get(d, DEFAULT_DIM)) if isinstance(d, str) and d else DEFAULT_DIM)
    return tuple(out)


def random_input(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)  # a 0-d comparison gives a numpy scalar otherwise
    if dtype.kind in "iu":
        return rng.integers(0, 3, size=shape).astype(dtype)  # small values are valid indices, counts, axes
    if dtype.kind == "f" or dtype.name == "bfloat16":
        return rng.standard_normal(shape).astype(np.float32).astype(dtype)
    raise BnfoldError(f"cannot synthesize inputs of type {dtype}: give them as inputs (--inputs FILE.npz)")


def _nbytes(dtype: np.dtype, shape: Sequence[int]) -> int:
    return int(np.prod([int(d) for d in shape], dtype=np.float64)) * dtype.itemsize


def synthesized(
    model: onnx.ModelProto,
    samples: int,
    seed: int,
    dim_sizes: Mapping[str, int],
    shapes: Mapping[str, Sequence[int]],
    budget: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Seeded random samples; their size is checked against ``budget`` before anything is made."""
    specs = input_specs(model)
    unknown = sorted(set(shapes) - {n for n, _, _ in specs})
    if unknown:
        raise OptionError("input_shapes", f"names {', '.join(unknown)}, which the model does not take as input(s)")
    dynamic = {d for _, _, dims in specs for d in dims if isinstance(d, str)}
    extra = sorted(set(dim_sizes) - dynamic)
    if extra:
        known = ", ".join(sorted(dynamic)) or "none"
        raise OptionError("dims", f"names {', '.join(extra)}, not a dynamic dimension of the model (it has: {known})")
    resolved = []
    for name, dtype, dims in specs:
        shape = resolve_shape(name, dims, dim_sizes, shapes)
        if name in shapes and len(shape) != len(dims) and dims:
            raise OptionError("input_shapes", f"{name}: {len(shape)} dimension(s), but the input has rank {len(dims)}")
        static = [(k, d) for k, d in enumerate(dims) if isinstance(d, int) and d > 0]
        wrong = [k for k, d in static if k < len(shape) and shape[k] != d]
        if wrong:
            raise OptionError("input_shapes", f"{name}={','.join(map(str, shape))} contradicts its static shape {dims}")
        resolved.append((name, dtype, shape))
    nbytes = sum(_nbytes(dt, sh) for _, dt, sh in resolved)
    check_budget("one sample of inputs", nbytes, budget, "check the shapes, or ")
    rng = np.random.default_rng(seed)
    for _ in range(samples):
        yield {n: random_input(rng, dt, sh) for n, dt, sh in resolved}


def load_inputs(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], budget: int
) -> list[dict[str, np.ndarray]]:
    """The arrays of one or several .npz files, keyed by input name (each file one or more samples),
    all of them together within ``budget`` bytes (:func:`bnfold.io.arrays.read_npz`)."""
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    out, spent = [], 0
    for item in paths:
        arrays, spent = read_npz(item, budget, spent)
        out.append(arrays)
    return out


def given_samples(model: onnx.ModelProto, files: list[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """Samples from arrays the user gave, checked against the graph inputs: the same dtype, the
    same rank (or one more: a leading axis of samples), and the static dimensions."""
    specs = input_specs(model)
    for arrays in files:
        missing = [n for n, _, _ in specs if n not in arrays]
        if missing:
            raise BnfoldError(f"the inputs file lacks graph input(s) {', '.join(missing)}")
        stacked = {n: len(dims) + 1 == arrays[n].ndim for n, _, dims in specs}
        counts = {arrays[n].shape[0] for n, _, _ in specs if stacked[n]}
        if len(set(stacked.values())) > 1 or len(counts) > 1:
            raise BnfoldError(
                "the inputs file mixes arrays with and without a leading sample axis, or of different sample counts"
            )
        for name, dtype, dims in specs:
            a = arrays[name]
            rank = a.ndim - stacked[name]
            if a.dtype != dtype:
                raise BnfoldError(f"input '{name}': the file has {a.dtype}, the model takes {dtype}")
            if rank != len(dims):
                raise BnfoldError(
                    f"input '{name}': the file has rank {rank} {a.shape}, the model takes rank {len(dims)} {dims}"
                )
            shape = a.shape[1:] if stacked[name] else a.shape
            if any(isinstance(d, int) and d > 0 and shape[k] != d for k, d in enumerate(dims)):
                raise BnfoldError(f"input '{name}': the file has shape {tuple(shape)}, the model takes {dims}")
            if 0 in shape:
                raise BnfoldError(f"input '{name}': shape {tuple(shape)} has no elements to compare")
        n = counts.pop() if counts else None
        if n is None:
            yield {name: arrays[name] for name, _, _ in specs}
        else:
            for k in range(n):
                yield {name: arrays[name][k] for name, _, _ in specs}
