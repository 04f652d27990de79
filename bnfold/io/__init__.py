"""Loading and saving models without holding their weights in memory.

* :mod:`.wire`: the protobuf wire-format scan that finds large inline weights (bytes only).
* :mod:`.tensors`: :class:`~.tensors.Source` (tensor values on demand) and validated external locations.
* :mod:`.load` / :mod:`.save`: reading the graph; writing once, atomically.

Nothing is re-exported here: ``bnfold.io.save`` is the module, never shadowed by its function.
"""
