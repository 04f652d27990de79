"""bnfold: fold BatchNormalization into neighbouring layers of ONNX models, and prove the result
computes the same thing through onnxruntime."""

from .api import fold, fold_file, inspect
from .batchnorm import TrainingModeError, batchnorm_inference
from .errors import BnfoldError
from .report import REASONS, FoldReport

__version__ = "0.1.0"


def verify(original, candidate, **options):
    """Compare two models through onnxruntime; see :func:`bnfold.verification.verify` (imported on first use,
    so that ``import bnfold`` does not load onnxruntime)."""
    from .verification import verify as _verify

    return _verify(original, candidate, **options)

__all__ = [
    "fold",
    "fold_file",
    "inspect",
    "verify",
    "batchnorm_inference",
    "BnfoldError",
    "TrainingModeError",
    "FoldReport",
    "REASONS",
    "__version__",
]
