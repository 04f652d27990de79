"""bnfold: fold BatchNormalization into neighbouring layers of ONNX models, and prove the result
computes the same thing through onnxruntime.

The public names are imported on first use (PEP 562), so that ``import bnfold`` and the command
line's start-up (shell completion included) do not import onnx, numpy or onnxruntime.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "fold": "api",
    "fold_file": "api",
    "fold_many": "api",
    "inspect": "api",
    "verify": "verification",
    "batchnorm_inference": "batchnorm",
    "TrainingModeError": "batchnorm",
    "BnfoldError": "errors",
    "REASONS": "report",
    "Code": "report",
    "BatchReport": "report",
    "FoldReport": "report",
    "InspectReport": "report",
    "VerifyReport": "report",
    "VerifyOptions": "options",
    "FoldOptions": "options",
    "OptionError": "errors",
}

if TYPE_CHECKING:
    from .api import fold, fold_file, fold_many, inspect
    from .batchnorm import TrainingModeError, batchnorm_inference
    from .errors import BnfoldError, OptionError
    from .options import FoldOptions, VerifyOptions
    from .report import REASONS, BatchReport, Code, FoldReport, InspectReport, VerifyReport
    from .verification import verify


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfold' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """``bnfold.fold`` is the public function, and also the name of the subpackage holding the
    folds: importing that subpackage would bind it over the function. The binding is skipped (the
    subpackage stays reachable through ``import bnfold.fold...``, which goes by sys.modules)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "REASONS",
    "BatchReport",
    "BnfoldError",
    "Code",
    "FoldOptions",
    "FoldReport",
    "InspectReport",
    "OptionError",
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
