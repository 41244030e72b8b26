"""Synthetic activation traces: per-neuron frequencies + temporal persistence.

Two ingredients:

1. **Per-neuron activation frequencies** f_i (probability that neuron i is active at a token),
   either from a skew parameter (:func:`frequencies_from_skew`) or from a real profile
   resampled to the model's widths (:func:`frequencies_from_profile`, the shipped ReluLLaMA-7B
   counts by default). The mean per (layer, kind) is the model's measured active fraction.
2. **Temporal persistence**: each neuron is a two-state Markov chain whose stationary
   probability is f_i and whose lag-1 autocorrelation rho is set per (layer, kind) so that
   adjacent tokens share a target fraction ``token_overlap`` of their active neurons (Hermes:
   >90 %). With p_on = f(1 - rho) and p_off = (1 - f)(1 - rho), the overlap is
   ``A + (1 - A) rho`` with ``A = sum f^2 / sum f``, solved for rho in closed form.

The generator is event driven: it draws each neuron's geometric holding times, so its cost is
proportional to the number of on/off events, not to neurons x tokens.
"""
from __future__ import annotations

import functools
from importlib import resources

import numpy as np

from .errors import ConfigError, TraceError
from .models import ModelSpec
from .trace import ActivationTrace, NeuronLayout

#: cap on any neuron's activation probability (a neuron firing at every token is not a
#: Markov chain with finite holding times); chosen default
MAX_FREQUENCY = 0.995
#: Hermes: adjacent tokens share >90 % of active neurons
DEFAULT_TOKEN_OVERLAP = 0.9
#: "20 % of neurons do 80 % of the work" (Hermes section III)
DEFAULT_TOP20_SHARE = 0.8


def _scale_to_mean(shape: np.ndarray, mean: float) -> np.ndarray:
    """Scale non-negative ``shape`` (rows = groups) so each row has ``mean``, capping at MAX_FREQUENCY.

    Capped mass is redistributed over the uncapped neurons by a few fixed-point iterations.
    """
    shape = np.asarray(shape, dtype=np.float64)
    if mean <= 0 or mean >= MAX_FREQUENCY:
        raise ConfigError(f"mean activation frequency must be in (0, {MAX_FREQUENCY}), got {mean}")
    f = shape / np.maximum(shape.mean(axis=-1, keepdims=True), 1e-300) * mean
    for _ in range(50):
        f = np.minimum(f, MAX_FREQUENCY)
        deficit = mean - f.mean(axis=-1, keepdims=True)
        if np.all(np.abs(deficit) < 1e-9 * mean):
            break
        free = f < MAX_FREQUENCY
        free_mass = np.where(free, f, 0).sum(axis=-1, keepdims=True)
        f = np.where(free, f * (1 + deficit * f.shape[-1] / np.maximum(free_mass, 1e-300)), f)
    return np.minimum(f, MAX_FREQUENCY)


def _per_group_means(model: ModelSpec) -> tuple[float, float]:
    return model.active_fraction  # (qkv, ffn)


def frequencies_from_skew(model: ModelSpec, top20_share: float = DEFAULT_TOP20_SHARE,
                          seed: int | np.random.SeedSequence = 0) -> np.ndarray:
    """(N,) per-neuron frequencies where the top 20 % of each layer's neurons do ``top20_share``.

    Frequencies follow f = c u^k on a uniform quantile grid u, so the top-20 % share before
    capping is 1 - 0.8^(k+1); ``k`` is solved from ``top20_share`` and c from the model's
    active fraction. Neuron order within each layer is a seeded random permutation.
    """
    if not 0.2 <= top20_share < 1:
        raise ConfigError(f"top20_share must be in [0.2, 1), got {top20_share}")
    k = np.log(1 - top20_share) / np.log(0.8) - 1.0
    rng = np.random.default_rng(seed)
    layout = NeuronLayout.of(model)
    qkv_mean, ffn_mean = _per_group_means(model)
    parts = []
    for width, mean in ((layout.d_qkv, qkv_mean), (layout.d_ffn, ffn_mean)):
        u = (np.arange(width) + 0.5) / width
        shape = np.broadcast_to(u ** k, (layout.n_layers, width))
        f = _scale_to_mean(shape, mean)
        parts.append(rng.permuted(f, axis=1))
    return np.concatenate(parts, axis=1).ravel()


@functools.lru_cache(maxsize=1)
def relullama7b_counts() -> np.ndarray:
    """(32, 11008) uint32: the real ReluLLaMA-7B MLP activation counts shipped in the package.

    Provenance in ``ndpsched/data/README.md`` (PowerInfer's published profile).
    """
    path = resources.files("ndpsched").joinpath("data/relullama7b_mlp_counts.npz")
    with resources.as_file(path) as p, np.load(p) as f:
        return f["counts"]


def resample_profile(counts: np.ndarray, n_layers: int, width: int) -> np.ndarray:
    """Resample an (L0, n0) activation profile to (n_layers, width) keeping each layer's shape.

    Layers map by relative depth (nearest source layer); within a layer the sorted frequency
    curve (its quantile function) is interpolated to the new width, then the original neurons'
    rank order is kept when widths match and a deterministic spread is used otherwise.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] == 0 or counts.shape[1] == 0:
        raise TraceError(f"an activation profile must be a non-empty (layers, neurons) array, got {counts.shape}")
    if np.any(counts < 0):
        raise TraceError("an activation profile must not contain negative counts")
    src_layers = np.minimum((np.arange(n_layers) + 0.5) / n_layers * counts.shape[0], counts.shape[0] - 1).astype(int)
    rows = counts[src_layers]
    if rows.shape[1] == width:
        return rows
    q_src = (np.arange(rows.shape[1]) + 0.5) / rows.shape[1]
    q_dst = (np.arange(width) + 0.5) / width
    srt = np.sort(rows, axis=1)
    return np.stack([np.interp(q_dst, q_src, r) for r in srt])


def frequencies_from_profile(model: ModelSpec, counts: np.ndarray | None = None,
                             seed: int | np.random.SeedSequence = 0) -> np.ndarray:
    """(N,) per-neuron frequencies whose per-layer shape follows a real activation profile.

    Args:
        model: target model; its active fractions set the mean level (the profile's counts have
            no token count, so only their shape is used).
        counts: (L0, n0) activation counts; default the shipped ReluLLaMA-7B MLP profile.
        seed: seeds the neuron order when the profile is resampled to another width.

    The profile covers MLP neurons; QKV neurons reuse the same per-layer shape resampled to
    d_model (a chosen default: no QKV profile is published).
    """
    counts = relullama7b_counts() if counts is None else counts
    rng = np.random.default_rng(seed)
    layout = NeuronLayout.of(model)
    qkv_mean, ffn_mean = _per_group_means(model)
    parts = []
    for width, mean in ((layout.d_qkv, qkv_mean), (layout.d_ffn, ffn_mean)):
        shape = resample_profile(counts, layout.n_layers, width)
        f = _scale_to_mean(shape + 1e-3, mean)  # +1e-3: never-seen neurons keep a tiny rate
        if np.asarray(counts).shape[1] != width:
            f = rng.permuted(f, axis=1)
        parts.append(f)
    return np.concatenate(parts, axis=1).ravel()


def persistence_for_overlap(freqs: np.ndarray, layout: NeuronLayout, token_overlap: float) -> np.ndarray:
    """(2L,) lag-1 autocorrelation rho per (layer, kind) group giving ``token_overlap``.

    Raises ConfigError when the overlap is below what independent tokens already give
    (``A = sum f^2 / sum f``) or not below 1.
    """
    if not 0 < token_overlap < 1:
        raise ConfigError(f"token_overlap must be in (0, 1), got {token_overlap}")
    qkv, ffn = layout.reshape(freqs)
    rhos = []
    for f in (qkv, ffn):
        a = (f ** 2).sum(axis=1) / np.maximum(f.sum(axis=1), 1e-300)
        rhos.append((token_overlap - a) / (1 - a))
    rho = np.stack(rhos, axis=1).ravel()  # (L, 2) -> group order 2*layer + kind
    if np.any(rho < 0):
        raise ConfigError(f"token_overlap {token_overlap} is below the overlap of independent tokens "
                          f"for these frequencies (up to {token_overlap - rho.min() * 1:.3f}); raise it")
    return rho


def markov_trace(freqs: np.ndarray, layout: NeuronLayout, n_tokens: int, n_seqs: int = 1,
                 token_overlap: float = DEFAULT_TOKEN_OVERLAP,
                 seed: int | np.random.SeedSequence = 0, meta: dict | None = None) -> ActivationTrace:
    """Generate a trace where each neuron is an independent two-state Markov chain.

    Args:
        freqs: (N,) stationary activation probability of each neuron.
        layout: neuron layout (must have N neurons).
        n_tokens: tokens per sequence (prompt + generated).
        n_seqs: independent sequences (one per batch slot).
        token_overlap: target fraction of a token's active neurons still active at the next.
        seed: root seed; each sequence uses its own spawned child.
    """
    freqs = np.asarray(freqs, dtype=np.float64)
    if freqs.shape != (layout.n_neurons,):
        raise TraceError(f"freqs must have shape ({layout.n_neurons},), got {freqs.shape}")
    if np.any(freqs < 0) or np.any(freqs > MAX_FREQUENCY):
        raise ConfigError(f"activation frequencies must be in [0, {MAX_FREQUENCY}]")
    if n_tokens <= 0 or n_seqs <= 0:
        raise ConfigError(f"n_tokens and n_seqs must be > 0, got {n_tokens}, {n_seqs}")
    rho = persistence_for_overlap(freqs, layout, token_overlap)[layout.group_of()]
    p_on = freqs * (1 - rho)
    p_off = (1 - freqs) * (1 - rho)
    seq_seeds = np.random.SeedSequence(seed) if not isinstance(seed, np.random.SeedSequence) else seed
    shift = max(int(layout.n_neurons - 1).bit_length(), 1)
    initial, events = [], []
    for child in seq_seeds.spawn(n_seqs):
        rng = np.random.default_rng(child)
        state0 = rng.random(layout.n_neurons) < freqs
        initial.append(np.packbits(state0))
        events.append(_markov_events(state0, p_on, p_off, n_tokens, rng, shift))
    on_ptr, on_idx, off_ptr, off_idx = _assemble(events, n_tokens, shift)
    meta = {"source": "synthetic:markov", "token_overlap": token_overlap, **(meta or {})}
    # the chains' stationary frequencies are what an unlimited offline profiling run would measure
    return ActivationTrace(layout, n_seqs, n_tokens, np.stack(initial), on_ptr, on_idx, off_ptr, off_idx,
                           meta, offline_freqs=freqs)


def _markov_events(state0: np.ndarray, p_on: np.ndarray, p_off: np.ndarray, n_tokens: int,
                   rng: np.random.Generator, shift: int) -> np.ndarray:
    """Event-driven simulation of all chains; returns every toggle as one int64 sort key.

    Each round draws, for every neuron still inside the trace, the geometric holding time of
    its current state; the neuron toggles at ``now + hold``. Neurons whose leaving probability is
    zero never toggle and are dropped. An event is encoded as
    ``((token * 2 + turns_on) << shift) | neuron`` so that one numeric sort orders events by
    token, then off-before-on, then neuron id (sorted ids make the simulator's gathers local).
    """
    p_leave = np.where(state0, p_off, p_on)
    idx = np.flatnonzero(p_leave > 0)
    p_cur, p_next = p_leave[idx], np.where(state0[idx], p_on[idx], p_off[idx])
    turns_on = (~state0[idx]).astype(np.int64)   # what the neuron's next toggle does
    now = np.zeros(len(idx), dtype=np.int64)
    events = []
    while len(idx):
        now += rng.geometric(p_cur)
        keep = now < n_tokens
        if not keep.all():
            idx, now, p_cur, p_next, turns_on = idx[keep], now[keep], p_cur[keep], p_next[keep], turns_on[keep]
        events.append(((now * 2 + turns_on) << shift) | idx)
        p_cur, p_next, turns_on = p_next, p_cur, 1 - turns_on
        # a neuron that turned off and can never turn on again leaves the simulation
        alive = p_cur > 0
        if not alive.all():
            idx, now, p_cur, p_next, turns_on = idx[alive], now[alive], p_cur[alive], p_next[alive], turns_on[alive]
    return np.concatenate(events) if events else np.zeros(0, np.int64)


def _assemble(per_seq: list[np.ndarray], n_tokens: int, shift: int):
    """Sort each sequence's encoded events and build the on/off CSR arrays (ids sorted per token)."""
    on_counts, off_counts, on_idx, off_idx = [], [], [], []
    # boundaries of every (token, on/off) key in the sorted events
    bounds = np.arange(2 * n_tokens + 1, dtype=np.int64) << shift
    for events in per_seq:
        events = np.sort(events)
        neurons = (events & ((1 << shift) - 1)).astype(np.int32)
        is_on = ((events >> shift) & 1).astype(bool)
        counts = np.diff(np.searchsorted(events, bounds)).reshape(n_tokens, 2)
        off_counts.append(counts[:, 0])
        on_counts.append(counts[:, 1])
        on_idx.append(neurons[is_on])
        off_idx.append(neurons[~is_on])

    def csr(counts):
        return np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
    return csr(on_counts), np.concatenate(on_idx), csr(off_counts), np.concatenate(off_idx)


def synthetic_trace(model: ModelSpec, n_tokens: int, n_seqs: int = 1, source: str = "skew",
                    top20_share: float = DEFAULT_TOP20_SHARE, token_overlap: float = DEFAULT_TOKEN_OVERLAP,
                    seed: int = 0) -> ActivationTrace:
    """A synthetic trace for ``model``: frequencies from ``source`` ('skew' or 'relullama7b').

    One root seed: child 0 seeds the frequencies, child 1 the Markov chains.
    """
    freq_seed, chain_seed = np.random.SeedSequence(seed).spawn(2)
    if source == "skew":
        freqs = frequencies_from_skew(model, top20_share, freq_seed)
        extra = {"top20_share": top20_share}
    elif source == "relullama7b":
        freqs = frequencies_from_profile(model, None, freq_seed)
        extra = {"profile": "relullama7b_mlp_counts (PowerInfer)"}
    else:
        from .errors import unknown_name
        raise unknown_name("trace generator", source, TRACE_GENERATORS)
    meta = {"model": model.name, "generator": source, "seed": seed, **extra}
    return markov_trace(freqs, NeuronLayout.of(model), n_tokens, n_seqs, token_overlap, chain_seed, meta)


#: names accepted by ``--trace`` besides a file path
TRACE_GENERATORS = ("skew", "relullama7b")
