"""Fit the two-time-scale generator to a recorded trace, scale the fit to any model, generate
(`ndpsched trace fit`, trace source ``fitted:PARAMS.yaml``).

What is fitted, per (layer, kind) group of the recorded trace:

- **frequencies**: the group's sorted per-neuron activation frequencies (its quantile
  function) at ``N_QUANTILES`` evenly spaced quantiles, and the group's mean;
- **overlap vs distance** O(d), d = 1..50 (share of token t's active neurons still active at
  t + d). The generator (:func:`ndpsched.tracegen.two_scale_trace`) gives
  ``O(d) = A + (1 - A) (c + v rho^d)`` with ``A = sum f^2 / sum f`` fixed by the frequencies;
  ``c`` (slow share: per-sequence frequencies), ``v = w (1 - c)`` (w: share of persistent
  neurons) and ``rho`` (their lag-1 autocorrelation) are fitted by weighted least squares
  (rho on a grid, c and v in closed form, both kept >= 0);
- **layer coupling**: for every neuron of layer l >= 1, its best predictor among the previous
  layer's neurons of the same kind, ``max_j P(i fires | j fires)`` over parents that fire at
  least ``MIN_PARENT_FIRINGS`` times; the share of neurons whose best predictor reaches 0.9
  becomes the group's share of exact followers (see :mod:`ndpsched.layercorr`).

Scaling rule (:meth:`TraceFit.for_layout`): target layer l' of L' sits at relative depth
(l' + 0.5) / L'; every fitted quantity (quantile curves element-wise, c, w, rho, coupling) is
interpolated linearly between the two source layers nearest that depth (clamped at the ends);
the quantile curve is then resampled to the target width and assigned to the neurons in a
seeded random order. Frequencies keep the recorded trace's absolute level (a 10 %-dense
recording gives a 10 %-dense llama2-70b trace), not the target preset's active fraction.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, TraceError
from .trace import ActivationTrace, NeuronLayout

log = logging.getLogger(__name__)

FIT_FORMAT = "ndpsched-trace-fit"
FIT_VERSION = 1
#: points of each group's stored quantile function
N_QUANTILES = 256
#: distances of the fitted overlap curve (the issue's d = 1..50)
MAX_DISTANCE = 50
#: a previous-layer neuron counts as a predictor only if it fired at least this often (fewer
#: firings give P = 1 by chance); chosen default
MIN_PARENT_FIRINGS = 20
#: a neuron whose best predictor reaches this conditional probability is a follower (Hermes'
#: "fire with probability > 0.9 with a given previous-layer neuron")
FOLLOW_PROBABILITY = 0.9
#: at most this many neurons per group and tokens are used for the layer-correlation search
MAX_CORR_NEURONS = 1024
MAX_CORR_TOKENS = 2048
_RHO_GRID = np.linspace(0.0, 0.99, 199)


@dataclass
class TraceFit:
    """Fitted generator parameters, one row per source layer, columns (qkv, ffn).

    Attributes:
        quantiles: (L, 2, Q) float64, each group's frequencies at quantiles (k + 0.5) / Q, ascending.
        slow_share: (L, 2) c, persistent_share: (L, 2) w, persistence: (L, 2) rho.
        layer_coupling: (L, 2) share of exact followers of the previous layer (row 0 is 0).
        source: where the fit came from (model, shape, tokens, file).
    """

    quantiles: np.ndarray
    slow_share: np.ndarray
    persistent_share: np.ndarray
    persistence: np.ndarray
    layer_coupling: np.ndarray
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.quantiles = np.asarray(self.quantiles, dtype=np.float64)
        n_layers = self.quantiles.shape[0] if self.quantiles.ndim == 3 else -1
        if self.quantiles.ndim != 3 or self.quantiles.shape[1] != 2 or n_layers < 1 or self.quantiles.shape[2] < 2:
            raise TraceError(f"fit quantiles must be (layers, 2, >=2), got shape {self.quantiles.shape}")
        if not np.all((self.quantiles >= 0) & (self.quantiles <= 1)):
            raise TraceError("fit quantiles must be frequencies in [0, 1]")
        for name, hi_ok in (("slow_share", False), ("persistent_share", True), ("persistence", False),
                            ("layer_coupling", True)):
            v = np.asarray(getattr(self, name), dtype=np.float64)
            if v.shape != (n_layers, 2):
                raise TraceError(f"fit {name} must have shape ({n_layers}, 2), got {v.shape}")
            if not np.all((v >= 0) & ((v <= 1) if hi_ok else (v < 1))):
                raise TraceError(f"fit {name} must be in [0, 1{']' if hi_ok else ')'}")
            setattr(self, name, v)

    @property
    def n_layers(self) -> int:
        return self.quantiles.shape[0]

    # ---- scaling ------------------------------------------------------------------------
    def at_depths(self, n_layers: int) -> TraceFit:
        """The fit interpolated to ``n_layers`` layers by relative depth (see the module doc)."""
        if n_layers < 1:
            raise ConfigError(f"n_layers must be >= 1, got {n_layers}")
        src = (np.arange(self.n_layers) + 0.5) / self.n_layers
        dst = (np.arange(n_layers) + 0.5) / n_layers
        pos = np.interp(dst, src, np.arange(self.n_layers, dtype=np.float64))   # fractional source layer
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, self.n_layers - 1)
        t = pos - lo

        def mix(x: np.ndarray) -> np.ndarray:
            tt = t.reshape((-1,) + (1,) * (x.ndim - 1))
            return (1 - tt) * x[lo] + tt * x[hi]
        coupling = mix(self.layer_coupling)
        coupling[0] = 0.0           # the first layer has no previous layer
        return TraceFit(mix(self.quantiles), mix(self.slow_share), mix(self.persistent_share),
                        mix(self.persistence), coupling, dict(self.source))

    def for_layout(self, layout: NeuronLayout, seed: int | np.random.SeedSequence = 0) -> dict[str, np.ndarray]:
        """Generator inputs for ``layout``: ``freqs`` (N,), and per group (2L,) ``slow_share``,
        ``persistent_share``, ``persistence``; ``layer_coupling`` (L, 2)."""
        fit = self.at_depths(layout.n_layers)
        rng = np.random.default_rng(seed)
        q = fit.quantiles.shape[2]
        u_src = (np.arange(q) + 0.5) / q
        parts = []
        for kind, width in enumerate((layout.d_qkv, layout.d_ffn)):
            u_dst = (np.arange(width) + 0.5) / width
            rows = np.stack([np.interp(u_dst, u_src, fit.quantiles[l, kind]) for l in range(layout.n_layers)])
            # keep each group's mean exactly: the stored curve is a resampling
            want = fit.quantiles[:, kind].mean(axis=1, keepdims=True)
            have = rows.mean(axis=1, keepdims=True)
            rows = np.where(have > 0, rows * want / np.maximum(have, 1e-300), rows)
            parts.append(rng.permuted(rows, axis=1))
        from .tracegen import MAX_FREQUENCY

        freqs = np.minimum(np.concatenate(parts, axis=1).ravel(), MAX_FREQUENCY)
        return {"freqs": freqs, "slow_share": fit.slow_share.ravel(), "persistent_share": fit.persistent_share.ravel(),
                "persistence": fit.persistence.ravel(), "layer_coupling": fit.layer_coupling}

    # ---- YAML ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def rows(x: np.ndarray) -> list:
            return np.round(x, 6).tolist()
        return {"format": FIT_FORMAT, "version": FIT_VERSION, "source": self.source,
                "n_layers": self.n_layers, "n_quantiles": int(self.quantiles.shape[2]),
                "columns": ["qkv", "ffn"],
                "slow_share": rows(self.slow_share), "persistent_share": rows(self.persistent_share),
                "persistence": rows(self.persistence), "layer_coupling": rows(self.layer_coupling),
                "quantiles": {"qkv": rows(self.quantiles[:, 0]), "ffn": rows(self.quantiles[:, 1])}}

    def save(self, path: str | Path) -> None:
        """Write the fit as YAML (plain lists; the quantile curves last)."""
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, width=120))

    @classmethod
    def load(cls, path: str | Path) -> TraceFit:
        """Read a fit written by :meth:`save`; a missing or foreign file raises TraceError."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise TraceError(f"fit file '{path}' does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise TraceError(f"fit file '{path}' is not readable YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict) or data.get("format") != FIT_FORMAT:
            raise TraceError(f"'{path}' is not an ndpsched trace fit (no format: {FIT_FORMAT})")
        if data.get("version") != FIT_VERSION:
            raise TraceError(f"fit '{path}' has version {data.get('version')}, this ndpsched reads {FIT_VERSION}")
        try:
            quant = np.stack([np.asarray(data["quantiles"]["qkv"], dtype=np.float64),
                              np.asarray(data["quantiles"]["ffn"], dtype=np.float64)], axis=1)
            return cls(quant, data["slow_share"], data["persistent_share"], data["persistence"],
                       data["layer_coupling"], data.get("source") or {})
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, TraceError):
                raise TraceError(f"fit '{path}': {exc}") from None
            raise TraceError(f"fit '{path}' is missing or has malformed entries ({exc})") from None


# ---- fitting --------------------------------------------------------------------------------
def quantile_curves(freqs: np.ndarray, layout: NeuronLayout, n_quantiles: int = N_QUANTILES) -> np.ndarray:
    """(L, 2, Q) ascending frequency quantile function of every group (linear interpolation)."""
    f = np.asarray(freqs, dtype=np.float64).reshape(layout.n_layers, layout.per_layer)
    out = np.empty((layout.n_layers, 2, n_quantiles))
    u = (np.arange(n_quantiles) + 0.5) / n_quantiles
    for kind, part in enumerate((f[:, : layout.d_qkv], f[:, layout.d_qkv:])):
        srt = np.sort(part, axis=1)
        u_src = (np.arange(srt.shape[1]) + 0.5) / srt.shape[1]
        out[:, kind] = np.stack([np.interp(u, u_src, row) for row in srt])
    return out


def fit_dynamics(curve: np.ndarray, weight: np.ndarray, independent: np.ndarray) -> tuple[np.ndarray, ...]:
    """Fit ``O(d) = A + (1 - A) (c + v rho^d)`` per group.

    Args:
        curve: (G, D) measured overlap at d = 1..D; weight: (G, D) its weights (active
            neurons counted at each distance); independent: (G,) A.

    Returns:
        (c, w, rho), each (G,): slow share in [0, 0.98], persistent share w = v / (1 - c) in
        [0, 1], persistence in [0, 0.99].
    """
    G, D = curve.shape
    a = independent[:, None]
    e = (curve - a) / np.maximum(1 - a, 1e-9)             # excess over independent tokens
    wgt = weight / np.maximum(weight.sum(axis=1, keepdims=True), 1e-300)
    d = np.arange(1, D + 1)
    best = (np.full(G, np.inf), np.zeros(G), np.zeros(G), np.zeros(G))
    for rho in _RHO_GRID:
        x = rho ** d                                         # (D,)
        # weighted least squares for e ~ c + v x, then the non-negative corners
        sw, sx, sxx = wgt.sum(1), (wgt * x).sum(1), (wgt * x * x).sum(1)
        se, sxe = (wgt * e).sum(1), (wgt * x * e).sum(1)
        det = sw * sxx - sx ** 2
        c = np.where(det > 1e-15, (sxx * se - sx * sxe) / np.where(det > 1e-15, det, 1), se / np.maximum(sw, 1e-300))
        v = np.where(det > 1e-15, (sw * sxe - sx * se) / np.where(det > 1e-15, det, 1), 0.0)
        c_only = np.maximum(se / np.maximum(sw, 1e-300), 0)
        v_only = np.maximum(sxe / np.maximum(sxx, 1e-300), 0)
        cands = [(np.maximum(c, 0), np.maximum(v, 0)), (c_only, np.zeros(G)), (np.zeros(G), v_only)]
        for i, (cc, vv) in enumerate(cands):
            ok = (c >= 0) & (v >= 0) if i == 0 else np.ones(G, bool)
            cc = np.minimum(cc, 0.98)
            vv = np.minimum(vv, 1 - cc)
            err = (wgt * (e - cc[:, None] - vv[:, None] * x) ** 2).sum(1)
            better = ok & (err < best[0])
            best = tuple(np.where(better, new, old) for new, old in
                         zip((err, cc, vv, np.full(G, rho)), best))
    _, c, v, rho = best
    w = np.where(v > 0, v / np.maximum(1 - c, 1e-12), 0.0)
    return c, np.minimum(w, 1.0), np.where(w > 0, rho, 0.0)


def layer_correlation_profile(trace: ActivationTrace, min_parent_firings: int = MIN_PARENT_FIRINGS,
                              seed: int = 0, max_layers: int | None = None) -> dict[str, np.ndarray]:
    """Each sampled neuron's best previous-layer predictor, per (layer, kind).

    Returns (L, 2) arrays (NaN where not measured: layer 0, and layers skipped when
    ``max_layers`` limits the search to that many evenly spaced layers): ``mean_best`` the mean
    over up to MAX_CORR_NEURONS of the group's neurons of ``max_j P(i fires | j fires)`` (j:
    previous-layer neurons of the same kind firing at least ``min_parent_firings`` times over
    the first MAX_CORR_TOKENS tokens; a neuron that never fires counts 0), and ``share_follow``
    the share whose best reaches FOLLOW_PROBABILITY.
    """
    from .tracestats import _dense_columns

    lay = trace.layout
    rng = np.random.default_rng(seed)
    per_seq = max(MAX_CORR_TOKENS // trace.n_seqs, 1)
    layers = np.arange(1, lay.n_layers)
    if max_layers is not None and len(layers) > max_layers:
        layers = np.unique(np.linspace(1, lay.n_layers - 1, max_layers).astype(int))
    mean_best = np.full((lay.n_layers, 2), np.nan)
    share = np.full((lay.n_layers, 2), np.nan)
    for layer in layers.tolist():
        cols = np.arange((layer - 1) * lay.per_layer, (layer + 1) * lay.per_layer)
        dense = np.concatenate([_dense_columns(trace, s, cols)[:per_seq] for s in range(trace.n_seqs)])
        dense = dense.astype(np.float32)
        for kind in (0, 1):
            cur, prev = lay.kind_slice(layer, kind), lay.kind_slice(layer - 1, kind)
            base = cols[0]
            child = dense[:, cur.start - base: cur.stop - base]
            if child.shape[1] > MAX_CORR_NEURONS:
                child = child[:, np.sort(rng.choice(child.shape[1], MAX_CORR_NEURONS, replace=False))]
            parent = dense[:, prev.start - base: prev.stop - base]
            fired = parent.sum(axis=0)
            ok = fired >= min_parent_firings
            if not ok.any():
                mean_best[layer, kind] = share[layer, kind] = 0.0
                continue
            co = child.T @ parent[:, ok]                        # (children, parents) co-firings
            best = (co / fired[ok][None, :]).max(axis=1)
            mean_best[layer, kind] = best.mean()
            share[layer, kind] = (best >= FOLLOW_PROBABILITY).mean()
    return {"mean_best": mean_best, "share_follow": share}


def fit_trace(trace: ActivationTrace, max_distance: int = MAX_DISTANCE, source_path: str | None = None) -> TraceFit:
    """Fit the two-time-scale generator to ``trace`` (see the module doc)."""
    from .tracegen import independent_overlap
    from .tracestats import overlap_by_group

    D = min(max_distance, trace.n_tokens - 1)
    if D < 2:
        raise TraceError(f"fitting needs sequences of at least 3 tokens, the trace has {trace.n_tokens}")
    lay = trace.layout
    freqs = trace.frequencies()
    hits, base, groups = overlap_by_group(trace, D, max_layers=None)
    curve = hits / np.maximum(base, 1)
    a = independent_overlap(freqs, lay)[groups]
    c, w, rho = fit_dynamics(curve, base, a)
    coupling = layer_correlation_profile(trace)["share_follow"]
    coupling[0] = 0.0
    src = {"model": trace.meta.get("model"), "file": source_path, "n_layers": lay.n_layers,
           "d_qkv": lay.d_qkv, "d_ffn": lay.d_ffn, "n_seqs": trace.n_seqs, "n_tokens": trace.n_tokens,
           "text": trace.meta.get("text"), "max_distance": D}
    shape = (lay.n_layers, 2)
    return TraceFit(quantile_curves(freqs, lay), c.reshape(shape), w.reshape(shape), rho.reshape(shape),
                    np.nan_to_num(coupling), src)


# ---- generation -----------------------------------------------------------------------------
def fitted_trace(fit: TraceFit, layout: NeuronLayout, n_tokens: int, n_seqs: int = 1, seed: int = 0,
                 model_name: str | None = None, layer_coupling: Any = None) -> ActivationTrace:
    """A trace of ``layout`` from a fit: frequencies, dynamics and coupling scaled to its shape.

    ``layer_coupling`` overrides the fitted follower shares (None: the fit's). One root seed:
    children seed the frequency order, the coupling plan and the chains.
    """
    from .layercorr import add_followers, plan_coupling
    from .tracegen import two_scale_trace

    freq_seed, couple_seed, chain_seed = np.random.SeedSequence(seed).spawn(3)
    p = fit.for_layout(layout, freq_seed)
    plan = plan_coupling(p["freqs"], layout, p["layer_coupling"] if layer_coupling is None else layer_coupling,
                         np.random.default_rng(couple_seed))
    freqs = p["freqs"]
    offline = freqs.copy()
    offline[plan.follower] = freqs[plan.root[plan.follower]]
    runtime = freqs.copy()
    runtime[plan.follower] = 0.0                              # followers get their root's events
    meta = {"model": model_name, "generator": "fitted", "fit_source": fit.source, "seed": seed}
    trace = two_scale_trace(runtime, layout, p["slow_share"], p["persistent_share"], p["persistence"],
                            n_tokens, n_seqs, chain_seed, meta)
    trace = add_followers(trace, plan) if plan.follower.any() else trace
    trace.offline_freqs = offline.astype(np.float32)
    trace.layer_parents = plan.parents
    return trace


# ---- comparison -----------------------------------------------------------------------------
def compare_stats(real: ActivationTrace, synth: ActivationTrace, max_distance: int = MAX_DISTANCE,
                  max_layers: int | None = 16) -> dict[str, Any]:
    """Side-by-side statistics of two traces (possibly of different shapes).

    Overlap curves over up to ``max_layers`` evenly spaced layers (all QKV and FFN neurons of
    them); skew: the mean over layers of each layer's FFN (and QKV) top-20 % share and
    fraction of neurons for 80 %; sparsity; layer correlation (mean best predictor
    probability, share of followers) averaged over layers and kinds.
    """
    from .tracestats import overlap_curve, skew_figures

    out: dict[str, Any] = {}
    for name, tr in (("real", real), ("fitted", synth)):
        lay = tr.layout
        qkv, ffn = lay.reshape(tr.frequencies())
        row: dict[str, Any] = {"overlap": overlap_curve(tr, max_distance, max_layers)}
        for kind, part in (("ffn", ffn), ("qkv", qkv)):
            sk = np.array([skew_figures(r) for r in part])
            row[f"{kind}_top20_share"] = float(sk[:, 0].mean())
            row[f"{kind}_neurons_for_80pct"] = float(sk[:, 1].mean())
            row[f"{kind}_density"] = float(part.mean())
        corr = layer_correlation_profile(tr, max_layers=max_layers)
        row["corr_mean_best"] = float(np.nanmean(corr["mean_best"]))
        row["corr_share_follow"] = float(np.nanmean(corr["share_follow"]))
        out[name] = row
    d = min(len(out["real"]["overlap"]), len(out["fitted"]["overlap"]))
    out["overlap_max_abs_error"] = float(np.abs(out["real"]["overlap"][:d] - out["fitted"]["overlap"][:d]).max())
    out["skew_max_abs_error"] = float(max(abs(out["real"][k] - out["fitted"][k]) for k in
                                          ("ffn_top20_share", "ffn_neurons_for_80pct", "qkv_top20_share",
                                           "qkv_neurons_for_80pct")))
    for name in ("real", "fitted"):
        out[name]["overlap"] = out[name]["overlap"].tolist()
    return out


def format_comparison(cmp: dict[str, Any], labels: tuple[str, str] = ("real", "fitted")) -> str:
    """The comparison as a printable table."""
    r, f = cmp["real"], cmp["fitted"]
    lines = [f"{'statistic':<32} {labels[0]:>10} {labels[1]:>10} {'error':>8}"]
    for d in (1, 2, 3, 5, 10, 20, 25, 50):
        if d <= min(len(r["overlap"]), len(f["overlap"])):
            a, b = r["overlap"][d - 1], f["overlap"][d - 1]
            lines.append(f"{f'overlap d={d}':<32} {a:>10.3f} {b:>10.3f} {b - a:>+8.3f}")
    for key in ("ffn_top20_share", "ffn_neurons_for_80pct", "qkv_top20_share", "qkv_neurons_for_80pct",
                "ffn_density", "qkv_density", "corr_mean_best", "corr_share_follow"):
        lines.append(f"{key:<32} {r[key]:>10.3f} {f[key]:>10.3f} {f[key] - r[key]:>+8.3f}")
    lines.append(f"max |error| of the overlap curve (d = 1..{min(len(r['overlap']), len(f['overlap']))}): "
                 f"{cmp['overlap_max_abs_error']:.3f}; of the skew figures: {cmp['skew_max_abs_error']:.3f}")
    return "\n".join(lines)


# ---- `ndpsched trace fit` -------------------------------------------------------------------
def fit_command(path: str, out: str | None = None, generate: str | None = None, model: str | None = None,
                n_tokens: int = 256, n_seqs: int = 1, seed: int = 0) -> dict[str, Any]:
    """Fit ``path``, optionally write the fit (``out``) and a generated trace of ``model``.

    Without ``generate`` the fit is checked on a trace of the recording's own shape and length;
    with it, on the generated trace. Returns the comparison (:func:`compare_stats`) with
    ``fit_s``, ``generate_s`` and the target's description added.
    """
    import time

    if generate is not None and model is None:
        raise ConfigError("--generate needs --model (the preset whose shape to generate)")
    if n_tokens < 2 or n_seqs < 1:
        raise ConfigError(f"--tokens must be >= 2 and --seqs >= 1, got {n_tokens}, {n_seqs}")
    real = ActivationTrace.load(path)
    t0 = time.perf_counter()
    fit = fit_trace(real, source_path=str(path))
    fit_s = time.perf_counter() - t0
    if out is not None:
        fit.save(out)
    if generate is None:
        layout, name, n_tokens, n_seqs = real.layout, real.meta.get("model"), real.n_tokens, real.n_seqs
    else:
        from .presets import load_model

        spec = load_model(model)
        layout, name = NeuronLayout.of(spec), spec.name
    t0 = time.perf_counter()
    synth = fitted_trace(fit, layout, n_tokens, n_seqs, seed, name)
    gen_s = time.perf_counter() - t0
    if generate is not None:
        synth.save(generate)
    cmp = compare_stats(real, synth)
    cmp.update(fit_s=fit_s, generate_s=gen_s, target={"model": name, "n_layers": layout.n_layers,
                                                      "d_qkv": layout.d_qkv, "d_ffn": layout.d_ffn,
                                                      "n_tokens": n_tokens, "n_seqs": n_seqs},
               real_shape={"n_layers": real.layout.n_layers, "d_qkv": real.layout.d_qkv,
                           "d_ffn": real.layout.d_ffn, "n_tokens": real.n_tokens, "n_seqs": real.n_seqs})
    return cmp


def trace_from_fit_file(path: str | Path, model, n_tokens: int, n_seqs: int = 1, seed: int = 0) -> ActivationTrace:
    """A trace for ``model`` generated from the fit saved at ``path`` (the trace source
    ``fitted:PATH``): frequencies, dynamics and follower shares all come from the fit."""
    fit = TraceFit.load(path)
    return fitted_trace(fit, NeuronLayout.of(model), n_tokens, n_seqs, seed, model.name)
