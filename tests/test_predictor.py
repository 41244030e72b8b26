"""Hermes' FSM predictor: the event-driven implementation against a dense reference."""
from __future__ import annotations

import numpy as np
import pytest

from ndpsched.policies.fsm import initial_states
from ndpsched.registry import registry
from ndpsched.trace import ActivationTrace, NeuronLayout

from .test_registry import make_ctx


def _coupled_dense(model, n_tokens, seed):
    """Dense activity where half the neurons of layer l>0 copy their first parent (with noise)."""
    rng = np.random.default_rng(seed)
    lay = NeuronLayout.of(model)
    n = lay.n_neurons
    parents = np.full((n, 2), -1, dtype=np.int64)
    for layer in range(1, lay.n_layers):
        for kind in (0, 1):
            cur, prev = lay.kind_slice(layer, kind), lay.kind_slice(layer - 1, kind)
            width = cur.stop - cur.start
            parents[cur, 0] = prev.start + rng.permutation(width)
            parents[cur, 1] = prev.start + rng.permutation(width)
    freqs = rng.uniform(0.02, 0.5, n)
    act = np.zeros((n_tokens, n), dtype=bool)
    act[0] = rng.random(n) < freqs
    for t in range(1, n_tokens):
        stay = rng.random(n) < 0.85
        act[t] = np.where(stay, act[t - 1], rng.random(n) < freqs)
    follower = (parents[:, 0] >= 0) & (rng.random(n) < 0.5)
    for layer in range(1, lay.n_layers):      # copy parents layer by layer (chains resolve in order)
        sl = slice(layer * lay.per_layer, (layer + 1) * lay.per_layer)
        f = np.flatnonzero(follower[sl]) + sl.start
        act[:, f] = act[:, parents[f, 0]] ^ (rng.random((n_tokens, len(f))) < 0.03)
    return act, parents


def reference_predictions(act, parents, prefill_freqs, first_layer, P, lam=6.0, T=15.0, mode="both",
                          token_threshold=10.0):
    """Dense O(N) per token: prediction for every token t >= P."""
    s = initial_states(prefill_freqs).astype(np.int64)  # state after P-1
    preds = {}
    valid = parents >= 0
    for t in range(P, act.shape[0]):
        s2 = np.where(valid, act[t][np.maximum(parents, 0)], 0).sum(axis=1)
        s2 = np.where(first_layer, 2, s2)
        preds[t] = {"both": s + lam * s2 > T, "token": s > token_threshold, "layer": s2 >= 1}[mode]
        s = np.where(act[t], np.minimum(15, s + 4), np.maximum(0, s - 1))
    return preds


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["both", "token", "layer"])
def test_event_driven_fsm_matches_dense_reference(seed, mode, tiny_model, tiny_hw):
    P, n_tokens = 10, 60
    act, parents = _coupled_dense(tiny_model, n_tokens, seed)
    trace = ActivationTrace.from_dense(act, NeuronLayout.of(tiny_model))
    trace.layer_parents = parents
    ctx = make_ctx(tiny_model, tiny_hw, trace)
    ctx.prefill_freqs = act[:P].mean(axis=0)
    ctx.layer_parents = parents
    pred = registry("predictor").create("hermes.fsm", {"false_negative": "drop", "mode": mode})
    pred.begin(ctx, act[P - 1], P - 1)
    ref = reference_predictions(act, parents, ctx.prefill_freqs, ctx.layer_of == 0, P, mode=mode)
    computed = pred.initial_computed().copy()
    hits = active = predicted = 0
    for t in range(P, n_tokens):
        on, off = pred.predict(t, trace.on(0, t), trace.off(0, t))
        computed[on] = True
        computed[off] = False
        assert np.array_equal(computed, ref[t]), f"token {t}"
        hits += (ref[t] & act[t]).sum()
        active += act[t].sum()
        predicted += ref[t].sum()
    summary = pred.summary()
    assert summary["recall"] == pytest.approx(hits / active)
    assert summary["precision"] == pytest.approx(hits / predicted)
    wrong = predicted + active - 2 * hits
    assert summary["accuracy"] == pytest.approx(1 - wrong / ((n_tokens - P) * tiny_model.n_neurons))
    assert summary["state_table_bytes"] == (tiny_model.n_neurons * 4 + 7) // 8


def test_fsm_modes_and_recompute(tiny_model, tiny_hw):
    P, n_tokens = 10, 40
    act, parents = _coupled_dense(tiny_model, n_tokens, 3)
    trace = ActivationTrace.from_dense(act, NeuronLayout.of(tiny_model))
    ctx = make_ctx(tiny_model, tiny_hw, trace)
    ctx.layer_parents = parents
    recalls = {}
    for mode in ("both", "token", "layer"):
        pred = registry("predictor").create("hermes.fsm", {"mode": mode, "false_negative": "recompute"})
        pred.begin(ctx, act[P - 1], P - 1)
        computed = pred.initial_computed().copy()
        for t in range(P, n_tokens):
            on, off = pred.predict(t, trace.on(0, t), trace.off(0, t))
            computed[on] = True
            computed[off] = False
            assert np.all(computed[act[t]])        # recompute: every active neuron is computed
        recalls[mode] = pred.summary()["recall"]
    assert all(0 < r <= 1 for r in recalls.values())


def test_fsm_needs_a_correlation_table(tiny_model, tiny_hw, tiny_trace):
    from ndpsched.errors import ConfigError

    ctx = make_ctx(tiny_model, tiny_hw, tiny_trace)
    ctx.layer_parents = None
    with pytest.raises(ConfigError, match="correlation table"):
        registry("predictor").create("hermes.fsm").begin(ctx, tiny_trace.active(0, 5), 5)
    # token-only mode works without one
    registry("predictor").create("hermes.fsm", {"mode": "token"}).begin(ctx, tiny_trace.active(0, 5), 5)


def test_saturating_states_toggle_returns_the_states_it_restarts_from():
    """toggle() hands back each toggled neuron's counter after token - 1 (what the predictor's
    scheduler starts the new trajectory from), equal to a dense step-by-step reference."""
    from ndpsched.policies.fsm import SaturatingStates

    rng = np.random.default_rng(3)
    n, inc, dec = 200, 4, 1
    dense = rng.integers(0, 16, n)
    active = rng.random(n) < 0.3
    states = SaturatingStates(dense, active, 0, inc, dec)
    for token in range(1, 40):
        new_active = active ^ (rng.random(n) < 0.2)
        on, off = np.flatnonzero(new_active & ~active), np.flatnonzero(active & ~new_active)
        s_on, s_off = states.toggle(on, off, token)
        assert np.array_equal(s_on, dense[on]) and np.array_equal(s_off, dense[off])
        active = new_active
        dense = np.where(active, np.minimum(15, dense + inc), np.maximum(0, dense - dec))
        assert np.array_equal(states.all_states(token), dense)
