"""Structural reparameterization: the identity-branch BN of a RepVGG / MobileOne block folded into a
sibling Conv.

Such a block computes ``conv_a(x) + conv_b(x) + BN(x)``. With ``BN(x) = s * x + t`` and a sibling
Conv reading the same ``x`` with stride 1 and a padding that keeps the spatial size, ``s * x`` is
that Conv with ``s`` added at the kernel tap that reads ``x[p]`` for output ``p`` (the centre of a
"same" kernel), on the diagonal input channel of each output channel; ``t`` joins its bias. The
Conv's padding never reaches that tap, so the identity is exact at the border too. The BN goes, and
the Add that summed it passes its other operand on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx

from ..proto import ONNX_DOMAINS, attr, node_label, str_attr
from ..report import Code, Reason
from .common import Affine, Identity, Scope, check_batchnorm, is_float
from .forward import TARGETS, Chain, vet
from .lower import INTRINSIC
from .planning import Notes, Planning


@dataclass(frozen=True)
class Reparam:
    bn: int
    add: int  # the Add that reads the BN's output
    chain: Chain  # the sibling Conv's forward chain, carrying the identity

    @property
    def conv(self) -> int:
        return self.chain.producer


def _summands(scope: Scope, add: onnx.NodeProto, skip: str) -> list[str]:
    """The values an Add tree sums (Adds whose outputs each feed only the next), ``skip`` left out."""
    index, out, pending = scope.index, [], [n for n in add.input if n != skip]
    seen = set(pending)
    while pending:
        name = pending.pop()
        node = index.node_of(name)
        if (
            node is not None
            and node.op_type == "Add"
            and node.domain in ONNX_DOMAINS
            and len(node.input) == 2
            and index.uses(name) == 1
            and not seen & set(node.input)  # a cycle, in a malformed graph, ends the walk
        ):
            seen.update(node.input)
            pending.extend(node.input)
        else:
            out.append(name)
    return out


def identity_tap(node: onnx.NodeProto, w: np.ndarray) -> tuple[int, ...] | str:
    """The kernel tap that reads ``x[p]`` for output ``p``, when the Conv keeps the spatial size at
    stride 1; else why not."""
    spatial = w.ndim - 2
    strides = attr(node, "strides", None) or [1] * spatial
    dilations = attr(node, "dilations", None) or [1] * spatial
    pads = attr(node, "pads", None) or [0] * (2 * spatial)
    if not all(isinstance(v, int) for v in [*strides, *dilations, *pads]):
        return "strides, dilations or pads that are not integers"
    if len(strides) != spatial or any(s != 1 for s in strides):
        return f"stride {list(strides)}: its output does not line up with its input"
    if len(dilations) != spatial or any(d < 1 for d in dilations):
        return f"dilations {list(dilations)}"
    auto_pad = str_attr(node, "auto_pad", "NOTSET")
    if len(pads) != 2 * spatial:
        return f"pads {list(pads)}"
    tap = []
    for k in range(spatial):
        size, d = w.shape[2 + k], dilations[k]
        total = d * (size - 1)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        elif auto_pad == "VALID":
            begin, end = 0, 0
            if total:
                return "padding VALID shrinks its output"
        else:
            begin, end = pads[k], pads[k + spatial]
            if begin + end != total:
                return f"pads {list(pads)}: its output is not the size of its input"
        if begin % d or not 0 <= begin // d < size:
            return f"pads {list(pads)}: no kernel tap reads the input at the output's position"
        tap.append(begin // d)
    return tuple(tap)


def plan(
    scope: Scope, left: dict[int, Reason], chains: list[Chain], taken: set[int]
) -> tuple[list[Reparam], dict[int, Reason]]:
    """Identity-branch BNs among ``left`` that fold into a sibling Conv (one BN per Conv; Convs in
    ``taken`` belong to other folds). Returns the reparameterizations, each with the sibling's
    forward chain carrying the identity, and the reasons of the BNs that still stay."""
    index = scope.index
    by_end = {c.end: k for k, c in enumerate(chains)}
    chains, still, out = list(chains), dict(left), []
    used = set(taken)
    for i, reason in sorted(left.items()):
        if reason.code in INTRINSIC:
            continue
        bn = index.node(i)
        affine = check_batchnorm(scope, bn)
        if isinstance(affine, Reason):
            continue
        x, y = bn.input[0], bn.output[0]
        readers = index.readers(y)
        if y in index.graph_outputs or len(readers) != 1:
            continue
        add = index.node(readers[0])
        if add.op_type != "Add" or add.domain not in ONNX_DOMAINS or len(add.input) != 2 or y not in add.input:
            continue
        if add.input[0] == add.input[1]:
            continue
        why: list[str] = []
        for v in _summands(scope, add, y):
            found = _sibling(scope, v, x, affine, chains, by_end, used, why)
            if found is None:
                continue
            k, chain = found
            if k is None:
                by_end[chain.end] = len(chains)
                chains.append(chain)
            else:
                chains[k] = chain
            used.add(chain.producer)
            out.append(Reparam(i, readers[0], chain))
            del still[i]
            break
        else:
            if why:  # a sibling Conv was there, but could not take the identity
                still[i] = Reason(Code.IDENTITY_BRANCH, "; ".join(why))
    return out, still


def _sibling(
    scope: Scope,
    v: str,
    x: str,
    affine: Affine,
    chains: list[Chain],
    by_end: dict[str, int],
    used: set[int],
    why: list[str],
) -> tuple[int | None, Chain] | None:
    """The chain (existing or new) of a Conv reading ``x`` whose result ``v`` is summed with the BN."""
    index = scope.index
    k = by_end.get(v)
    chain = chains[k] if k is not None else None
    if chain is not None and chain.kept:
        return None
    p = chain.producer if chain is not None else index.producer.get(v)
    if p is None or index.uses(v) != 1:
        return None
    conv = index.node(p)
    if conv.op_type != "Conv" or conv.domain not in ONNX_DOMAINS or not conv.input or conv.input[0] != x:
        return None
    label = f"Conv '{node_label(conv)}'"
    if p in used:
        why.append(f"{label} already takes another fold")
        return None
    if chain is None:
        if index.uses(conv.output[0]) != 1:
            return None
        target = TARGETS["Conv"](scope, conv)
        if isinstance(target, Reason):
            why.append(f"{label}: {target.message}")
            return None
        c = target.channels
        chain = Chain(p, target, v, s=np.ones(c), t=np.zeros(c))
    w = scope.constant(conv.input[1])
    assert w is not None  # the chain's target read it
    group = attr(conv, "group", 1)
    channels = w.shape[0]
    if affine.s.shape != (channels,) or w.shape[1] * group != channels or not is_float(w):
        why.append(f"{label} maps {w.shape[1] * group} channels to {channels}, the BN has {affine.s.shape[0]}")
        return None
    tap = identity_tap(conv, w)
    if isinstance(tap, str):
        why.append(f"{label}: {tap}")
        return None
    return k, replace(chain, identity=Identity(affine.s, affine.t, tap, w.shape[1]))


def apply(scope: Scope, r: Reparam) -> list[str]:
    """Remove the BN (its map is in the Conv now) and let its Add pass the other operand on. Runs
    after the forward folds: the Conv has its new weights and writes its chain's end."""
    index = scope.index
    # The Conv's result now holds the identity branch too: it gets a name of its own, so that no
    # name of the original (its BN's output, say) carries another value.
    conv = index.node(r.conv)
    v = conv.output[0]
    (reader,) = index.readers(v)
    renamed = index.fresh(f"{v}_reparameterized")
    node = onnx.NodeProto()
    node.CopyFrom(conv)
    node.output[0] = renamed
    index.replace_node(r.conv, node)
    node = onnx.NodeProto()
    node.CopyFrom(index.node(reader))
    for k, name in enumerate(node.input):
        if name == v:
            node.input[k] = renamed
    index.replace_node(reader, node)
    bn, add = index.node(r.bn), index.node(r.add)
    other = add.input[1] if add.input[0] == bn.output[0] else add.input[0]
    index.remove_node(r.bn)
    producer = index.producer.get(other)
    if producer is not None and index.uses(other) == 1 and index.node(producer).output[0] == other:
        node = onnx.NodeProto()
        node.CopyFrom(index.node(producer))
        node.output[0] = add.output[0]  # the sum's name survives
        index.remove_node(r.add)
        index.replace_node(producer, node)
    else:
        node = onnx.helper.make_node("Identity", [other], [add.output[0]], name=add.name)
        index.replace_node(r.add, node)
    return list(bn.input)


def plan_step(p: Planning) -> None:
    """Identity-branch BNs folded into a sibling Conv that no other fold uses; the sibling's forward
    chain then carries the identity (the chains are kept in node order)."""
    taken = {b.consumer for b in p.backs} | {ch.producer for c in p.splits for ch in c.branches}
    found, p.left = plan(p.scope, p.left, list(p.chains), taken)
    final = {c.producer: c for c in p.chains}
    for rp in found:
        reason = vet(p.scope, rp.chain, p.strict, Notes())  # its hazards are the sibling's, noted there
        if reason is not None:
            p.left[rp.bn] = reason
            continue
        final[rp.conv] = rp.chain
        p.reparams.append(rp)
        p.folded(rp.bn, node_label(p.scope.index.node(rp.conv)), "Conv", "identity")
    p.chains = sorted(final.values(), key=lambda c: c.producer)
