"""Statistics of an activation trace: sparsity, skew, token overlap vs distance, layer
correlation, and how Hermes' state-table predictor does on it (`ndpsched trace stats`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .trace import ActivationTrace, NeuronLayout, overlap_counts


def skew_figures(counts: np.ndarray) -> tuple[float, float]:
    """(share of activations on the top 20 % of neurons, fraction of neurons covering 80 %)."""
    c = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    total = c.sum()
    if total <= 0:
        return 0.0, 0.0
    csum = np.cumsum(c) / total
    top20 = float(csum[max(int(len(c) * 0.2) - 1, 0)])
    need80 = float((np.searchsorted(csum, 0.8) + 1) / len(c))
    return top20, need80


def overlap_curve(trace: ActivationTrace, max_distance: int = 50, max_layers: int | None = 4) -> np.ndarray:
    """(D,) mean fraction of token t's active neurons still active at t + d, d = 1..D.

    Measured on up to ``max_layers`` evenly spaced layers (None: all) of every sequence (dense,
    so the cost stays small for large models). Same computation as
    :meth:`ActivationTrace.token_overlap` (:func:`ndpsched.trace.overlap_counts`)."""
    hits, base = overlap_by_group(trace, max_distance, max_layers)[:2]
    return hits.sum(axis=0) / np.maximum(base.sum(axis=0), 1)


def overlap_by_group(trace: ActivationTrace, max_distance: int = 50,
                     max_layers: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overlap counts per (layer, kind) group, summed over sequences.

    Returns:
        hits, base: (G, D) float64 as in :func:`ndpsched.trace.overlap_counts`, G = 2 x the
        layers measured (QKV then FFN of each); groups: (G,) their ids ``2 * layer + kind``.
    """
    lay = trace.layout
    n = lay.n_layers if max_layers is None else min(max_layers, lay.n_layers)
    layers = np.unique(np.linspace(0, lay.n_layers - 1, n).astype(int))
    cols = np.concatenate([np.arange(l * lay.per_layer, (l + 1) * lay.per_layer) for l in layers])
    starts = (np.arange(len(layers))[:, None] * lay.per_layer + np.array([0, lay.d_qkv])[None, :]).ravel()
    D = max(min(max_distance, trace.n_tokens - 1), 0)
    hits, base = np.zeros((len(starts), D)), np.zeros((len(starts), D))
    for s in range(trace.n_seqs):
        h, b = overlap_counts(_dense_columns(trace, s, cols), D, starts)
        hits += h
        base += b
    groups = (layers[:, None] * 2 + np.array([0, 1])[None, :]).ravel()
    return hits, base, groups


def _dense_columns(trace: ActivationTrace, seq: int, cols: np.ndarray) -> np.ndarray:
    """(T, len(cols)) bool activity of the neurons ``cols`` in sequence ``seq``."""
    pos = np.full(trace.n_neurons, -1, dtype=np.int64)
    pos[cols] = np.arange(len(cols))
    out = np.empty((trace.n_tokens, len(cols)), dtype=bool)
    state = trace.initial_active(seq)[cols]
    for t in range(trace.n_tokens):
        if t:
            on, off = pos[trace.on(seq, t)], pos[trace.off(seq, t)]
            state[on[on >= 0]] = True
            state[off[off >= 0]] = False
        out[t] = state
    return out


def layer_correlation(trace: ActivationTrace, seq: int = 0) -> dict[str, float]:
    """For neurons with a correlation table entry: P(fires | its top previous-layer neuron fires),
    against its unconditional firing rate."""
    parents = getattr(trace, "layer_parents", None)
    if parents is None:
        return {}
    rng = np.random.default_rng(0)
    has = np.flatnonzero(parents[:, 0] >= 0)
    sample = np.sort(rng.choice(has, min(len(has), 4096), replace=False))
    cols = np.unique(np.concatenate([sample, parents[sample, 0]]))
    dense = _dense_columns(trace, seq, cols)
    idx = {c: i for i, c in enumerate(cols.tolist())}
    child = dense[:, [idx[c] for c in sample.tolist()]]
    parent = dense[:, [idx[c] for c in parents[sample, 0].tolist()]]
    fired = parent.sum(axis=0)
    ok = fired > 0
    cond = (child & parent).sum(axis=0)[ok] / fired[ok]
    return {"p_fire_given_parent": float(cond.mean()), "p_fire": float(child.mean()),
            "share_above_0.9": float((cond > 0.9).mean())}


def trace_stats(trace: ActivationTrace, model=None, prompt_len: int | None = None) -> dict[str, Any]:
    """All statistics of a trace as one dictionary (JSON friendly)."""
    lay = trace.layout
    freqs = trace.frequencies()
    qkv, ffn = lay.reshape(freqs)
    per_layer = []
    for layer in range(lay.n_layers):
        top20, need80 = skew_figures(ffn[layer])
        per_layer.append({"layer": layer, "ffn_sparsity": float(1 - ffn[layer].mean()),
                          "qkv_sparsity": float(1 - qkv[layer].mean()), "ffn_top20_share": top20,
                          "ffn_neurons_for_80pct": need80})
    out: dict[str, Any] = {
        "n_seqs": trace.n_seqs, "n_tokens": trace.n_tokens, "n_layers": lay.n_layers,
        "d_qkv": lay.d_qkv, "d_ffn": lay.d_ffn, "meta": trace.meta,
        "per_layer": per_layer,
        "mean_ffn_sparsity": float(1 - ffn.mean()),
        "mean_ffn_top20_share": float(np.mean([r["ffn_top20_share"] for r in per_layer])),
        "overlap": overlap_curve(trace).tolist(),
        "layer_correlation": layer_correlation(trace),
    }
    if model is not None:
        out["predictor"] = fsm_on_trace(trace, model, prompt_len or max(trace.n_tokens // 4, 1))
    return out


def fsm_on_trace(trace: ActivationTrace, model, prompt_len: int) -> dict[str, float]:
    """Recall and precision of Hermes' predictor (hermes.fsm) over sequence 0 of the trace."""
    from .costmodel import CostModel
    from .policy import SchedContext
    from .presets import load_hardware
    from .registry import registry

    hw = load_hardware()
    prefill = trace.frequencies(0, prompt_len)
    ctx = SchedContext(model, hw, CostModel(model, hw), NeuronLayout.of(model), 1, 5, prefill, prefill,
                       0.0, 0.0, np.random.default_rng(0), layer_parents=getattr(trace, "layer_parents", None))
    mode = "both" if ctx.layer_parents is not None else "token"
    pred = registry("predictor").create("hermes.fsm", {"mode": mode, "false_negative": "drop"})
    pred.begin(ctx, trace.active(0, prompt_len - 1), prompt_len - 1)
    for t in range(prompt_len, trace.n_tokens):
        pred.predict(t, trace.on(0, t), trace.off(0, t))
    return {"mode": mode, **pred.summary()}


def plot_stats(stats: dict[str, Any], path: str | Path) -> bool:
    """Overlap vs distance and per-layer skew as one PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    d = np.arange(1, len(stats["overlap"]) + 1)
    a.plot(d, stats["overlap"], marker=".")
    a.set_xlabel("distance (tokens)")
    a.set_ylabel("share of active neurons still active")
    a.set_ylim(0, 1)
    a.grid(alpha=0.3)
    a.set_title("token overlap vs distance")
    layers = [r["layer"] for r in stats["per_layer"]]
    b.plot(layers, [r["ffn_top20_share"] for r in stats["per_layer"]], label="top-20 % share")
    b.plot(layers, [r["ffn_neurons_for_80pct"] for r in stats["per_layer"]], label="neurons for 80 %")
    b.plot(layers, [r["ffn_sparsity"] for r in stats["per_layer"]], label="FFN sparsity")
    b.set_xlabel("layer")
    b.set_ylim(0, 1)
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    b.set_title("per-layer skew and sparsity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
