"""bnfold: fold BatchNormalization into neighbouring layers of ONNX models, and prove the result
computes the same thing through onnxruntime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .api import fold, fold_file, fold_many, inspect
from .batchnorm import TrainingModeError, batchnorm_inference
from .errors import BnfoldError
from .report import REASONS, BatchReport, Code, FoldReport, InspectReport, VerifyReport
from .verification.options import VerifyOptions

if TYPE_CHECKING:
    from .verification import verify as _verify

__version__ = "0.1.0"


def verify(original: Any, candidate: Any, options: Any = None, **kwargs: Any) -> VerifyReport:
    """Compare two models through onnxruntime: see :func:`bnfold.verification.verify` for the
    arguments (imported on first use, so that ``import bnfold`` does not load onnxruntime)."""
    from .verification import verify as run

    return run(original, candidate, options, **kwargs)


if TYPE_CHECKING:
    verify = _verify  # noqa: F811  (type checkers see the full signature)

__all__ = [
    "REASONS",
    "BatchReport",
    "BnfoldError",
    "Code",
    "FoldReport",
    "InspectReport",
    "TrainingModeError",
    "VerifyOptions",
    "VerifyReport",
    "__version__",
    "batchnorm_inference",
    "fold",
    "fold_file",
    "fold_many",
    "inspect",
    "verify",
]
