"""The verification options: one dataclass, the single home of the defaults for the API and the CLI.
Imports nothing heavy: the CLI reads it at start-up, shell completion included."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Union

from .errors import BnfoldError

if TYPE_CHECKING:  # numpy is not imported here: the CLI reads these defaults at start-up
    import numpy as np

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPT_LEVELS = ("disable", "basic", "extended", "all")
PathLike = str | os.PathLike[str]
InputsLike = Union[PathLike, Sequence[PathLike], Mapping[str, "np.ndarray"], None]  # noqa: UP007 (a string inside)


# The options fold, fold_file and fold_many share (the CLI passes them on by these names).
FOLD_OPTIONS = ("dry_run", "lower_standalone", "external_data", "strict", "affine", "reparameterize", "check")


@dataclass(frozen=True)
class VerifyOptions:
    """How two models are compared. Every field has the default the CLI shows."""

    providers: tuple[str, ...] = ("cpu",)
    rtol: float | None = None  # elementwise tolerances; both None: the scaled criterion (see compare)
    atol: float | None = None
    samples: int = 3
    seed: int = 0
    dims: Mapping[str, int] = field(default_factory=dict)
    input_shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)
    inputs: InputsLike = None
    per_layer: bool = False
    graph_optimization: str = "disable"
    allow_tf32: bool = False
    max_input_bytes: int = 1 << 30  # per sample synthesized, or all .npz arrays together
    baseline: bool = True  # run onnxruntime's own fusion of the original: the noise floor
    save_inputs: PathLike | None = None  # .npz of the inputs, a leading axis of samples
    save_outputs: PathLike | None = None  # .npz of the reference's and each provider's outputs

    def __post_init__(self) -> None:
        providers = self.providers
        if isinstance(providers, str):
            providers = tuple(p for p in providers.split(",") if p.strip())
        object.__setattr__(self, "providers", tuple(p.strip().lower() for p in providers))
        if not self.providers:
            raise BnfoldError("no provider to verify on: name at least one of cpu, cuda")
        for p in self.providers:
            if p not in PROVIDERS:
                raise BnfoldError(f"unknown provider '{p}': choose from {', '.join(PROVIDERS)}")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise BnfoldError(f"--{name} must be a finite number >= 0, got {value}")
        if self.max_input_bytes < 1:
            raise BnfoldError("--max-input-bytes must be at least 1")
        if self.samples < 1:
            raise BnfoldError("--samples must be at least 1")
        if self.graph_optimization not in OPT_LEVELS:
            raise BnfoldError(
                f"unknown optimization level '{self.graph_optimization}': choose from {', '.join(OPT_LEVELS)}"
            )
        for name, size in self.dims.items():
            if int(size) < 1:
                raise BnfoldError(f"--dim {name}={size}: a dimension must be at least 1")
        for name, shape in self.input_shapes.items():
            if any(int(d) < 1 for d in shape):
                raise BnfoldError(f"--input-shape {name}: every dimension must be at least 1")

    @classmethod
    def of(cls, options: VerifyOptions | None = None, **overrides: Any) -> VerifyOptions:
        """``options`` (or the defaults) with the keyword arguments that are not None applied."""
        base = options or cls()
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown verification option(s): {', '.join(sorted(unknown))}")
        given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
        return replace(base, **given) if given else base

    @property
    def provider_names(self) -> tuple[str, ...]:
        return tuple(PROVIDERS[p] for p in self.providers)
