"""bnfold: fold BatchNormalization into neighbouring layers of ONNX models, and prove the result
computes the same thing through onnxruntime."""

from __future__ import annotations

from .api import fold, fold_file, fold_many, inspect
from .batchnorm import TrainingModeError, batchnorm_inference
from .errors import BnfoldError
from .report import REASONS, BatchReport, Code, FoldReport, InspectReport, VerifyReport
from .verification import verify  # onnxruntime itself is imported only when verify() runs
from .verification.options import VerifyOptions

__version__ = "0.1.0"

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
