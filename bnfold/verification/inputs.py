"""The inputs both models are run on: seeded random data shaped from the graph inputs, or arrays
the user gives (.npz)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from ..errors import BnfoldError
from ..proto import np_dtype

DEFAULT_DIM = 1
Dim = Union[int, str, None]
Spec = Tuple[str, np.dtype, List[Dim]]


def input_specs(model: onnx.ModelProto) -> List[Spec]:
    """(name, dtype, dims) of each graph input a caller must feed (initializers excluded)."""
    inits = {t.name for t in model.graph.initializer}
    specs: List[Spec] = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims: List[Dim] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        try:
            dtype = np_dtype(t.elem_type)
        except ValueError:
            raise BnfoldError(f"graph input '{vi.name}' has no usable element type ({t.elem_type})") from None
        specs.append((vi.name, dtype, dims))
    return specs


def resolve_shape(
    name: str, dims: Sequence[Dim], dim_sizes: Mapping[str, int], shapes: Mapping[str, Sequence[int]]
) -> Tuple[int, ...]:
    if name in shapes:
        return tuple(int(d) for d in shapes[name])
    out = []
    for d in dims:
        if isinstance(d, int) and d > 0:
            out.append(d)
        else:
            out.append(int(dim_sizes.get(d, DEFAULT_DIM)) if isinstance(d, str) and d else DEFAULT_DIM)
    return tuple(out)


def random_input(rng: np.random.Generator, dtype: np.dtype, shape: Tuple[int, ...]) -> np.ndarray:
    if dtype == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)  # a 0-d comparison gives a numpy scalar otherwise
    if dtype.kind in "iu":
        return rng.integers(0, 3, size=shape).astype(dtype)  # small values are valid indices, counts, axes
    if dtype.kind == "f" or dtype.name == "bfloat16":
        return rng.standard_normal(shape).astype(np.float32).astype(dtype)
    raise BnfoldError(f"cannot synthesize inputs of type {dtype}: pass them with --inputs FILE.npz")


def sample_feeds(
    model: onnx.ModelProto,
    samples: int,
    seed: int,
    dim_sizes: Mapping[str, int],
    shapes: Mapping[str, Sequence[int]],
    given: Optional[Mapping[str, np.ndarray]] = None,
) -> Iterator[Dict[str, np.ndarray]]:
    specs = input_specs(model)
    if given is not None:
        missing = [n for n, _, _ in specs if n not in given]
        if missing:
            raise BnfoldError(f"the inputs file lacks graph input(s) {', '.join(missing)}")
        yield {n: np.asarray(given[n]) for n, _, _ in specs}
        return
    rng = np.random.default_rng(seed)
    for _ in range(samples):
        yield {n: random_input(rng, dt, resolve_shape(n, dims, dim_sizes, shapes)) for n, dt, dims in specs}


def load_inputs(
    inputs: Union[str, os.PathLike[str], Mapping[str, np.ndarray], None],
) -> Optional[Mapping[str, np.ndarray]]:
    if inputs is None or isinstance(inputs, Mapping):
        return inputs
    path = Path(inputs)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise BnfoldError(f"{path}: cannot read inputs ({exc})") from None
