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


def plan_coupling(freqs: np.ndarray, layout: NeuronLayout, coupling: float | np.ndarray,
                  rng: np.random.Generator) -> Coupling:
    """Choose parents (column 0: the same-frequency-rank neuron of the previous layer, same kind;
    column 1: a random one; both one-to-one) and the followers; resolve each follower's root
    (the first non-follower up its chain).

    ``coupling`` is the share of followers: one value, or one per layer (L,) or per (layer,
    kind) (L, 2) (a fitted trace's measured shares); layer 0 has no parents, so no followers.
    """
    n_layers, per = layout.n_layers, layout.per_layer
    share = np.asarray(coupling, dtype=np.float64)
    if share.ndim == 1 and share.shape == (n_layers,):
        share = np.repeat(share[:, None], 2, axis=1)
    if share.ndim not in (0, 2) or (share.ndim == 2 and share.shape != (n_layers, 2)):
        raise ConfigError(f"layer_coupling must be one value, ({n_layers},) or ({n_layers}, 2), got shape {share.shape}")
    if not np.all((share >= 0) & (share <= 1)):
        raise ConfigError(f"layer_coupling must be in [0, 1], got {coupling if share.ndim == 0 else 'an array outside'}")
    n = layout.n_neurons
    parents = np.full((n, 2), -1, dtype=np.int64)
    f = np.asarray(freqs).reshape(n_layers, per)
    for kind, (offset, width) in enumerate(((0, layout.d_qkv), (layout.d_qkv, layout.d_ffn))):
        # rank order of every layer at once (one batched stable sort); the neuron of rank r in
        # layer l follows the neuron of rank r in layer l - 1
        order = np.argsort(-f[:, offset: offset + width], axis=1, kind="stable")
        base = np.arange(n_layers, dtype=np.int64)[:, None] * per + offset
        parents[(base[1:] + order[1:]).ravel(), 0] = (base[:-1] + order[:-1]).ravel()
    for layer in range(1, n_layers):              # same draws, in the same order, as ever
        for kind in (0, 1):
            cur, prev = layout.kind_slice(layer, kind), layout.kind_slice(layer - 1, kind)
            parents[cur, 1] = prev.start + rng.permutation(cur.stop - cur.start)
    limit = share if share.ndim == 0 else share.ravel()[layout.group_of()]
    follower = (parents[:, 0] >= 0) & (rng.random(n) < limit)
    root = np.arange(n)
    for layer in range(1, n_layers):              # chains resolve in layer order
        sl = slice(layer * per, (layer + 1) * per)
        fl = np.flatnonzero(follower[sl]) + sl.start
        root[fl] = root[parents[fl, 0]]
    return Coupling(parents, follower, root)


def add_followers(trace: ActivationTrace, plan: Coupling) -> ActivationTrace:
    """Give every follower its root's activity in a trace where followers never fire.

    O(events): per sequence, every root event is copied to the root's followers (round k copies
    it to the k-th follower of the roots that have more than k; a root has few, so few rounds),
    and the copies are merged into each token's sorted lists by one numeric sort of (token,
    neuron) keys, most of them already in order.
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
    fol_keys = fol_sorted.astype(key_dtype)
    id_mask = key_dtype((1 << shift) - 1)
    parts: dict[str, tuple[list, list]] = {"on": ([], []), "off": ([], [])}
    for s in range(S):
        state = trace.initial_active(s)
        state[fol] = state[roots]
        initial[s] = np.packbits(state)
        for name in ("on", "off"):
            ptr, idx = getattr(trace, f"{name}_ptr"), getattr(trace, f"{name}_idx")
            lo, hi = s * T, (s + 1) * T
            ids = idx[ptr[lo]: ptr[hi]]
            token_key = np.repeat(np.arange(T, dtype=key_dtype) << one_shift, np.diff(ptr[lo: hi + 1]))
            src = np.flatnonzero(has_fol[ids])
            first = fol_ptr[ids[src]]
            left = n_fol[ids[src]]
            tok = token_key[src]
            pieces = [np.bitwise_or(token_key, ids, out=token_key, casting="unsafe")]
            k = 0
            while len(tok):
                pieces.append(tok | fol_keys[first + k])
                k += 1
                more = left > k
                if not more.all():
                    tok, first, left = tok[more], first[more], left[more]
            key = np.concatenate(pieces)
            key.sort()
            # tokens are the keys' high bits: each token's slice boundary by binary search
            inner = np.searchsorted(key, np.arange(1, T, dtype=key_dtype) << one_shift)
            parts[name][0].append(np.diff(np.concatenate([[0], inner, [len(key)]])))
            parts[name][1].append(np.bitwise_and(key, id_mask, out=np.empty(len(key), np.int32), casting="unsafe"))
    csr = {name: (np.concatenate([[0], np.cumsum(np.concatenate(c))]).astype(np.int64), np.concatenate(i))
           for name, (c, i) in parts.items()}
    out = ActivationTrace(trace.layout, S, T, initial, *csr["on"], *csr["off"], trace.meta, trace.offline_freqs)
    out.layer_parents = plan.parents
    return out
