"""The vectorized Markov trace generator: exact structure, determinism, and statistics.

The generator's code paths (uint32 / uint64 keys, the wrap-around check, threaded sorting, key
buffer growth) must all give bit-identical traces for one seed, and the traces must follow
the two-state chains they model: stationary frequencies, geometric holding times, overlap.
"""
from __future__ import annotations

import numpy as np
import pytest

import ndpsched.tracegen as tg
from ndpsched.presets import load_model
from ndpsched.trace import NeuronLayout

ARRAYS = ("initial_packed", "on_ptr", "on_idx", "off_ptr", "off_idx")


def _same(a, b) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ARRAYS)


def _sorted_within_tokens(trace) -> bool:
    for ptr, idx in ((trace.on_ptr, trace.on_idx), (trace.off_ptr, trace.off_idx)):
        # consecutive ids inside one slot must increase; slot starts are exempt
        inc = np.diff(idx.astype(np.int64)) > 0
        starts = np.zeros(len(idx), dtype=bool)
        starts[ptr[1:-1][ptr[1:-1] < len(idx)]] = True
        if not np.all(inc | starts[1:]):
            return False
    return True


def test_trace_structure():
    model = load_model("tiny")
    trace = tg.synthetic_trace(model, 64, 3, seed=11)
    trace.validate()
    dense = np.stack([trace.dense(s) for s in range(trace.n_seqs)])
    assert np.allclose(trace.frequencies(), dense.mean(axis=(0, 1)))
    assert _sorted_within_tokens(trace)
    for s in range(trace.n_seqs):   # nothing toggles "at" token 0: it is the initial state
        assert len(trace.on(s, 0)) == 0 and len(trace.off(s, 0)) == 0
        assert np.array_equal(trace.initial_active(s), dense[s, 0])
    assert trace.on_idx.dtype == np.int32 and trace.on_ptr.dtype == np.int64


def test_same_seed_same_trace_on_every_code_path(monkeypatch):
    model = load_model("tiny")
    base = tg.synthetic_trace(model, 200, 3, seed=5)
    assert _same(base, tg.synthetic_trace(model, 200, 3, seed=5))
    assert not np.array_equal(base.on_idx, tg.synthetic_trace(model, 200, 3, seed=6).on_idx)
    blocks = [("_BLOCK_MIN_TOGGLES", 1), ("_BLOCK_MIN_TOGGLES_PER_TOKEN", 1)]
    threads = [("_worker_threads", lambda: 3)]
    one_thread = [("_worker_threads", lambda: 1)]
    wide = [("_NARROW_KEY_BITS", 0)]
    tight = [("_toggle_capacity", lambda mean, n: 7)]

    def run(patches, n_tokens=200, n_seqs=3):
        with monkeypatch.context() as m:
            for attr, value in patches:
                m.setattr(tg, attr, value)
            return tg.synthetic_trace(model, n_tokens, n_seqs, seed=5)
    for name, patches in {"one thread": one_thread, "uint64 keys": wide, "buffer growth": tight,
                          "all": one_thread + wide + tight}.items():
        assert _same(base, run(patches)), name
    # several neuron blocks per sequence (each with its own generator): another trace, but the
    # same one however many threads generate the blocks
    blocked = run(blocks + one_thread)
    assert not _same(base, blocked)
    blocked.validate()
    assert _sorted_within_tokens(blocked)
    for name, patches in {"threads": threads, "uint64 keys": threads + wide,
                          "buffer growth": threads + tight, "two blocks": blocks + [("_MAX_BLOCKS", 2)]}.items():
        got = run(blocks + patches)
        assert _same(blocked, got) == (name != "two blocks"), name
    one = run(blocks + one_thread, 50, 1)
    assert _same(one, run(blocks + threads, 50, 1))


def test_sequences_do_not_depend_on_the_batch(monkeypatch):
    """Sequence s of a batch is the trace a one-sequence run would give with that child seed."""
    model = load_model("tiny")
    for blocks in (False, True):
        with monkeypatch.context() as m:
            if blocks:
                m.setattr(tg, "_BLOCK_MIN_TOGGLES", 1)
                m.setattr(tg, "_BLOCK_MIN_TOGGLES_PER_TOKEN", 1)
            batch = tg.synthetic_trace(model, 120, 4, seed=8)
            assert _same(batch.sequences([0, 1]), tg.synthetic_trace(model, 120, 2, seed=8))


def test_neurons_that_never_fire(monkeypatch):
    layout = NeuronLayout(2, 300, 500)
    freqs = np.random.default_rng(1).uniform(0.0, 0.6, layout.n_neurons)
    freqs[::7] = 0.0
    for blocks in (False, True):
        with monkeypatch.context() as m:
            if blocks:
                m.setattr(tg, "_BLOCK_MIN_TOGGLES", 1)
                m.setattr(tg, "_BLOCK_MIN_TOGGLES_PER_TOKEN", 1)
            trace = tg.markov_trace(freqs, layout, 300, 2, token_overlap=0.85, seed=3)
        trace.validate()
        assert _sorted_within_tokens(trace)
        assert not np.isin(np.arange(0, layout.n_neurons, 7), np.concatenate([trace.on_idx, trace.off_idx])).any()
        assert not trace.initial_active(0)[::7].any()
        assert trace.frequencies()[1::7].mean() == pytest.approx(freqs[1::7].mean(), rel=0.1)


def test_wrap_around_check(monkeypatch):
    """uint32 keys that hold exactly neuron + token bits: the token field may wrap while simulating."""
    layout = NeuronLayout(1, 20000, 20000)   # 16 neuron bits
    n_tokens = 40000                           # 16 token bits
    freqs = np.random.default_rng(0).uniform(0.001, 0.05, layout.n_neurons)
    chains = tg._MarkovChains(freqs, freqs * 1e-3, (1 - freqs) * 1e-3, n_tokens, 1)
    assert chains.dtype == np.uint32 and chains.check_wrap
    a = tg.markov_trace(freqs, layout, n_tokens, 1, token_overlap=0.999, seed=1)
    a.validate()
    assert _sorted_within_tokens(a)
    monkeypatch.setattr(tg, "_NARROW_KEY_BITS", 0)
    assert _same(a, tg.markov_trace(freqs, layout, n_tokens, 1, token_overlap=0.999, seed=1))


@pytest.mark.parametrize("blocks", [False, True])
def test_frequencies_and_overlap_match_the_chains(monkeypatch, blocks):
    if blocks:
        monkeypatch.setattr(tg, "_BLOCK_MIN_TOGGLES", 1)
        monkeypatch.setattr(tg, "_BLOCK_MIN_TOGGLES_PER_TOKEN", 1)
    model = load_model("tiny")
    layout = NeuronLayout.of(model)
    n_tokens, n_seqs = 4000, 4
    trace = tg.synthetic_trace(model, n_tokens, n_seqs, token_overlap=0.9, seed=2, layer_coupling=0.0,
                               profile_drift=0.0)
    f = trace.offline_freqs.astype(np.float64)
    emp = trace.frequencies()
    rho = tg.persistence_for_overlap(f, layout, 0.9)[layout.group_of()]
    # sd of a stationary chain's time average: sqrt(f (1 - f) / T * (1 + rho) / (1 - rho))
    sd = np.sqrt(f * (1 - f) / (n_tokens * n_seqs) * (1 + rho) / (1 - rho))
    ok = f > 0.01
    z = (emp[ok] - f[ok]) / sd[ok]
    assert abs(z.mean()) < 0.2 and 0.8 < z.std() < 1.2 and np.abs(z).max() < 6
    rare = ~ok   # rare neurons: compare total active mass (roughly Poisson in bursts)
    assert emp[rare].sum() == pytest.approx(f[rare].sum(), rel=0.1)
    expected_toggles = (2 * f * (1 - f) * (1 - rho)).sum() * (n_tokens - 1) * n_seqs
    assert trace.n_events == pytest.approx(expected_toggles, rel=0.02)
    for s in range(n_seqs):
        assert trace.token_overlap(s, 1, max_tokens=2000) == pytest.approx(0.9, abs=0.01)


def test_holding_times_are_geometric():
    layout = NeuronLayout(1, 1000, 1000)
    freqs = np.full(layout.n_neurons, 0.3)
    trace = tg.markov_trace(freqs, layout, 3000, 1, token_overlap=0.9, seed=4)
    rho = tg.persistence_for_overlap(freqs, layout, 0.9)[0]
    p_on, p_off = 0.3 * (1 - rho), 0.7 * (1 - rho)
    dense = trace.dense(0)
    # complete runs: bounded by a toggle on both sides
    x = dense.astype(np.int8)
    change = np.diff(x, axis=0)
    for value, p in ((1, p_off), (0, p_on)):
        lengths = []
        for i in range(layout.n_neurons):
            t = np.flatnonzero(change[:, i]) + 1   # tokens where neuron i toggles
            if len(t) < 2:
                continue
            runs = np.diff(t)
            lengths.append(runs[x[t[:-1], i] == value])
        lengths = np.concatenate(lengths)
        n = len(lengths)
        assert n > 20000
        for k in range(1, 6):
            want = p * (1 - p) ** (k - 1)
            got = np.mean(lengths == k)
            assert got == pytest.approx(want, abs=5 * np.sqrt(want * (1 - want) / n)), (value, k)


def _reference_scale_to_mean(shape, mean):
    """The former fixed-point iteration (kept as the oracle for the exact water-filling)."""
    shape = np.asarray(shape, dtype=np.float64)
    f = shape / np.maximum(shape.mean(axis=-1, keepdims=True), 1e-300) * mean
    for _ in range(200):
        f = np.minimum(f, tg.MAX_FREQUENCY)
        deficit = mean - f.mean(axis=-1, keepdims=True)
        if np.all(np.abs(deficit) < 1e-13 * mean):
            break
        free = f < tg.MAX_FREQUENCY
        free_mass = np.where(free, f, 0).sum(axis=-1, keepdims=True)
        f = np.where(free, f * (1 + deficit * f.shape[-1] / np.maximum(free_mass, 1e-300)), f)
    return np.minimum(f, tg.MAX_FREQUENCY)


def test_scale_to_mean_is_exact_water_filling():
    rng = np.random.default_rng(3)
    for _ in range(5):
        shape = rng.pareto(1.0, (6, 2000))
        for mean in (0.02, 0.18, 0.5, 0.9):
            f = tg._scale_to_mean(shape, mean)
            assert np.allclose(f.mean(axis=1), mean, rtol=1e-12, atol=0)
            assert f.max() <= tg.MAX_FREQUENCY
            free = f < tg.MAX_FREQUENCY   # uncapped neurons share one scale factor per row
            ratio = np.where(free, f / np.where(shape > 0, shape, 1), np.nan)
            lam = np.nanmax(ratio, axis=1, keepdims=True)
            assert np.allclose(np.nanmin(ratio, axis=1, keepdims=True), lam, rtol=1e-12)
            # ... and the capped ones would exceed the cap at that factor
            assert np.all((shape * lam)[~free] >= tg.MAX_FREQUENCY * (1 - 1e-12))
            assert np.allclose(f, _reference_scale_to_mean(shape, mean), rtol=1e-9, atol=1e-15)
    assert np.array_equal(tg._scale_to_mean(np.zeros((2, 4)), 0.3), np.zeros((2, 4)))
    assert np.array_equal(tg._scale_to_mean(np.array([1.0, 0, 0, 0]), 0.3), [tg.MAX_FREQUENCY, 0, 0, 0])


def test_frequencies_match_the_per_layer_reference():
    for name in ("tiny", "relullama-7b"):
        model = load_model(name)
        layout = NeuronLayout.of(model)
        qkv_mean, ffn_mean = model.active_fraction
        # skew: every layer is a permutation of one scaled curve (same draws as before)
        k = np.log(1 - 0.8) / np.log(0.8) - 1.0
        rng = np.random.default_rng(np.random.SeedSequence(9))
        parts = []
        for width, mean in ((layout.d_qkv, qkv_mean), (layout.d_ffn, ffn_mean)):
            u = (np.arange(width) + 0.5) / width
            f = _reference_scale_to_mean(np.broadcast_to(u ** k, (layout.n_layers, width)), mean)
            parts.append(rng.permuted(f, axis=1))
        want = np.concatenate(parts, axis=1).ravel()
        got = tg.frequencies_from_skew(model, 0.8, np.random.SeedSequence(9))
        assert np.allclose(got, want, rtol=1e-9, atol=1e-300)
        # profile: distinct source rows are resampled and scaled once, then repeated per layer
        counts = tg.relullama7b_counts()
        for width in (layout.d_qkv, layout.d_ffn):
            src = np.minimum((np.arange(layout.n_layers) + 0.5) / layout.n_layers * counts.shape[0],
                             counts.shape[0] - 1).astype(int)
            rows = counts[src].astype(np.float64)
            if rows.shape[1] != width:
                q_src = (np.arange(rows.shape[1]) + 0.5) / rows.shape[1]
                q_dst = (np.arange(width) + 0.5) / width
                rows = np.stack([np.interp(q_dst, q_src, r) for r in np.sort(rows, axis=1)])
            assert np.array_equal(tg.resample_profile(counts, layout.n_layers, width), rows)


def test_followers_copy_their_roots_exactly():
    """add_followers (vectorised copy rounds + one merge sort) against a dense oracle."""
    from ndpsched.layercorr import add_followers, plan_coupling

    layout = NeuronLayout(5, 40, 120)
    rng = np.random.default_rng(6)
    freqs = rng.uniform(0.02, 0.5, layout.n_neurons)
    # per-(layer, kind) shares, high enough for chains of followers over several layers
    plan = plan_coupling(freqs, layout, np.tile([[0.8, 0.5]], (5, 1)), np.random.default_rng(1))
    assert plan.follower[layout.per_layer:].mean() > 0.5 and not plan.follower[:layout.per_layer].any()
    assert (plan.root[plan.follower] < layout.per_layer).any()          # some chains reach layer 0
    runtime = freqs.copy()
    runtime[plan.follower] = 0.0
    base = tg.markov_trace(runtime, layout, 80, 3, token_overlap=0.7, seed=2)
    out = add_followers(base, plan)
    out.validate()
    assert _sorted_within_tokens(out)
    for s in range(3):
        want = base.dense(s)
        want[:, plan.follower] = want[:, plan.root[plan.follower]]
        assert np.array_equal(out.dense(s), want)
    # a scalar share draws the same followers as the same value per layer
    a = plan_coupling(freqs, layout, 0.3, np.random.default_rng(4))
    b = plan_coupling(freqs, layout, np.full(5, 0.3), np.random.default_rng(4))
    assert np.array_equal(a.follower, b.follower) and np.array_equal(a.parents, b.parents)
