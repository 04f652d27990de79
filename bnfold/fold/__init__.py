"""The fold: :func:`plan_model` decides (a value), :func:`apply` rewrites.

* :mod:`.plan`: ``plan_model(model, store) -> FoldPlan`` over every graph, body and function.
* :mod:`.forward`, :mod:`.backward`, :mod:`.lower`: one module per family of rewrites, each a pure
  ``plan`` and an ``apply``.
* :mod:`.common`: the BN check, the affine map, and the one rewrite of a layer's weight and bias.
* :mod:`.apply`: the only mutation.
"""

from __future__ import annotations

from typing import Optional

import onnx

from ..proto import all_nodes, external_location, initializers, is_batchnorm
from ..report import ModelStats
from .apply import apply
from .plan import FoldPlan, GraphPlan, plan_model

__all__ = ["FoldPlan", "GraphPlan", "apply", "plan_model", "stats"]


def stats(model: onnx.ModelProto, nbytes: Optional[int] = None) -> ModelStats:
    """Counts of BNs, nodes and initializers (bodies and functions included), and the size in bytes:
    ``nbytes`` when the caller knows it (file sizes), else the serialized size (slow on big models)."""
    nodes = list(all_nodes(model))
    inits = list(initializers(model))
    external = sum(int(loc.get("length", 0) or 0) for t in inits if (loc := external_location(t)) is not None)
    size = nbytes if nbytes is not None else model.ByteSize() + external
    return ModelStats(sum(map(is_batchnorm, nodes)), len(nodes), len(inits), size)
