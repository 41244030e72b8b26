"""Layer-to-layer correlation in synthetic traces, and the offline correlation table.

Hermes observes that some neurons of layer l+1 fire with probability > 0.9 when a given neuron of
layer l fires, and its predictor keeps, per neuron, its two most correlated previous-layer
neurons. A synthetic trace gets that structure here: in every layer after the first, a fraction
``coupling`` of the neurons *follow* a parent in the previous layer (same kind, same frequency
rank, so the frequency profile is kept) and fire exactly when it fires. The trace then carries
``layer_parents`` (N, 2): the followed parent (the true top correlate) and a second, independent
neuron (a random one-to-one pick, as the weaker second entry); this is what an offline
co-occurrence profile of the trace reports for followers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .trace import ActivationTrace, NeuronLayout


@dataclass
class Coupling:
    """Which neurons follow which: ``parents`` (N, 2), ``follower`` (N,) bool, ``root`` (N,)."""

    parents: np.ndarray
    follower: np.ndarray
    root: np.ndarray


def plan_coupling(freqs: np.ndarray, layout: NeuronLayout, coupling: float, rng: np.random.Generator) -> Coupling:
    """Choose parents (column 0: the same-frequency-rank neuron of the previous layer, same kind;
    column 1: a random one; both one-to-one) and the followers; resolve each follower's root
    (the first non-follower up its chain)."""
    if not 0 <= coupling <= 1:
        raise ConfigError(f"layer_coupling must be in [0, 1], got {coupling}")
    n = layout.n_neurons
    parents = np.full((n, 2), -1, dtype=np.int64)
    for layer in range(1, layout.n_layers):
        for kind in (0, 1):
            cur, prev = layout.kind_slice(layer, kind), layout.kind_slice(layer - 1, kind)
            width = cur.stop - cur.start
            order_cur = np.argsort(-freqs[cur], kind="stable")
            by_rank_prev = np.argsort(-freqs[prev], kind="stable")
            # the neuron of rank r in this layer follows the neuron of rank r in the previous one
            parents[cur.start + order_cur, 0] = prev.start + by_rank_prev
            parents[cur, 1] = prev.start + rng.permutation(width)
    follower = (parents[:, 0] >= 0) & (rng.random(n) < coupling)
    root = np.arange(n)
    for layer in range(1, layout.n_layers):          # chains resolve in layer order
        sl = slice(layer * layout.per_layer, (layer + 1) * layout.per_layer)
        f = np.flatnonzero(follower[sl]) + sl.start
        root[f] = root[parents[f, 0]]
    return Coupling(parents, follower, root)


def add_followers(trace: ActivationTrace, plan: Coupling) -> ActivationTrace:
    """Give every follower its root's activity in a trace where followers never fire.

    O(events): per sequence, the roots' events are copied to their followers and merged into
    each token's sorted lists by one numeric sort of (token, neuron) keys.
    """
    n, T, S = trace.n_neurons, trace.n_tokens, trace.n_seqs
    fol = np.flatnonzero(plan.follower)
    roots = plan.root[fol]
    order = np.argsort(roots, kind="stable")
    fol_sorted = fol[order]
    n_fol = np.bincount(roots, minlength=n)
    fol_ptr = np.concatenate([[0], np.cumsum(n_fol)])
    shift = max(int(n - 1).bit_length(), 1)
    key_dtype = np.uint32 if shift + max(int(T - 1).bit_length(), 1) <= 32 else np.uint64
    has_fol = n_fol > 0
    initial = np.empty_like(trace.initial_packed)
    one_shift = key_dtype(shift)
    parts: dict[str, tuple[list, list]] = {"on": ([], []), "off": ([], [])}
    for s in range(S):
        state = trace.initial_active(s)
        state[fol] = state[roots]
        initial[s] = np.packbits(state)
        for name in ("on", "off"):
            ptr, idx = getattr(trace, f"{name}_ptr"), getattr(trace, f"{name}_idx")
            lo, hi = s * T, (s + 1) * T
            ids = idx[ptr[lo]: ptr[hi]]
            key = np.repeat(np.arange(T, dtype=key_dtype) << one_shift, np.diff(ptr[lo: hi + 1]))
            src = np.flatnonzero(has_fol[ids])
            reps = n_fol[ids[src]]
            starts = np.repeat(fol_ptr[ids[src]], reps)
            offs = np.arange(len(starts)) - np.repeat(np.cumsum(reps) - reps, reps)
            copies = np.repeat(key[src], reps) | fol_sorted[starts + offs].astype(key_dtype)
            key |= ids.astype(key_dtype)
            key = np.concatenate([key, copies])
            key.sort()
            # tokens are the keys' high bits: each token's slice boundary by binary search
            inner = np.searchsorted(key, np.arange(1, T, dtype=key_dtype) << one_shift)
            parts[name][0].append(np.diff(np.concatenate([[0], inner, [len(key)]])))
            parts[name][1].append((key & key_dtype((1 << shift) - 1)).astype(np.int32))
    csr = {name: (np.concatenate([[0], np.cumsum(np.concatenate(c))]).astype(np.int64), np.concatenate(i))
           for name, (c, i) in parts.items()}
    out = ActivationTrace(trace.layout, S, T, initial, *csr["on"], *csr["off"], trace.meta, trace.offline_freqs)
    out.layer_parents = plan.parents
    return out
