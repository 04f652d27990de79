"""bnfold: fold BatchNormalization into neighbouring layers of ONNX models, and prove the result
computes the same thing through onnxruntime."""

from .api import fold, fold_file
from .batchnorm import TrainingModeError, batchnorm_inference
from .errors import BnfoldError
from .report import REASONS, FoldReport

__version__ = "0.1.0"

__all__ = [
    "fold",
    "fold_file",
    "batchnorm_inference",
    "BnfoldError",
    "TrainingModeError",
    "FoldReport",
    "REASONS",
    "__version__",
]
