"""Forward folds of many small layers, checked and computed together.

A model of thousands of small Conv+BN pairs spends its time in the per-fold numpy calls of
:func:`.plan._vet_forward` and :func:`.forward.apply`, not in arithmetic. Here chains whose weights
have the same shape and dtype are stacked, and:

* :func:`clear` finds, in one pass per stack, the chains that the per-fold check would pass with no
  reason and no hazard (finite weights, ranges that fit the dtype, no channel flushed below the
  normal range, a finite bias, no extreme scale, no range inflation). It is an exact shortcut, never
  a second opinion: every condition is one of the per-fold check's own, on the same float64 values,
  and a chain it does not clear simply takes the per-fold path, which decides and explains.
* The same pass scales the stacked weights and computes the new biases, with the per-fold path's
  float64 operations cast once; :func:`prepare` hands them to :func:`.forward.apply` (computing them
  itself for a scope that apply had to build anew), which writes the same bytes it would have
  computed on its own.

Only 32- and 64-bit float weights up to :data:`SMALL_BYTES` whose output channels are axis 0 (Conv;
Gemm with transB) and chains without an identity branch are stacked: 16-bit types need the cast's
own error element by element, and large weights gain nothing from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, cast

import numpy as np
import onnx

from .common import Scope, scaled
from .safety import finfo, flushed_channels, inflated, largest_magnitude, medians, ordinary_scales


class Layer(Protocol):
    """What the batch reads of a forward.Target (this module does not import forward, which calls it)."""

    @property
    def weight_slot(self) -> int: ...
    @property
    def bias_slot(self) -> int: ...
    @property
    def channel_axis(self) -> int: ...
    @property
    def bias_scale(self) -> float: ...
    @property
    def factor(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray]: ...


class Chain(Protocol):
    """What the batch reads of a forward.Chain."""

    @property
    def producer(self) -> int: ...
    @property
    def s(self) -> np.ndarray | None: ...
    @property
    def t(self) -> np.ndarray | None: ...
    @property
    def summed(self) -> int: ...
    @property
    def identity(self) -> Any: ...
    @property
    def target(self) -> Layer: ...


def bias_input(node: onnx.NodeProto, target: Layer) -> str:
    """The name of the layer's bias input ("" when it has none)."""
    slot = target.bias_slot
    return node.input[slot] if slot > 0 and len(node.input) > slot else ""


SMALL_BYTES = 1 << 16  # weights up to this size are stacked
STACK_BYTES = 8 << 20  # float64 bytes of one stack of weights at most


def _stackable(scope: Scope, chain: Chain) -> tuple[np.ndarray, np.ndarray] | None:
    """The chain's weight and its scale factor (shaped (C, 1, ...)), when it can be stacked."""
    if chain.identity is not None or chain.s is None or chain.t is None or chain.target.channel_axis != 0:
        return None
    node = scope.index.node(chain.producer)
    w_name = node.input[chain.target.weight_slot]
    w = scope.constant(w_name)
    if w is None or scope.index.producer.get(w_name) is not None:
        return None  # computed from constants (a quantized weight, say): folded on its own
    if w.dtype not in (np.float32, np.float64) or not w.ndim or not w.size or w.nbytes > SMALL_BYTES:
        return None
    factor = chain.target.factor(w, chain.s)
    if factor.shape != (w.shape[0],) + (1,) * (w.ndim - 1):
        return None
    name = bias_input(node, chain.target)
    if name:
        bias = scope.constant(name)
        if bias is None or bias.shape != chain.s.shape:  # a Gemm C that broadcasts: per fold
            return None
    return w, factor


def _old_bias(scope: Scope, chain: Chain) -> np.ndarray | None:
    """The producer's bias before the fold (None: it has none)."""
    name = bias_input(scope.index.node(chain.producer), chain.target)
    return scope.constant(name) if name else None


def _stacks(scope: Scope, chains: Sequence[Chain]) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
    """(positions in ``chains``, weights (N, C, ...), factors (N, C, 1, ...) in float64) per stack."""
    groups: dict[tuple[tuple[int, ...], str], list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for k, chain in enumerate(chains):
        found = _stackable(scope, chain)
        if found is not None:
            w, factor = found
            groups.setdefault((w.shape, w.dtype.str), []).append((k, w, factor))
    for members in groups.values():
        per = max(1, STACK_BYTES // (members[0][1].size * 8))
        for start in range(0, len(members), per):
            part = members[start : start + per]
            yield (
                [k for k, _, _ in part],
                np.stack([w for _, w, _ in part]),
                np.stack([f for _, _, f in part]).astype(np.float64),
            )


def _new_biases(scope: Scope, chains: Sequence[Chain]) -> np.ndarray:
    """Each chain's folded bias (N, C) in float64, as :func:`.forward.new_bias` computes it:
    ``bias_scale * b * s + t + 0.0``, row by row the same operations."""
    s = np.stack([cast(np.ndarray, chain.s) for chain in chains])  # stacked chains hold a BN: s, t are set
    t = np.stack([cast(np.ndarray, chain.t) for chain in chains])
    b = np.zeros_like(s)
    scale = np.array([[chain.target.bias_scale] for chain in chains], dtype=np.float64)
    for k, chain in enumerate(chains):
        old = _old_bias(scope, chain)
        if old is not None:
            b[k] = old  # (C,): _stackable saw to it
    with np.errstate(all="ignore"):
        out: np.ndarray = scale * b * s + t + 0.0
    return out


def _scaled(w: np.ndarray, factor: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stacked new weights (``w * factor`` in float64, cast once) and biases (cast once)."""
    with np.errstate(all="ignore"):
        return scaled(w, factor), bias.astype(w.dtype)


def clear(scope: Scope, chains: Sequence[Chain]) -> set[int]:
    """Positions of the chains that pass :func:`.plan._vet_forward` with no reason and no hazard.
    The new weights and biases of every stacked chain are computed in the same pass and kept in
    ``scope.prepared`` for :func:`prepare` (small weights only: :data:`SMALL_BYTES`)."""
    cleared: set[int] = set()
    for positions, w, factor in _stacks(scope, chains):
        top, tiny, _ = finfo(w.dtype)
        before = largest_magnitude(w, tuple(range(2, w.ndim)))  # (N, C)
        f = np.abs(factor.reshape(before.shape))
        stacked = [chains[k] for k in positions]
        bias = _new_biases(scope, stacked)
        with np.errstate(all="ignore"):
            after = before * f
            ok = np.isfinite(before).all(axis=1) & (after <= top).all(axis=1)
            ok &= ~flushed_channels(before, after, tiny).any(axis=1)
            ok &= ordinary_scales(f.min(axis=1), f.max(axis=1))
            b_max, a_max = before.max(axis=1), after.max(axis=1)
            spread_b = b_max / np.maximum(medians(before), 1e-300)
            spread_a = a_max / np.maximum(medians(after), 1e-300)
            ok &= ~((b_max > 0) & (a_max > 0) & inflated(a_max / b_max, spread_b, spread_a))
            # safety.summed_limit and gain_limit for stacked (32/64-bit) weights, the same operations
            limit = top / np.array([[chain.summed] for chain in stacked], dtype=np.float64)
            ok &= np.isfinite(bias).all(axis=1) & (np.abs(bias) <= limit).all(axis=1)
            ok &= (after <= limit / max(w[0].size // w.shape[1], 1)).all(axis=1)
        cleared.update(positions[k] for k in np.flatnonzero(ok).tolist())
        new_w, new_b = _scaled(w, factor, bias)
        for k, chain in enumerate(stacked):
            scope.prepared[id(chain)] = (chain, new_w[k], new_b[k])
    return cleared


def prepare(scope: Scope, chains: Sequence[Chain]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The new weight and bias of each stackable chain, by its producer: ``w * factor`` in float64
    cast once, and the bias cast once to the weight's dtype. What :func:`clear` computed for the
    same chain (the very object) in this scope is taken as it is."""
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    missing = []
    for chain in chains:
        hit = scope.prepared.get(id(chain))
        if hit is not None and hit[0] is chain:
            out[chain.producer] = (hit[1], hit[2])
        else:
            missing.append(chain)
    scope.prepared.clear()
    for positions, w, factor in _stacks(scope, missing):
        new_w, new_b = _scaled(w, factor, _new_biases(scope, [missing[k] for k in positions]))
        for k, position in enumerate(positions):
            out[missing[position].producer] = (new_w[k], new_b[k])
    return out
