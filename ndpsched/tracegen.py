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

import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor
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

    Each row becomes ``min(MAX_FREQUENCY, lam * shape)`` with ``lam`` set so the row's mean is
    ``mean`` (capped mass goes to the uncapped neurons). ``lam`` is found by water-filling: scale
    so the uncapped neurons carry what the capped ones do not, cap what now exceeds the cap, and
    repeat; the capped set only grows, so this ends, exactly, after a few passes.
    """
    shape = np.asarray(shape, dtype=np.float64)
    if mean <= 0 or mean >= MAX_FREQUENCY:
        raise ConfigError(f"mean activation frequency must be in (0, {MAX_FREQUENCY}), got {mean}")
    target = mean * shape.shape[-1]
    total = shape.sum(axis=-1, keepdims=True)
    lam = target / np.maximum(total, 1e-300)
    n_capped = np.zeros_like(lam)
    for _ in range(shape.shape[-1] + 1):
        capped = shape * lam >= MAX_FREQUENCY
        now_capped = capped.sum(axis=-1, keepdims=True, dtype=np.float64)
        if np.array_equal(now_capped, n_capped):
            break
        n_capped = now_capped
        free_mass = total - shape.sum(axis=-1, keepdims=True, where=capped)
        lam = np.maximum(target - n_capped * MAX_FREQUENCY, 0) / np.maximum(free_mass, 1e-300)
    f = shape * lam
    return np.minimum(f, MAX_FREQUENCY, out=f)


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
        f = _scale_to_mean(u ** k, mean)   # every layer has the same curve: scale it once
        parts.append(rng.permuted(np.broadcast_to(f, (layout.n_layers, width)), axis=1))
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
    rows, layer_row = _resample_rows(counts, n_layers, width)
    return rows[layer_row]


def _resample_rows(counts: np.ndarray, n_layers: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`resample_profile` as (distinct resampled source rows, row of each target layer)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] == 0 or counts.shape[1] == 0:
        raise TraceError(f"an activation profile must be a non-empty (layers, neurons) array, got {counts.shape}")
    if np.any(counts < 0):
        raise TraceError("an activation profile must not contain negative counts")
    src_layers = np.minimum((np.arange(n_layers) + 0.5) / n_layers * counts.shape[0], counts.shape[0] - 1).astype(int)
    used, layer_row = np.unique(src_layers, return_inverse=True)
    rows = counts[used]
    if rows.shape[1] == width:
        return rows, layer_row
    q_src = (np.arange(rows.shape[1]) + 0.5) / rows.shape[1]
    q_dst = (np.arange(width) + 0.5) / width
    srt = np.sort(rows, axis=1)
    return np.stack([np.interp(q_dst, q_src, r) for r in srt]), layer_row


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
        shape, layer_row = _resample_rows(counts, layout.n_layers, width)
        # +1e-3: never-seen neurons keep a tiny rate; scale each distinct source row once
        f = _scale_to_mean(shape + 1e-3, mean)[layer_row]
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

    The trace depends only on the arguments, not on the number of threads used: a large trace's
    neurons are split into a few fixed blocks, each drawn from its own child of the sequence's
    seed, and the blocks of a sequence are generated concurrently when CPUs allow.
    """
    freqs = np.asarray(freqs, dtype=np.float64)
    if freqs.shape != (layout.n_neurons,):
        raise TraceError(f"freqs must have shape ({layout.n_neurons},), got {freqs.shape}")
    if not np.all((freqs >= 0) & (freqs <= MAX_FREQUENCY)):   # (also rejects nan)
        raise ConfigError(f"activation frequencies must be in [0, {MAX_FREQUENCY}]")
    if n_tokens <= 0 or n_seqs <= 0:
        raise ConfigError(f"n_tokens and n_seqs must be > 0, got {n_tokens}, {n_seqs}")
    rho = persistence_for_overlap(freqs, layout, token_overlap)[layout.group_of()]
    p_on = freqs * (1 - rho)
    p_off = (1 - freqs) * (1 - rho)
    seq_seeds = np.random.SeedSequence(seed) if not isinstance(seed, np.random.SeedSequence) else seed
    chains = _MarkovChains(freqs, p_on, p_off, n_tokens, n_seqs)
    workers = min(_worker_threads(), len(chains.blocks))
    with ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for child in seq_seeds.spawn(n_seqs):
            chains.add_sequence(child, pool)
    initial, on_ptr, on_idx, off_ptr, off_idx = chains.finish()
    meta = {"source": "synthetic:markov", "token_overlap": token_overlap, **(meta or {})}
    # the chains' stationary frequencies are what an unlimited offline profiling run would measure
    return ActivationTrace(layout, n_seqs, n_tokens, initial, on_ptr, on_idx, off_ptr, off_idx,
                           meta, offline_freqs=freqs)


def two_scale_trace(freqs: np.ndarray, layout: NeuronLayout, slow_share: np.ndarray, persistent_share: np.ndarray,
                    persistence: np.ndarray, n_tokens: int, n_seqs: int = 1,
                    seed: int | np.random.SeedSequence = 0, meta: dict | None = None) -> ActivationTrace:
    """A trace whose overlap-vs-distance curve has two time scales (fast drop, then a plateau).

    Per (layer, kind) group g, with ``c = slow_share[g]``, ``w = persistent_share[g]`` and
    ``rho = persistence[g]``:

    - **slow** (one value per sequence): each sequence draws every neuron's own frequency
      ``q_i ~ Beta`` with mean f_i and variance ``c f_i (1 - f_i)`` (the text's topic: some
      neurons fire more in this sequence than on average). The overlap never falls below its
      plateau ``A + c (1 - A)``, ``A = sum f^2 / sum f`` (what independent tokens share);
    - **fast**: a share ``w`` of the neurons (chosen once, at random) is a two-state Markov chain
      with stationary probability q_i and lag-1 autocorrelation rho; the others draw every token
      independently (a chain with rho = 0).

    The expected overlap at distance d >= 1 is then ``A + (1 - A) (c + w (1 - c) rho^d)`` (see
    :mod:`ndpsched.tracefit`, which fits c, w, rho to a recorded curve). ``c = w = 0`` gives
    independent tokens; ``c = 0, w = 1`` the single-scale chains of :func:`markov_trace`.

    Args:
        freqs: (N,) mean activation probability of every neuron (0 for followers, which get
            their events later).
        layout: the neuron layout.
        slow_share, persistent_share, persistence: (2L,) per group, in [0, 1), [0, 1], [0, 1).
        n_tokens, n_seqs: tokens per sequence and sequences.
        seed: root seed (children: the persistent neurons, then one per sequence).
        meta: stored in the trace.
    """
    freqs = np.asarray(freqs, dtype=np.float64)
    n_groups = layout.n_groups
    if freqs.shape != (layout.n_neurons,):
        raise TraceError(f"freqs must have shape ({layout.n_neurons},), got {freqs.shape}")
    if not np.all((freqs >= 0) & (freqs <= MAX_FREQUENCY)):
        raise ConfigError(f"activation frequencies must be in [0, {MAX_FREQUENCY}]")
    if n_tokens <= 0 or n_seqs <= 0:
        raise ConfigError(f"n_tokens and n_seqs must be > 0, got {n_tokens}, {n_seqs}")
    dyn = {}
    for name, values, hi_ok in (("slow_share", slow_share, False), ("persistent_share", persistent_share, True),
                                ("persistence", persistence, False)):
        v = np.broadcast_to(np.asarray(values, dtype=np.float64), (n_groups,))
        if not np.all((v >= 0) & ((v <= 1) if hi_ok else (v < 1))):
            raise ConfigError(f"{name} must be in [0, 1{']' if hi_ok else ')'} for every (layer, kind), got "
                              f"{float(v.min()):.3g}..{float(v.max()):.3g}")
        dyn[name] = v
    group = layout.group_of()
    root = np.random.SeedSequence(seed) if not isinstance(seed, np.random.SeedSequence) else seed
    persist_seed, *seq_seeds = root.spawn(n_seqs + 1)
    persistent = np.random.default_rng(persist_seed).random(layout.n_neurons) < dyn["persistent_share"][group]
    rho = np.where(persistent, dyn["persistence"][group], 0.0)
    c = dyn["slow_share"][group]
    # Beta(f k, (1 - f) k) has variance f (1 - f) / (k + 1) = c f (1 - f) for k = 1 / c - 1
    slow = (c > 0) & (freqs > 0)
    k = 1.0 / np.maximum(c[slow], 1e-12) - 1.0
    f_slow = freqs[slow]
    parts = []
    workers = _worker_threads()
    with ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for child in seq_seeds:
            beta_seed, chain_seed = child.spawn(2)
            q = freqs.copy()
            if slow.any():
                q[slow] = np.random.default_rng(beta_seed).beta(f_slow * k, (1 - f_slow) * k)
            np.minimum(q, MAX_FREQUENCY, out=q)
            q[q < 1e-12] = 0.0        # Beta draws can underflow; such a neuron never fires here
            chains = _MarkovChains(q, q * (1 - rho), (1 - q) * (1 - rho), n_tokens, 1)
            chains.add_sequence(chain_seed, pool if len(chains.blocks) > 1 else None)
            parts.append(chains.finish())
    initial = np.concatenate([p[0] for p in parts])
    arrays = []
    for d in (0, 1):
        ptrs, ids = [p[1 + 2 * d] for p in parts], [p[2 + 2 * d] for p in parts]
        offsets = np.cumsum([0] + [len(i) for i in ids[:-1]])
        ptr = np.concatenate([[0]] + [p[1:] + o for p, o in zip(ptrs, offsets)]).astype(np.int64)
        arrays += [ptr, np.concatenate(ids)]
    meta = {"source": "synthetic:two-scale", **(meta or {})}
    return ActivationTrace(layout, n_seqs, n_tokens, initial, *arrays, meta, offline_freqs=freqs)


def two_scale_overlap(freqs: np.ndarray, layout: NeuronLayout, slow_share: np.ndarray,
                      persistent_share: np.ndarray, persistence: np.ndarray, max_distance: int = 50) -> np.ndarray:
    """(2L, D) expected overlap at d = 1..D of each group of :func:`two_scale_trace`."""
    a = independent_overlap(freqs, layout)[:, None]
    d = np.arange(1, max_distance + 1)[None, :]
    c, w, rho = (np.asarray(x, dtype=np.float64)[:, None] for x in (slow_share, persistent_share, persistence))
    return a + (1 - a) * (c + w * (1 - c) * rho ** d)


def independent_overlap(freqs: np.ndarray, layout: NeuronLayout) -> np.ndarray:
    """(2L,) ``A = sum f^2 / sum f`` per group: the overlap of independent tokens."""
    f = np.asarray(freqs, dtype=np.float64).reshape(layout.n_layers, layout.per_layer)
    out = []
    for part in (f[:, : layout.d_qkv], f[:, layout.d_qkv:]):
        out.append((part ** 2).sum(axis=1) / np.maximum(part.sum(axis=1), 1e-300))
    return np.stack(out, axis=1).ravel()


#: bits of the narrow (uint32) event keys; tests lower it to exercise the uint64 path
_NARROW_KEY_BITS = 32
#: a sequence is split into at most this many neuron blocks (generated concurrently) ...
_MAX_BLOCKS = 4
#: ... each expected to hold at least this many toggles, and this many per token
_BLOCK_MIN_TOGGLES = 1 << 21
_BLOCK_MIN_TOGGLES_PER_TOKEN = 1024


def _toggle_capacity(mean: float, n_neurons: int) -> int:
    """Room for one sequence's toggles of one direction: their mean plus six standard deviations.

    A neuron's toggle count has variance at most its mean, plus O(1) from the initial state.
    Space is only reserved (untouched pages cost nothing) and grows if ever exceeded.
    """
    return int(mean + 6 * np.sqrt(mean + n_neurons) + 1024)


def _worker_threads() -> int:
    """CPUs this process may use (numpy's generators, ufuncs and sorts release the GIL)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


class _MarkovChains:
    """Event-driven simulation of N independent two-state chains over ``n_tokens`` tokens.

    Every neuron alternates geometric holding times: Geometric(p_on) while inactive and
    Geometric(p_off) while active, so the cost is proportional to the number of toggles. A
    holding time is drawn by inversion from a standard exponential E,
    ``hold = floor(E * scale) + 1`` with ``scale = -1 / log1p(-p)``, which gives
    ``P(hold > k) = (1 - p)**k`` (numpy's own geometric sampler inverts the same way).

    The neurons are split into ``len(blocks)`` contiguous blocks (one for small traces), each
    simulated with its own generator. A block collects its toggles as unsigned sort keys
    ``(token << shift) | neuron``, those turning a neuron on and those turning it off in two
    arrays; one numeric sort of each orders it by token then neuron id. A sequence's on (off)
    list of a token is then the blocks' runs for that token, in block order: ids sorted, as
    the simulator's gathers want. Keys are uint32 when they fit (the common case: sorting them
    is about twice as fast), else uint64. With a thread pool, the blocks of a sequence run
    concurrently while the calling thread copies the previous sequence's ids into the output
    (so consecutive sequences use alternate sets of key arrays).
    """

    def __init__(self, freqs: np.ndarray, p_on: np.ndarray, p_off: np.ndarray, n_tokens: int,
                 n_seqs: int) -> None:
        self.n_neurons = n = len(freqs)
        self.freqs, self.n_tokens, self.n_seqs = freqs, int(n_tokens), int(n_seqs)
        self.shift = max(int(n - 1).bit_length(), 1)
        bits = self.shift + max(int(n_tokens - 1).bit_length(), 1)   # of a key
        if bits > 63:
            raise TraceError(f"a trace of {n} neurons x {n_tokens} tokens is too large to encode")
        self.dtype = np.dtype(np.uint32 if bits <= _NARROW_KEY_BITS else np.uint64)
        # while simulating, a chain's token field may reach 2 * n_tokens before it is dropped:
        # when that needs one bit more than the keys have, watch for the wrap-around
        self.check_wrap = bits + 1 > 8 * self.dtype.itemsize
        with np.errstate(divide="ignore"):  # p = 0 -> scale = inf: the state is never left
            self.scale_on = -1.0 / np.log1p(-p_on)
            self.scale_off = -1.0 / np.log1p(-p_off)
        self.can_on = np.isfinite(self.scale_on)
        self.can_off = np.isfinite(self.scale_off)
        self.all_can = bool(self.can_on.all() and self.can_off.all())
        # expected toggles each way per sequence (the chains start stationary)
        toggles = np.cumsum(p_on * (1 - freqs)) * max(self.n_tokens - 1, 0)
        mean = float(toggles[-1]) if n else 0.0
        n_blocks = int(min(_MAX_BLOCKS, 2 * mean / _BLOCK_MIN_TOGGLES,
                           2 * mean / (_BLOCK_MIN_TOGGLES_PER_TOKEN * self.n_tokens), n))
        bounds = np.linspace(0, n, max(n_blocks, 1) + 1).astype(np.int64)
        self.blocks = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
        # two sets (alternate sequences) of [on, off] key arrays per block, reused by the sequences
        self.scratch_size = [_toggle_capacity(float(toggles[hi - 1] - (toggles[lo - 1] if lo else 0)), hi - lo)
                             if hi > lo else 1024 for lo, hi in self.blocks]
        self.scratch: list[list[list[np.ndarray] | None]] = [[None] * len(self.blocks) for _ in range(2)]
        self.pending = None   # (scratch set, per-block results) of a sequence drawn but not yet appended
        # [on, off]: int32 ids of all sequences so far, and each sequence's counts per token
        capacity = self.n_seqs * _toggle_capacity(mean, n)
        self.ids = [np.empty(capacity, np.int32), np.empty(capacity, np.int32)]
        self.used = [0, 0]
        self.counts: list[list[np.ndarray]] = [[], []]
        self.initial: list[np.ndarray] = []
        self.n_drawn = 0

    def add_sequence(self, seed: np.random.SeedSequence, pool: ThreadPoolExecutor | None = None) -> None:
        """Draw one more sequence (its blocks on ``pool`` if given); meanwhile append the previous one."""
        k = self.n_drawn % 2   # its scratch set: the previous sequence's is still being read
        self.n_drawn += 1
        seeds = seed.spawn(len(self.blocks)) if len(self.blocks) > 1 else [seed]
        if pool is None:
            parts = [self._block(b, s, k) for b, s in enumerate(seeds)]
            self._append_pending()
        else:
            jobs = [pool.submit(self._block, b, s, k) for b, s in enumerate(seeds)]
            self._append_pending()
            parts = [job.result() for job in jobs]
        self.pending = (k, parts)

    def _append_pending(self) -> None:
        """Append the toggles of the sequence drawn last (block runs merged per token) to the ids."""
        if self.pending is None:
            return
        k, parts = self.pending
        self.pending = None
        self.initial.append(np.packbits(np.concatenate([state0 for state0, _ in parts])))
        mask = self.dtype.type((1 << self.shift) - 1)
        for d in (0, 1):
            counts = np.stack([c[d] for _, c in parts])   # (blocks, tokens)
            per_token = counts.sum(axis=0)
            lo = self._reserve(d, int(per_token.sum()))
            ids = self.ids[d]
            if len(self.blocks) == 1:
                keys = self.scratch[k][0][d][:int(per_token.sum())]
                np.bitwise_and(keys, mask, out=ids[lo: lo + len(keys)], casting="unsafe")
            else:
                # token t's list: block 0's run, then block 1's, ... (lower ids first)
                dst = lo + np.cumsum(per_token) - per_token + np.cumsum(counts, axis=0) - counts
                src = np.cumsum(counts, axis=1) - counts
                for b in range(len(self.blocks)):
                    keys = self.scratch[k][b][d]
                    for t in np.flatnonzero(counts[b]).tolist():
                        a, c, o = int(src[b, t]), int(counts[b, t]), int(dst[b, t])
                        np.bitwise_and(keys[a: a + c], mask, out=ids[o: o + c], casting="unsafe")
            self.used[d] = lo + int(per_token.sum())
            self.counts[d].append(per_token)

    def finish(self):
        """(initial packed states, on_ptr, on_idx, off_ptr, off_idx) of all sequences."""
        self._append_pending()
        out = [np.stack(self.initial)]
        for d in (0, 1):
            ptr = np.zeros(self.n_seqs * self.n_tokens + 1, dtype=np.int64)
            np.cumsum(np.concatenate(self.counts[d]), out=ptr[1:])
            out += [ptr, self.ids[d][:self.used[d]]]
        self.scratch = []
        return tuple(out)

    def _reserve(self, d: int, extra: int) -> int:
        """Make room for ``extra`` more ids in direction ``d``; return where they go."""
        lo = self.used[d]
        if lo + extra > len(self.ids[d]):   # rare: see the capacity
            ids = np.empty(max(lo + extra, len(self.ids[d]) + len(self.ids[d]) // 4), np.int32)
            ids[:lo] = self.ids[d][:lo]
            self.ids[d] = ids
        return lo

    def _block(self, b: int, seed: np.random.SeedSequence, k: int):
        """Simulate block ``b`` for one sequence: (initial state, [on, off] counts per token).

        The block's [on, off] keys are left sorted (by token, then neuron id) in scratch set ``k``.
        """
        lo, hi = self.blocks[b]
        if self.scratch[k][b] is None:
            self.scratch[k][b] = [np.empty(self.scratch_size[b], self.dtype) for _ in range(2)]
        bufs = self.scratch[k][b]
        rng = np.random.default_rng(seed)
        state0 = rng.random(hi - lo) < self.freqs[lo:hi]
        used = self._events(b, state0, rng, bufs)
        starts = np.arange(self.n_tokens, dtype=self.dtype) << self.dtype.type(self.shift)
        counts = []
        for d in (0, 1):
            keys = bufs[d][:used[d]]
            keys.sort()
            counts.append(np.diff(np.searchsorted(keys, starts), append=len(keys)))  # per token
        return state0, counts

    def _events(self, b: int, state0: np.ndarray, rng: np.random.Generator, bufs: list[np.ndarray]) -> list[int]:
        """Write every toggle of block ``b``, unsorted, to ``bufs`` = [on, off] keys (grown in place
        if need be); return how many of each.

        The live chains sit in one array ``cur = (field << shift) | neuron``: neurons that start
        inactive first (part A, ``n_a`` of them), then those that start active (part B), each in
        neuron order. Round r draws every live chain's (r+1)-th holding time; the toggle's token
        is ``field + r + 1`` where ``field`` sums the holding times minus one each. All live
        chains toggle once per round, so round r's toggles of part A turn neurons on when r is
        even and off when odd (part B the reverse): the direction needs no storage. A chain
        leaves when its toggle falls past the last token; holding times are capped there, so
        ``field`` stays below ``2 * n_tokens`` (or wraps around, detectably, when the key width
        holds only the tokens).
        """
        dt = self.dtype.type
        shift, t = self.shift, self.n_tokens
        first = self.blocks[b][0]
        if self.all_can:
            part_a, part_b = np.flatnonzero(~state0), np.flatnonzero(state0)
        else:  # a chain that can never leave its initial state has no events
            end = self.blocks[b][1]
            part_a = np.flatnonzero(~state0 & self.can_on[first:end])
            part_b = np.flatnonzero(state0 & self.can_off[first:end])
        n_a = len(part_a)
        cur = np.concatenate([part_a, part_b]).astype(self.dtype)
        cur += dt(first)
        del part_a, part_b
        mask = dt((1 << shift) - 1)
        ids = np.empty(len(cur), dtype=np.intp)
        used = [0, 0]
        r = 0
        while len(cur) and r < t - 1:
            n = len(cur)
            limit = t - r - 1   # field must stay below this for the toggle to be inside the trace
            a_on = r % 2 == 0
            s_a, s_b = (self.scale_on, self.scale_off) if a_on else (self.scale_off, self.scale_on)
            ids_n = ids[:n]
            np.bitwise_and(cur, mask, out=ids_n, casting="unsafe")
            hold = rng.standard_exponential(n)
            hold[:n_a] *= s_a[ids_n[:n_a]]
            hold[n_a:] *= s_b[ids_n[n_a:]]
            np.fmin(hold, limit, out=hold)   # also maps inf (and nan); truncation below is the floor
            step = hold.astype(self.dtype)
            del hold
            step <<= dt(shift)
            cur += step
            keep = cur < dt(limit << shift)
            if self.check_wrap:   # a sum that wrapped around is smaller than what was added
                keep &= cur >= step
            del step
            n_a = int(np.count_nonzero(keep[:n_a]))
            cur = cur[keep]
            del keep
            # toggle key = cur + (r + 1) tokens; part A turns on in even rounds
            for part, d in ((cur[:n_a], 0 if a_on else 1), (cur[n_a:], 1 if a_on else 0)):
                lo, hi = used[d], used[d] + len(part)
                if hi > len(bufs[d]):   # rare: see the capacity
                    grown = np.empty(max(hi, len(bufs[d]) + len(bufs[d]) // 4), self.dtype)
                    grown[:lo] = bufs[d][:lo]
                    bufs[d] = grown
                np.add(part, dt((r + 1) << shift), out=bufs[d][lo:hi])
                used[d] = hi
            r += 1
        return used


#: fraction of the neurons of every layer after the first that fire exactly with a parent in the
#: previous layer (Hermes: some neurons fire with probability > 0.9 with a given previous-layer
#: neuron; the share is not reported: chosen default)
DEFAULT_LAYER_COUPLING = 0.3
#: sigma of the log-normal factor between a neuron's offline-profile frequency and its frequency
#: during this generation (Hermes profiles on C4/Pile, serves other prompts). 1.0 moves ~50 % of
#: a layer's offline top-20 % out of the runtime top-20 % on the ReluLLaMA-7B profile (Hermes:
#: ~52 % of the initially hot neurons change during inference, LLaMA2-70B).
DEFAULT_PROFILE_DRIFT = 1.0


def drift_frequencies(freqs: np.ndarray, layout: NeuronLayout, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Runtime frequencies: offline ones times a log-normal factor, each (layer, kind) rescaled to
    its original mean (capped at MAX_FREQUENCY)."""
    if sigma < 0:
        raise ConfigError(f"profile_drift must be >= 0, got {sigma}")
    if sigma == 0:
        return freqs.copy()
    noisy = freqs * np.exp(sigma * rng.standard_normal(len(freqs)))
    out = []
    for f, g in zip(layout.reshape(noisy), layout.reshape(freqs)):
        means = g.mean(axis=1)
        out.append(np.stack([_scale_to_mean(row, m) if m > 0 else row for row, m in zip(f, means)]))
    return np.concatenate(out, axis=1).ravel()


#: Hermes section V (ReLU models): adjacent tokens share > 90 % of active neurons, ~70 % at
#: distance 10, and the share stops falling beyond ~25 tokens. The "paper-relu" generator's
#: curve: 0.91 at d = 1 and 0.70 at d = 10 (the reported points) and a plateau of 0.65 (not
#: reported: a chosen value; with one decay rate, plateaus from about 0.62 to 0.70 fit the
#: reported points and "flat beyond 25"). The decay rate follows: (0.70 - P) = (0.91 - P) rho^9.
PAPER_RELU_OVERLAP_D1 = 0.91
PAPER_RELU_OVERLAP_D10 = 0.70
PAPER_RELU_PLATEAU = 0.65


def paper_relu_dynamics(freqs: np.ndarray, layout: NeuronLayout) -> dict[str, np.ndarray]:
    """Per-group (slow_share, persistent_share, persistence) of :func:`two_scale_trace` giving
    Hermes' ReLU overlap curve (PAPER_RELU_*) for these frequencies."""
    a = independent_overlap(freqs, layout)
    plateau, d1, d10 = PAPER_RELU_PLATEAU, PAPER_RELU_OVERLAP_D1, PAPER_RELU_OVERLAP_D10
    rho = ((d10 - plateau) / (d1 - plateau)) ** (1 / 9)
    c = np.clip((plateau - a) / (1 - a), 0, 0.98)
    top = a + (1 - a) * c                                   # the plateau these frequencies allow
    v = np.maximum(d1 - top, 0) / ((1 - a) * rho)
    w = np.clip(v / (1 - c), 0, 1)
    return {"slow_share": c, "persistent_share": w, "persistence": np.full(len(a), rho)}


def synthetic_trace(model: ModelSpec, n_tokens: int, n_seqs: int = 1, source: str = "skew",
                    top20_share: float = DEFAULT_TOP20_SHARE, token_overlap: float = DEFAULT_TOKEN_OVERLAP,
                    layer_coupling: float = DEFAULT_LAYER_COUPLING, profile_drift: float = DEFAULT_PROFILE_DRIFT,
                    seed: int = 0) -> ActivationTrace:
    """A synthetic trace for ``model`` from the generator ``source`` (see TRACE_GENERATORS):

    - ``skew``: frequencies with a given ``top20_share``, single-scale chains (``token_overlap``);
    - ``relullama7b``: the real ReluLLaMA-7B profile's frequencies, single-scale chains;
    - ``paper-relu``: the ReluLLaMA-7B frequencies and Hermes' two-time-scale ReLU overlap
      curve (PAPER_RELU_*; ``token_overlap`` and ``top20_share`` are not used);
    - ``fitted:PATH.yaml`` is a trace source too (``ndpsched.run.load_trace``), generated by
      :func:`ndpsched.tracefit.trace_from_fit_file` from a fit of a recorded trace.

    The trace's ``offline_freqs`` are the offline profile; the generation runs on drifted
    frequencies (``profile_drift``); a share ``layer_coupling`` of the later layers' neurons copy a
    previous-layer parent, recorded in ``trace.layer_parents``. One root seed: children seed the
    frequencies, the chains, the coupling and the drift.
    """
    if source.startswith(FITTED_PREFIX):
        raise ConfigError(f"'{source}' is a fit of a recorded trace: generate it with "
                          "ndpsched.tracefit.trace_from_fit_file (or ndpsched.run.load_trace)")
    freq_seed, chain_seed, couple_seed, drift_seed = np.random.SeedSequence(seed).spawn(4)
    if source == "skew":
        freqs = frequencies_from_skew(model, top20_share, freq_seed)
        extra = {"top20_share": top20_share}
    elif source in ("relullama7b", "paper-relu"):
        freqs = frequencies_from_profile(model, None, freq_seed)
        extra = {"profile": "relullama7b_mlp_counts (PowerInfer)"}
    else:
        from .errors import unknown_name
        raise unknown_name("trace generator", source, TRACE_GENERATORS + (FITTED_PREFIX + "PARAMS.yaml",))
    from .layercorr import add_followers, plan_coupling

    layout = NeuronLayout.of(model)
    plan = plan_coupling(freqs, layout, layer_coupling, np.random.default_rng(couple_seed))
    offline = freqs.copy()
    offline[plan.follower] = freqs[plan.root[plan.follower]]     # a follower fires with its root
    runtime = drift_frequencies(freqs, layout, profile_drift, np.random.default_rng(drift_seed))
    runtime[plan.follower] = 0.0                                  # followers get their root's events
    meta = {"model": model.name, "generator": source, "seed": seed, "layer_coupling": layer_coupling,
            "profile_drift": profile_drift, **extra}
    if source == "paper-relu":
        # the curve's parameters follow the frequencies the chains run on
        dyn = paper_relu_dynamics(runtime, layout)
        meta.update(overlap_curve_source="Hermes section V: >90 % at d=1, ~70 % at d=10, flat beyond ~25",
                    plateau=PAPER_RELU_PLATEAU)
        trace = two_scale_trace(runtime, layout, dyn["slow_share"], dyn["persistent_share"], dyn["persistence"],
                                n_tokens, n_seqs, chain_seed, meta)
    else:
        trace = markov_trace(runtime, layout, n_tokens, n_seqs, token_overlap, chain_seed, meta)
    trace = add_followers(trace, plan) if plan.follower.any() else trace
    trace.offline_freqs = offline.astype(np.float32)
    trace.layer_parents = plan.parents
    return trace


#: names accepted by ``--trace`` besides a file path (and ``fitted:PARAMS.yaml``)
TRACE_GENERATORS = ("skew", "relullama7b", "paper-relu")
#: a trace source ``fitted:PATH`` generates from the fit in the YAML file PATH
FITTED_PREFIX = "fitted:"


def is_trace_generator(source: str) -> bool:
    """True when ``source`` names a generator (rather than a trace file)."""
    return source in TRACE_GENERATORS or source.startswith(FITTED_PREFIX)
