"""The decode loop: incremental counts equal a from-scratch recount; moves; capacity; seeds."""
from __future__ import annotations


import numpy as np
import pytest

from ndpsched.config import RunConfig
from ndpsched.errors import CapacityError, ConfigError, TraceError
from ndpsched.policy import BalanceMoves, BalancerPolicy, PartitionMoves, PartitionPolicy
from ndpsched.presets import load_hardware, load_model
from ndpsched.registry import registry
from ndpsched.run import simulate
from ndpsched.simulator import Simulator
from ndpsched.tracegen import synthetic_trace

from .conftest import TINY_HW, recount


class ShuffleBalancer(BalancerPolicy):
    """Test policy: every window, moves 10 random neurons to random DIMMs."""

    registered_name = "test.shuffle"
    uses_neuron_activity = True

    def _initial(self, ctx, on_gpu):
        return (np.arange(ctx.n_neurons) % ctx.n_dimms).astype(np.int16)

    def _update(self, window, placement):
        idx = self.ctx.rng.choice(self.ctx.n_neurons, 10, replace=False)
        counts = window.neuron_counts(idx)
        assert counts.min() >= 0 and counts.max() <= (window.t1 - window.t0) * self.ctx.batch
        return BalanceMoves(idx, self.ctx.rng.integers(0, self.ctx.n_dimms, 10))


class SwapPartition(PartitionPolicy):
    """Test policy: starts with top-k; every window evicts 3 hot neurons and promotes 3 cold ones."""

    registered_name = "test.swap"

    def _initial(self, ctx):
        return registry("partition").create("topk").initial_partition(ctx)

    def _update(self, window, placement):
        hot, cold = np.flatnonzero(placement.on_gpu), np.flatnonzero(~placement.on_gpu)
        evict = self.ctx.rng.choice(hot, 3, replace=False)
        promote = self.ctx.rng.choice(cold, 3, replace=False)
        # promote only what fits after the eviction: same kind for same bytes
        promote = np.array([self.ctx.rng.choice(cold[self.ctx.kind_of[cold] == self.ctx.kind_of[e]]) for e in evict])
        promote = np.unique(promote)
        return PartitionMoves(promote, evict[: len(promote)] if len(promote) < 3 else evict)


class ObservingSwap(SwapPartition):
    """SwapPartition that also observes every token's toggles (as hermes.adjust does)."""

    observes_tokens = True

    def reset(self, ctx):
        super().reset(ctx)
        self.seen = []

    def observe(self, token, on, off):
        self.seen.append((token, on.tolist(), off.tolist()))


def _sim(model, hw, trace, partition, balancer, batch, gen_len=30, prompt_len=12, **kw):
    return Simulator(model, hw, trace, partition, registry("predictor").create("oracle"), balancer,
                     batch=batch, prompt_len=prompt_len, gen_len=gen_len, **kw)


@pytest.mark.parametrize("batch", [1, 3])
def test_incremental_counts_equal_recount(batch, tiny_model, tiny_hw, tiny_trace):
    sim = _sim(tiny_model, tiny_hw, tiny_trace, SwapPartition(), ShuffleBalancer(), batch)
    result = sim.run()
    assert result.moves["remapped"] > 0 and result.moves["promoted"] > 0
    n_dev = tiny_hw.n_dimms + 1
    from ndpsched.trace import NeuronLayout
    group = NeuronLayout.of(tiny_model).group_of()
    total, union = recount(tiny_trace, sim.final_placement.device(), group, n_dev, 12 + 30 - 1, batch)
    assert np.array_equal(sim.final_counts["total"], total)
    assert np.array_equal(sim.final_counts["union"], union)
    assert result.bytes_moved["dimm_link"] > 0 and result.bytes_moved["pcie"] > 0


@pytest.mark.parametrize("seq,partition", [(0, "test.swap"), (2, "test.swap"), (1, "observer")])
def test_whole_window_counting_equals_token_by_token(seq, partition, tiny_model, tiny_hw, tiny_trace):
    """Batch 1 with the oracle reads a window's toggles at once (cached deltas + corrections for
    moved neurons; token observers such as hermes.adjust get the tokens after the window); it
    must price every step, and show observers every token, exactly as the token-by-token path."""
    results = []
    for whole in (True, False):
        part = SwapPartition() if partition == "test.swap" else ObservingSwap()
        sim = _sim(tiny_model, tiny_hw, tiny_trace, part, ShuffleBalancer(), 1, seqs=[seq])
        run = sim.start()
        assert run.whole_window
        run.whole_window = whole
        while not run.done:
            run.next_window()
            if not run.done:
                run.apply_policies()
        results.append((run.result(), run.total.copy(), getattr(part, "seen", None)))
    (fast, fast_total, fast_seen), (slow, slow_total, slow_seen) = results
    if partition == "observer":
        assert len(fast_seen) == 30 and fast_seen == slow_seen
    assert fast.moves["remapped"] > 0 and fast.moves["promoted"] > 0
    assert fast.moves == slow.moves
    assert np.array_equal(fast.token_s, slow.token_s)
    assert np.array_equal(fast_total, slow_total)


class CountRecorder(ShuffleBalancer):
    """ShuffleBalancer that also records every window's counts of all neurons and the active set."""

    def reset(self, ctx):
        super().reset(ctx)
        self.seen = []

    def _update(self, window, placement):
        self.seen.append((window.neuron_counts(np.arange(self.ctx.n_neurons)), window.active.copy()))
        return super()._update(window, placement)


def test_replayed_sequence_gives_the_same_run(tiny_model, tiny_hw, tiny_trace, monkeypatch):
    """A second run on the same sequence reads the cached active sets, window counts and count
    deltas (ndpsched.replay); it must price every step, and show the policies every window, as
    the first did, as a fresh simulator does, and as one without the replay cache does."""
    def run_twice():
        sim = _sim(tiny_model, tiny_hw, tiny_trace, SwapPartition(), CountRecorder(), 1, seqs=[1])
        first = sim.run()
        seen_first = sim.balancer.seen
        second = sim.run()
        return sim, first, second, seen_first, sim.balancer.seen

    sim, first, second, seen_first, seen_second = run_twice()
    assert sim._replays[1].have.all() and sim._replays[1].window_counts     # the second run replayed
    import ndpsched.simulator as simulator
    monkeypatch.setattr(simulator, "REPLAY_CACHE_BYTES", 0)
    plain, no_cache, _, seen_plain, _ = run_twice()
    assert not plain._replays
    for other in (second, no_cache):
        assert np.array_equal(first.token_s, other.token_s) and first.moves == other.moves
    for a, b, c in zip(seen_first, seen_second, seen_plain):
        for x, y, z in zip(a, b, c):
            assert np.array_equal(x, y) and np.array_equal(x, z)


def test_seqs_pick_the_batch_from_a_larger_trace(tiny_model, tiny_hw, tiny_trace):
    from ndpsched.errors import ConfigError, TraceError

    one = _sim(tiny_model, tiny_hw, tiny_trace.sequences([2]), SwapPartition(), ShuffleBalancer(), 1).run()
    picked = _sim(tiny_model, tiny_hw, tiny_trace, SwapPartition(), ShuffleBalancer(), 1, seqs=[2]).run()
    assert np.array_equal(one.token_s, picked.token_s)
    with pytest.raises(TraceError, match="outside"):
        _sim(tiny_model, tiny_hw, tiny_trace, SwapPartition(), ShuffleBalancer(), 1, seqs=[5])
    with pytest.raises(ConfigError, match="distinct"):
        _sim(tiny_model, tiny_hw, tiny_trace, SwapPartition(), ShuffleBalancer(), 2, seqs=[1, 1])


def test_breakdown_adds_up_and_tokens_per_s(tiny_model, tiny_hw, tiny_trace):
    cfg = RunConfig(model="tiny", dimms=4, hardware=TINY_HW, prompt_len=12, gen_len=30)
    r = simulate(cfg, trace=tiny_trace)
    assert sum(r.breakdown_s.values()) == pytest.approx(r.prefill_s + r.decode_s)
    assert r.tokens_per_s == pytest.approx(30 / (r.prefill_s + r.decode_s))
    assert 0 <= r.hot_fraction <= 1
    assert r.config["partition"]["name"] == "hermes.adjust" and r.config["predictor"]["name"] == "hermes.fsm"


def test_same_seed_same_result(tiny_trace):
    cfg = RunConfig(model="tiny", dimms=4, hardware=TINY_HW, prompt_len=12, gen_len=30, system="random", seed=5)
    a, b = simulate(cfg, trace=tiny_trace), simulate(cfg, trace=tiny_trace)
    assert a.tokens_per_s == b.tokens_per_s and np.array_equal(a.token_s, b.token_s)
    c = simulate(cfg.with_overrides(["seed=6"]), trace=tiny_trace)
    assert c.tokens_per_s != a.tokens_per_s


def test_more_dimm_bandwidth_is_never_slower(tiny_trace):
    base = RunConfig(model="tiny", dimms=4, hardware=TINY_HW, prompt_len=12, gen_len=30, system="ndp-only")
    fast = base.with_overrides(["hardware.dimm.data_rate_mtps=6400"])
    assert simulate(fast, trace=tiny_trace).decode_s < simulate(base, trace=tiny_trace).decode_s


def test_capacity_errors(tiny_trace):
    with pytest.raises(CapacityError, match="does not fit GPU"):
        simulate(RunConfig(model="tiny", hardware={"gpu": {"memory_bytes": 1e5, "reserved_bytes": 0}},
                           prompt_len=12, gen_len=30), trace=tiny_trace)
    with pytest.raises(CapacityError, match="use --dimms"):
        simulate(RunConfig(model="tiny", dimms=1, hardware={**TINY_HW, "dimm": {"capacity_bytes": 3e5}},
                           prompt_len=12, gen_len=30), trace=tiny_trace)
    with pytest.raises(CapacityError, match="falcon-40b"):
        from ndpsched.simulator import memory_budgets
        from ndpsched.costmodel import CostParams
        memory_budgets(load_model("falcon-40b"), load_hardware(n_dimms=2), CostParams(), 1, 256)


def test_trace_shape_errors(tiny_trace):
    with pytest.raises(TraceError, match="does not match model"):
        simulate(RunConfig(model="relullama-7b"), trace=tiny_trace)
    with pytest.raises(TraceError, match="batch 8 needs 8"):
        simulate(RunConfig(model="tiny", hardware=TINY_HW, batch=8, prompt_len=12, gen_len=30), trace=tiny_trace)
    with pytest.raises(TraceError, match="needs 1128"):
        simulate(RunConfig(model="tiny", hardware=TINY_HW, prompt_len=1000, gen_len=128), trace=tiny_trace)


def test_bad_sizes():
    with pytest.raises(ConfigError, match="gen_len"):
        simulate(RunConfig(model="tiny", hardware=TINY_HW, gen_len=0))
    with pytest.raises(ConfigError, match="batch"):
        simulate(RunConfig(model="tiny", hardware=TINY_HW, batch=-1))


def test_invalid_moves_are_rejected(tiny_model, tiny_hw, tiny_trace):
    class BadMoves(BalancerPolicy):
        registered_name = "test.bad"

        def _initial(self, ctx, on_gpu):
            return np.zeros(ctx.n_neurons, np.int16)

        def _update(self, window, placement):
            return BalanceMoves(np.array([0, 0]), np.array([1, 2]))

    with pytest.raises(ConfigError, match="same neuron twice"):
        _sim(tiny_model, tiny_hw, tiny_trace, registry("partition").create("topk"), BadMoves(), 1).run()


def test_config_overrides_and_errors():
    cfg = RunConfig().with_overrides(["balancer.params.window=8", "cost.sync_us=5", "hardware.gpu.kernel_overhead_us=3",
                                      "trace.token_overlap=0.8", "dimms=4"])
    assert cfg.balancer.params == {"window": 8} and cfg.cost == {"sync_us": 5}
    assert cfg.hardware == {"gpu": {"kernel_overhead_us": 3}} and cfg.dimms == 4
    from ndpsched.errors import UnknownNameError
    with pytest.raises(UnknownNameError, match="Did you mean 'dimms'"):
        RunConfig().with_overrides(["dimm=4"])
    with pytest.raises(UnknownNameError):
        RunConfig().with_overrides(["trace.overlap=0.8"])
    with pytest.raises(ConfigError):
        RunConfig().with_overrides(["model.name=x"])


def test_larger_models_run_fast_enough():
    """A real-size model through the whole path (relullama-7b, 8 decode steps)."""
    model = load_model("relullama-7b")
    trace = synthetic_trace(model, 24, 1, seed=0)
    r = simulate(RunConfig(model="relullama-7b", prompt_len=16, gen_len=8), trace=trace)
    assert r.tokens_per_s > 0 and len(r.token_s) == 8


class RecordingBalancer(BalancerPolicy):
    """Test policy: records every window's per-neuron counts; never moves."""

    registered_name = "test.record"
    uses_neuron_activity = True

    def _initial(self, ctx, on_gpu):
        self.seen = []
        return (np.arange(ctx.n_neurons) % ctx.n_dimms).astype(np.int16)

    def _update(self, window, placement):
        self.seen.append((window.t0, window.t1, window.neuron_counts(np.arange(self.ctx.n_neurons))))
        return None


@pytest.mark.parametrize("batch", [1, 3])
def test_window_neuron_counts_match_trace(batch, tiny_model, tiny_hw, tiny_trace):
    bal = RecordingBalancer()
    _sim(tiny_model, tiny_hw, tiny_trace, registry("partition").create("topk"), bal, batch).run()
    assert len(bal.seen) == 5     # 30 decode tokens in windows of 5; no decision after the last
    for t0, t1, counts in bal.seen:
        want = sum(tiny_trace.active_token_counts(s, t0, t1) for s in range(batch))
        assert np.array_equal(counts, want), (t0, t1)


def test_stage_times_add_up_to_decode(tiny_trace):
    r = simulate(RunConfig(model="tiny", dimms=4, hardware=TINY_HW, prompt_len=12, gen_len=30), trace=tiny_trace)
    assert set(r.stage_s) == {"qkv", "attention", "projection", "ffn", "other"}
    assert sum(r.stage_s.values()) == pytest.approx(r.decode_s)


@pytest.mark.parametrize("system", ["hermes", "powerinfer", "hermes-oracle"])
def test_full_systems_are_deterministic(system, tiny_trace):
    cfg = RunConfig(model="tiny", dimms=4, hardware=TINY_HW, prompt_len=12, gen_len=30, system=system, batch=2, seed=3)
    a, b = simulate(cfg, trace=tiny_trace), simulate(cfg, trace=tiny_trace)
    assert np.array_equal(a.token_s, b.token_s) and a.moves == b.moves and a.predictor == b.predictor


def test_window_memo_keeps_values_within_the_replay_budget():
    """WindowMemo: visits count per window; values are kept read-only while the simulator's replay
    budget allows and dropped past it (the policy then recomputes)."""
    from ndpsched.replay import SequenceReplay, WindowMemo

    replay = SequenceReplay(np.zeros(64, dtype=bool), 9, 11)
    budget = [100]

    def reserve(nbytes):
        if nbytes > budget[0]:
            return False
        budget[0] -= nbytes
        return True

    first = WindowMemo(replay, 10, 15, reserve)
    assert first.visits == 1 and first.get("k") is None
    first.put("k", np.zeros(80, dtype=np.uint8))
    second = WindowMemo(replay, 10, 15, reserve)
    kept = second.get("k")
    assert second.visits == 2 and kept is not None and not kept.flags.writeable
    second.put("big", np.zeros(80, dtype=np.uint8))          # 20 bytes left: refused
    assert WindowMemo(replay, 10, 15, reserve).get("big") is None
    assert WindowMemo(replay, 15, 20, reserve).visits == 1    # another window counts on its own


@pytest.mark.parametrize("partition,balancer", [("hermes.adjust", "hermes.window"), ("hermes.ilp", "hermes.window")])
def test_a_windows_objects_are_freed_without_the_garbage_collector(partition, balancer, tiny_model, tiny_hw, tiny_trace):
    """A window's outcome and activity form no reference cycle with each other or the run (the
    activity holds both weakly): they are freed as the next window replaces them, and a run with
    its last reference, not at the next collection, which would keep their arrays alive meanwhile
    (and cost a pause per ~50 windows)."""
    import gc
    import weakref

    sim = _sim(tiny_model, tiny_hw, tiny_trace, registry("partition").create(partition),
               registry("balancer").create(balancer), 1)
    gc.disable()
    try:
        run = sim.start()
        out = run.next_window()
        assert out.activity.outcome is out and out.activity.run is run
        gone = weakref.ref(out), weakref.ref(out.activity)
        run.apply_policies()
        del out
        run.next_window()
        assert [ref() for ref in gone] == [None, None]
        while not run.done:                      # a finished run, too, goes with its last reference
            run.apply_policies()
            run.next_window()
        gone = weakref.ref(run), weakref.ref(run.last), weakref.ref(run.last.activity)
        del run
        assert [ref() for ref in gone] == [None, None, None]
    finally:
        gc.enable()
