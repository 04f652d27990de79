"""The options: two frozen dataclasses, :class:`FoldOptions` and :class:`VerifyOptions`, the one home
of every option, its default and its help text. The Python API takes them (or keywords that build
them); the CLI makes its flags from the same fields (``bnfold.cli``), so an option is declared once.
Imports nothing heavy: the CLI reads it at start-up, shell completion included."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import Field, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, TypeVar, Union

from .errors import OptionError

if TYPE_CHECKING:  # numpy is not imported here: the CLI reads these defaults at start-up
    import numpy as np

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPT_LEVELS = ("disable", "basic", "extended", "all")
PathLike = str | os.PathLike[str]
InputsLike = Union[PathLike, Sequence[PathLike], Mapping[str, "np.ndarray"], None]  # noqa: UP007 (a string inside)


def option(default: Any, help: str, **cli: Any) -> Any:
    """A field with its help text and how the CLI spells it: ``flag`` (default ``--NAME``),
    ``multiple``, ``metavar``, ``choices``, ``kind`` (``path``, ``file``, ``int``, ``float``, ``str``;
    booleans become flags), ``min`` (a lower bound the CLI checks too). ``factory`` gives a default
    made per instance."""
    factory = cli.pop("factory", None)
    metadata = {"help": help, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_of(f: Field[Any]) -> str:
    """The CLI's flag for a field (the first of a ``--x/--no-x`` pair)."""
    spelled = f.metadata.get("cli", {}).get("flag")
    return str(spelled).split("/")[0] if spelled else "--" + f.name.replace("_", "-")


Options = TypeVar("Options", "FoldOptions", "VerifyOptions")


def _with(cls: type[Options], base: Options | None, overrides: Mapping[str, Any]) -> Options:
    """``base`` (or the defaults) with the keyword arguments that are not None applied; an unknown
    keyword is a TypeError, as for any function."""
    known = {f.name for f in fields(cls)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    start = base if base is not None else cls()
    return replace(start, **given) if given else start


@dataclass(frozen=True)
class FoldOptions:
    """How a model is folded: what :func:`bnfold.fold`, :func:`bnfold.fold_file`,
    :func:`bnfold.fold_many` and :func:`bnfold.inspect` take as ``options=``, or as keywords of the
    same names. Each field's ``help`` metadata is what ``bnfold fold --help`` says of it."""

    dry_run: bool = option(False, "Decide and report, write nothing.")
    lower_standalone: bool = option(False, "Turn BNs that can fold nowhere into Mul + Add by per-channel constants.")
    external_data: bool | None = option(
        None,
        "Write weights to OUT.data beside the output, or inline (default: as the input, or external over 2 GB).",
        flag="--external-data/--no-external-data",
    )
    in_place: bool = option(False, "Allow the output to replace MODEL (still written atomically).")
    strict: bool = option(False, "Refuse every fold with a hazard (the BN stays, the hazard its reason).")
    affine: bool = option(
        True,
        "Fold per-channel Mul/Add/Sub/Div by constants after a layer, BN or not.",
        flag="--affine/--no-affine",
    )
    reparameterize: bool = option(
        True,
        "Fold RepVGG/MobileOne identity-branch BNs into a sibling Conv.",
        flag="--reparameterize/--no-reparameterize",
    )
    check: bool = option(
        False,
        "Run onnx.checker (full_check) on input and output; report both.",
    )

    @classmethod
    def of(cls, options: FoldOptions | None = None, **overrides: Any) -> FoldOptions:
        """``options`` (or the defaults) with the keyword arguments that are not None applied."""
        return _with(cls, options, overrides)


@dataclass(frozen=True)
class VerifyOptions:
    """How two models are compared: what :func:`bnfold.verify` takes as ``options=``, or as keywords
    of the same names. Each field's ``help`` metadata is what ``bnfold verify --help`` says of it."""

    providers: tuple[str, ...] = option(
        ("cpu",), "Comma-separated: cpu, cuda.", kind="str", default_text="cpu", complete="providers"
    )
    rtol: float | None = option(
        None, "Judge elementwise with this relative tolerance (instead of the scaled error).", kind="float"
    )
    atol: float | None = option(
        None, "Judge elementwise with this absolute tolerance (instead of the scaled error).", kind="float"
    )
    baseline: bool = option(
        True,
        "Also run onnxruntime's own BN fusion of the original: the noise floor the bound adapts to.",
        flag="--baseline/--no-baseline",
    )
    save_inputs: PathLike | None = option(None, "Write the inputs used (.npz).", kind="path")
    save_outputs: PathLike | None = option(None, "Write every output compared (.npz).", kind="path")
    samples: int = option(3, "Random input samples to compare.", kind="int", min=1)
    seed: int = option(0, "Seed of the random inputs.", kind="int")
    dims: Mapping[str, int] = option(
        None,
        "Size of a named dynamic dimension (default 1). Repeatable.",
        flag="--dim",
        multiple=True,
        metavar="NAME=SIZE",
        factory=dict,
    )
    input_shapes: Mapping[str, Sequence[int]] = option(
        None,
        "Full shape of one input. Repeatable.",
        flag="--input-shape",
        multiple=True,
        metavar="NAME=D1,D2,...",
        factory=dict,
    )
    inputs: InputsLike = option(
        None,
        "Use these arrays (.npz keyed by input name; a leading axis holds several samples). Repeatable.",
        kind="file",
        multiple=True,
    )
    max_input_bytes: int = option(
        1 << 30,
        "Refuse inputs larger than this (one synthesized sample, or all --inputs arrays).",
        kind="int",
        min=1,
    )
    per_layer: bool = option(False, "Also compare every BatchNormalization output; name the first that diverges.")
    graph_optimization: str = option(
        "disable",
        "onnxruntime optimization level for the candidate (the reference always runs with none).",
        choices=OPT_LEVELS,
    )
    allow_tf32: bool = option(False, "On CUDA, allow TF32 math (tolerances widened to match).")

    def __post_init__(self) -> None:
        providers = self.providers
        if isinstance(providers, str):
            providers = tuple(p for p in providers.split(",") if p.strip())
        object.__setattr__(self, "providers", tuple(p.strip().lower() for p in providers))
        if not self.providers:
            raise OptionError("providers", "no provider to verify on: name at least one of cpu, cuda")
        for p in self.providers:
            if p not in PROVIDERS:
                raise OptionError("providers", f"unknown provider '{p}': choose from {', '.join(PROVIDERS)}")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise OptionError(name, f"must be a finite number >= 0, got {value}")
        if self.max_input_bytes < 1:
            raise OptionError("max_input_bytes", "must be at least 1")
        if self.samples < 1:
            raise OptionError("samples", "must be at least 1")
        if self.graph_optimization not in OPT_LEVELS:
            raise OptionError(
                "graph_optimization",
                f"unknown optimization level '{self.graph_optimization}': choose from {', '.join(OPT_LEVELS)}",
            )
        for name, size in self.dims.items():
            if int(size) < 1:
                raise OptionError("dims", f"{name}={size}: a dimension must be at least 1")
        for name, shape in self.input_shapes.items():
            if any(int(d) < 1 for d in shape):
                raise OptionError("input_shapes", f"{name}: every dimension must be at least 1")

    @classmethod
    def of(cls, options: VerifyOptions | None = None, **overrides: Any) -> VerifyOptions:
        """``options`` (or the defaults) with the keyword arguments that are not None applied."""
        return _with(cls, options, overrides)

    @property
    def provider_names(self) -> tuple[str, ...]:
        """onnxruntime's names of the providers (``CPUExecutionProvider``, ...)."""
        return tuple(PROVIDERS[p] for p in self.providers)
