"""Numeric verification through onnxruntime.

The reference is always the original model on the CPU provider with every graph optimization off
(from the BASIC level on, onnxruntime fuses Conv+BN itself, so anything else would compare a fold
with a fold). Samples are generated, run and compared one at a time, so memory holds at most one
sample's activations per model.

* :mod:`.options`: :class:`VerifyOptions`, the one home of the defaults.
* :mod:`.inputs`: what both models are fed.  * :mod:`.sessions`: onnxruntime.
* :mod:`.compare`: the criteria.  * :mod:`.stages`: verify's stages (prepare, run, judge, save).
The result types live in :mod:`bnfold.report`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import enough_memory, model_text
from ..io.load import ModelLike
from ..options import VerifyOptions
from ..report import ErrorStats, VerifyReport
from . import stages
from .inputs import input_specs, random_input, resolve_shape
from .sessions import check_providers
from .stages import MEMORY_HINT, check_save_paths

__all__ = [
    "ErrorStats",
    "VerifyOptions",
    "VerifyReport",
    "check_providers",
    "check_save_paths",
    "input_specs",
    "random_input",
    "resolve_shape",
    "verify",
]


@model_text()
@enough_memory("to verify", MEMORY_HINT)
def verify(
    original: ModelLike,
    candidate: ModelLike,
    options: VerifyOptions | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    **overrides: Any,
) -> VerifyReport:
    """Run ``original`` (CPU, optimizations off) and ``candidate`` (each provider) on the same inputs
    and compare every output by name. Returns a :class:`VerifyReport`, true when equivalent.

    Options come from ``options`` (default :class:`VerifyOptions`), overridden by keyword arguments
    named as its fields (``samples=5``, ``per_layer=True``, ...). ``per_layer`` also compares every
    BatchNormalization output of the original (names survive folding) and names the first that
    diverges. ``progress`` is called with the number of samples done after each one. User errors
    raise :class:`bnfold.BnfoldError` (:class:`bnfold.errors.OptionError` for an option's value,
    naming the option).
    """
    o = VerifyOptions.of(options, **overrides)
    prepared = stages.prepare(original, candidate, o)
    tally = stages.run(prepared, progress)
    report = stages.judge(prepared, tally)
    stages.save(prepared, tally)
    return report
