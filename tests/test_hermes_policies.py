"""Hermes' algorithms and the other published heuristics against brute force / hand answers."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from ndpsched.config import RunConfig
from ndpsched.policies import ilp
from ndpsched.policy import PartitionMoves, Placement, WindowActivity
from ndpsched.registry import registry
from ndpsched.run import simulate

from .conftest import TINY_HW
from .test_registry import make_ctx


def brute_force(gpu, dimm, stage, over, issue, n_dimms, nbytes, gpu_budget, dimm_budget):
    """Exhaustive optimum of Hermes' objective over every neuron -> {GPU, DIMM 0..J-1}."""
    n, S = len(gpu), stage.max() + 1
    best = np.inf
    for assign in itertools.product(range(n_dimms + 1), repeat=n):   # 0 = GPU, 1+j = DIMM j
        a = np.array(assign)
        if nbytes[a == 0].sum() > gpu_budget:
            continue
        if any(nbytes[a == 1 + j].sum() > dimm_budget for j in range(n_dimms)):
            continue
        total = 0.0
        for s in range(S):
            m = stage == s
            on_gpu = m & (a == 0)
            t_gpu = (over[s] if on_gpu.any() else 0.0) + gpu[on_gpu].sum()
            t_dimm = max(issue + dimm[m & (a == 1 + j)].sum() for j in range(n_dimms))
            total += max(t_gpu, t_dimm)
        best = min(best, total)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hermes_ilp_matches_brute_force(seed):
    """2 layers x 5 neurons on a GPU + 2 DIMMs, one neuron per bucket: the ILP is exact."""
    rng = np.random.default_rng(seed)
    n, J = 10, 2
    stage = np.repeat([0, 1], 5)
    gpu = rng.uniform(1, 10, n) * 1e-6
    dimm = rng.uniform(1, 10, n) * 1e-6
    nbytes = rng.integers(1, 4, n) * 100
    over = np.array([3e-6, 5e-6])
    bk = ilp.Buckets(np.arange(n), stage, np.arange(n), np.ones(n, dtype=int), gpu, dimm, np.ones(n), nbytes)
    gpu_budget, dimm_budget = 500, int(nbytes.sum()) // 2     # tight, but always feasible
    y, x, res = ilp.hermes_ilp(bk, 2, J, over, 0.5e-6, gpu_budget, dimm_budget, per_dimm=True, mip_rel_gap=0.0)
    want = brute_force(gpu, dimm, stage, over, 0.5e-6, J, nbytes, gpu_budget, dimm_budget)
    assert res.fun == pytest.approx(want, rel=1e-6)
    assert nbytes[y == 1].sum() <= gpu_budget
    assert np.all(y + x.sum(axis=1) == 1)


def _fast_gpu(hw):
    """The tiny model's stages are too small to pay for a 10 us sync; free syncs and launches
    make the GPU worth using, so the partition policies have hot neurons to work with."""
    import dataclasses

    from ndpsched.costmodel import CostParams
    return hw.replace(gpu=dataclasses.replace(hw.gpu, kernel_overhead_us=0.0)), CostParams(sync_us=0.0)


def test_ilp_partition_fits_and_is_deterministic(tiny_model, tiny_hw, tiny_trace):
    ctx = make_ctx(tiny_model, tiny_hw, tiny_trace)
    p1 = registry("partition").create("hermes.ilp")
    a = p1.initial_partition(ctx)
    b = registry("partition").create("hermes.ilp").initial_partition(make_ctx(tiny_model, tiny_hw, tiny_trace))
    assert np.array_equal(a, b)
    assert ctx.neuron_bytes[a].sum() <= ctx.gpu_budget_bytes
    assert p1.info["mip_gap"] <= 0.01 and p1.info["solve_s"] >= 0


def test_ilp_never_worse_than_static_partitions_in_its_own_model(tiny_model, tiny_hw, tiny_trace):
    """The ILP optimises the expected-cost model: its objective beats top-k's and all-cold's."""
    ctx = make_ctx(tiny_model, tiny_hw, tiny_trace)
    bk = ilp.frequency_buckets(ctx, 4)
    over = ilp.gpu_stage_overhead_s(ctx)[np.arange(ctx.layout.n_groups) % 2]
    y, _, res = ilp.hermes_ilp(bk, ctx.layout.n_groups, ctx.n_dimms, over, ctx.cost.ndp_issue_s,
                               ctx.gpu_budget_bytes, ctx.dimm_budget_bytes, mip_rel_gap=0.0)

    def objective(y):
        gpu = np.bincount(bk.stage, weights=bk.gpu_cost * y / bk.size, minlength=ctx.layout.n_groups)
        used = np.bincount(bk.stage, weights=y, minlength=ctx.layout.n_groups) > 0
        dimm = np.bincount(bk.stage, weights=bk.dimm_cost * (bk.size - y) / bk.size, minlength=ctx.layout.n_groups)
        return np.maximum(gpu + over * used, dimm / ctx.n_dimms + ctx.cost.ndp_issue_s).sum()

    assert objective(y) == pytest.approx(res.fun, rel=1e-6)
    assert res.fun <= objective(np.zeros_like(y)) + 1e-12
    # top-k by frequency: fill buckets in frequency order until the budget is used
    order = np.lexsort((bk.start,))
    topk = np.zeros_like(y)
    left = ctx.gpu_budget_bytes
    for b in order:
        take = min(bk.size[b], left // bk.neuron_bytes[b])
        topk[b] = take
        left -= take * bk.neuron_bytes[b]
    assert res.fun <= objective(topk) + 1e-12


def _window(ctx, load, active, toggles=None):
    return WindowActivity(10, 15, load, active, toggles or [[]] * 5)


@pytest.mark.parametrize("name", ["hermes.window", "greedy.lpt"])
def test_window_balancers_never_raise_the_max_load(name, tiny_model, tiny_hw, tiny_trace):
    """Each stage's max DIMM load (over the window's activity) never rises after the moves."""
    ctx = make_ctx(tiny_model, tiny_hw, tiny_trace)
    rng = np.random.default_rng(0)
    on_gpu = np.zeros(ctx.n_neurons, bool)
    pol = registry("balancer").create(name, {"candidate_stride": 1} if name == "hermes.window" else {})
    home = pol.initial_mapping(ctx, on_gpu)
    for trial in range(5):
        # neuron activity over a 5-token window, constant within the window (no toggles)
        active = (rng.random(ctx.n_neurons) < rng.uniform(0.05, 0.6)).astype(np.uint8)
        home = rng.integers(0, ctx.n_dimms, ctx.n_neurons).astype(np.int16)   # skewed start
        home[(ctx.group_of == 3) & (rng.random(ctx.n_neurons) < 0.5)] = 0
        dev = np.where(on_gpu, 0, home + 1)
        load = np.bincount(ctx.group_of * (ctx.n_dimms + 1) + dev, weights=5.0 * active,
                           minlength=ctx.layout.n_groups * (ctx.n_dimms + 1)).reshape(ctx.layout.n_groups, -1)
        moves = pol.update(_window(ctx, load, active), Placement(on_gpu, home.copy()))
        new_home = home.copy()
        if moves is not None:
            new_home[moves.neurons] = moves.dest
        dev2 = np.where(on_gpu, 0, new_home + 1)
        load2 = np.bincount(ctx.group_of * (ctx.n_dimms + 1) + dev2, weights=5.0 * active,
                            minlength=load.size).reshape(load.shape)
        assert np.all(load2[:, 1:].max(axis=1) <= load[:, 1:].max(axis=1) + 1e-9)
        assert load2[:, 1:].max(axis=1).sum() < load[:, 1:].max(axis=1).sum()   # and it helps


def test_hermes_window_pairs_busiest_with_idlest(tiny_model, tiny_hw, tiny_trace):
    """Hand case: one stage, DIMM loads [40, 0, 10, 30]: moves go 0 -> 1 and 3 -> 2 only."""
    ctx = make_ctx(tiny_model, tiny_hw, tiny_trace)
    on_gpu = np.zeros(ctx.n_neurons, bool)
    home = np.zeros(ctx.n_neurons, np.int16)
    stage = np.flatnonzero(ctx.group_of == 1)          # layer 0 FFN
    active = np.zeros(ctx.n_neurons, np.uint8)
    # 8 active neurons on DIMM 0, 2 on DIMM 2, 6 on DIMM 3 (5 tokens each)
    for dimm, count, offset in ((0, 8, 0), (2, 2, 20), (3, 6, 40)):
        ids = stage[offset: offset + count]
        home[ids] = dimm
        active[ids] = 1
    load = np.zeros((ctx.layout.n_groups, ctx.n_dimms + 1))
    load[1, 1:] = [40, 0, 10, 30]
    pol = registry("balancer").create("hermes.window", {"candidate_stride": 1})
    pol.reset(ctx)
    moves = pol.update(_window(ctx, load, active), Placement(on_gpu, home))
    src = home[moves.neurons]
    assert set(zip(src.tolist(), moves.dest.tolist())) == {(0, 1), (3, 2)}
    assert (src == 0).sum() == 4      # half the 40-0 gap = 20 = 4 neurons x 5
    assert (src == 3).sum() == 2      # half the 30-10 gap = 10 = 2 neurons x 5


def test_static_snake_mapping_balances_expected_load(tiny_model, tiny_hw, tiny_trace):
    ctx = make_ctx(tiny_model, tiny_hw, tiny_trace)
    home = registry("balancer").create("static").initial_mapping(ctx, np.zeros(ctx.n_neurons, bool))
    exp = np.bincount(ctx.group_of * ctx.n_dimms + home, weights=ctx.offline_freqs,
                      minlength=ctx.layout.n_groups * ctx.n_dimms).reshape(-1, ctx.n_dimms)
    rr = registry("balancer").create("round-robin").initial_mapping(ctx, np.zeros(ctx.n_neurons, bool))
    exp_rr = np.bincount(ctx.group_of * ctx.n_dimms + rr, weights=ctx.offline_freqs,
                         minlength=exp.size).reshape(exp.shape)
    assert (exp.max(1) / exp.mean(1)).mean() < (exp_rr.max(1) / exp_rr.mean(1)).mean()


def test_powerinfer_fills_gpu_by_frequency(tiny_model, tiny_hw, tiny_trace):
    hw, cost = _fast_gpu(tiny_hw)
    ctx = make_ctx(tiny_model, hw, tiny_trace, cost=cost)
    on = registry("partition").create("powerinfer.topk").initial_partition(ctx)
    assert ctx.neuron_bytes[on].sum() <= ctx.gpu_budget_bytes
    assert on.any()
    # within a stage it always takes the more frequent neurons
    for g in range(ctx.layout.n_groups):
        m = ctx.group_of == g
        if on[m].any() and (~on[m]).any():
            assert ctx.offline_freqs[m][on[m]].min() >= ctx.offline_freqs[m][~on[m]].max() - 0.05


def test_systems_run_end_to_end(tiny_trace):
    for system in ("hermes", "random", "ndp-only"):
        r = simulate(RunConfig(model="tiny", dimms=4, hardware=TINY_HW, prompt_len=12, gen_len=30, system=system),
                     trace=tiny_trace)
        assert r.tokens_per_s > 0


class _RandomStartAdjust(type(registry("partition").create("hermes.adjust"))):
    """hermes.adjust from a random hot set: the synthetic trace's stationary frequencies make the
    ILP's start nearly optimal, which leaves the online adjustment little to do."""

    def _initial(self, ctx):
        return registry("partition").create("random").initial_partition(ctx)


@pytest.mark.parametrize("batch", [1, 3])
def test_hermes_adjust_swaps_within_capacity_and_recounts(batch, tiny_model, tiny_hw, tiny_trace):
    from ndpsched.trace import NeuronLayout

    from .conftest import recount
    from .test_simulator import _sim

    part = _RandomStartAdjust(registry("partition").create("hermes.adjust", {"hide_copies": False}).params)
    hw, cost = _fast_gpu(tiny_hw)
    sim = _sim(tiny_model, hw, tiny_trace, part, registry("balancer").create("hermes.window"), batch, cost_params=cost)
    result = sim.run()
    assert result.moves["promoted"] > 0 and result.moves["promoted"] == result.moves["evicted"]
    total, union = recount(tiny_trace, sim.final_placement.device(), NeuronLayout.of(tiny_model).group_of(),
                           tiny_hw.n_dimms + 1, 41, batch)
    assert np.array_equal(sim.final_counts["total"], total)
    assert np.array_equal(sim.final_counts["union"], union)


def test_hermes_adjust_promotes_hot_states_only(tiny_model, tiny_hw, tiny_trace):
    """Promoted neurons have state > T_h; the evicted have a lower state than their replacement."""
    from .test_simulator import _sim

    seen = []

    class Spy(_RandomStartAdjust):
        def _update(self, window, placement):
            moves = super()._update(window, placement)
            if moves is not None:
                seen.append((self.states.states(moves.promote, window.t1 - 1),
                             self.states.states(moves.evict, window.t1 - 1)))
            return moves

    spy = Spy(registry("partition").create("hermes.adjust", {"hide_copies": False}).params)
    hw, cost = _fast_gpu(tiny_hw)
    _sim(tiny_model, hw, tiny_trace, spy, registry("balancer").create("static"), 1, cost_params=cost).run()
    assert seen
    for promoted, evicted in seen:
        assert np.all(promoted > 10)
        assert np.all(promoted > evicted)


# all swaps; and the paper's PCIe cap (scaled so the tiny model promotes 1-2 per stage and window)
@pytest.mark.parametrize("params", [{"hide_copies": False}, {"hide_copies": True, "promote_scale": 5.0}])
def test_hermes_adjust_replayed_states_equal_token_updates(tiny_model, tiny_hw, tiny_trace, monkeypatch, params):
    """Episodes replaying a sequence read hermes.adjust's FSM states and its window's sorted
    turn-ons from the replay memo (stored on the second visit) instead of updating states token
    by token and ranking every candidate; where the memo lacks a window the states are rebuilt
    from the last memo and the tokens since, and the pool is built by mask. Every episode must
    promote, evict and price exactly as a run with no replay cache."""
    import ndpsched.simulator as simulator
    from ndpsched.replay import WindowMemo

    from .test_simulator import _sim

    def episodes(n):
        part = _RandomStartAdjust(registry("partition").create("hermes.adjust", params).params)
        hw, cost = _fast_gpu(tiny_hw)
        sim = _sim(tiny_model, hw, tiny_trace, part, registry("balancer").create("hermes.window"), 1,
                   cost_params=cost, seqs=[1])
        start = sim.start(seqs=[1]).initial_placement.freeze()       # the envs' shared start
        return sim, [sim.run(seqs=[1], initial=start) for _ in range(n)]

    sim, replayed = episodes(3)
    kept = {k[:2] for memo in sim._replays[1].memo.values() for k in memo}
    assert {("hermes.adjust", "states"), ("hermes.adjust", "window set")} <= kept
    # a memo that only kept the first windows: the third episode hits, then catches up
    put = WindowMemo.put
    monkeypatch.setattr(WindowMemo, "put", lambda self, key, value: put(self, key, value)
                        if self.window[1] <= 12 + 10 else None)          # prompt 12, windows of 5
    sim, partial = episodes(3)
    assert 0 < sum(bool(m) for m in sim._replays[1].memo.values()) < len(sim._replays[1].memo)
    monkeypatch.setattr(simulator, "REPLAY_CACHE_BYTES", 0)
    plain, uncached = episodes(1)
    assert not plain._replays
    assert uncached[0].moves["promoted"] > 0
    for run in (*replayed, *partial):
        assert np.array_equal(run.token_s, uncached[0].token_s) and run.moves == uncached[0].moves


def _adjust_by_hand(policy, window, placement):
    """hermes.adjust's decision written out per stage with Python sorts: (sorted (promoted,
    evicted) pairs, sorted leftovers), or None where nothing is decided."""
    ctx, p = policy.ctx, policy.params
    pool = policy._candidate_pool(placement, window)          # the pool the decision will use
    members = np.flatnonzero(pool.members())
    on_gpu = placement.on_gpu
    hot = np.flatnonzero(on_gpu)
    cold = members[~on_gpu[members]]
    state = dict(zip(cold.tolist(), pool.states(cold).tolist()))
    state.update(zip(hot.tolist(), pool.states(hot).tolist()))
    usable = [i for i in cold.tolist() if state[i] > p.hot_threshold]
    if len(hot) == 0 or not usable:
        return None
    cap = None
    if p.hide_copies:
        cm = ctx.cost
        per_layer = cm.projection_s(ctx.batch) * cm.pcie_bw
        cap = [int(np.floor(p.promote_scale * per_layer / 2 / cm.neuron_bytes[g % 2])) for g in range(ctx.layout.n_groups)]
    pairs, leftover = [], []
    for g in range(ctx.layout.n_groups):
        cands = sorted((i for i in usable if ctx.group_of[i] == g), key=lambda i: (-state[i], i))
        evictees = sorted((i for i in hot.tolist() if ctx.group_of[i] == g), key=lambda i: (state[i], i))
        for rank, i in enumerate(cands):
            if rank < len(evictees) and (cap is None or rank < cap[g]) and state[i] > state[evictees[rank]]:
                pairs.append((i, evictees[rank]))
            elif cap is None or rank < 3 * cap[g]:
                leftover.append(i)
    return sorted(pairs), sorted(leftover)


@pytest.mark.parametrize("params", [{"hide_copies": False}, {"hide_copies": True, "promote_scale": 5.0},
                                    {"hide_copies": False, "hot_threshold": 6, "state_dec": 0}])
def test_hermes_adjust_decisions_match_a_by_hand_ranking(tiny_model, tiny_hw, tiny_trace, params):
    """Every decision of hermes.adjust, over replayed episodes too, equals the rule written out
    with Python sorts: per stage, the cold candidates above T_h by state (high first, then id)
    paired with the GPU neurons by state (low first, then id), swapped where the candidate's state
    is higher (and, with the PCIe cap, within the stage's first ``cap``)."""
    from .test_simulator import _sim

    checked = []

    class Checked(_RandomStartAdjust):
        def _update(self, window, placement):
            want = _adjust_by_hand(self, window, placement)
            moves = super()._update(window, placement)
            if want is None:
                assert moves is None
            else:
                pairs = [] if moves is None else sorted(zip(moves.promote.tolist(), moves.evict.tolist()))
                assert pairs == want[0]
                assert sorted(self._leftover.tolist()) == want[1]
            checked.append(moves is not None)
            return moves

    part = Checked(registry("partition").create("hermes.adjust", params).params)
    hw, cost = _fast_gpu(tiny_hw)
    sim = _sim(tiny_model, hw, tiny_trace, part, registry("balancer").create("hermes.window"), 1,
               cost_params=cost, seqs=[1])
    start = sim.start(seqs=[1]).initial_placement.freeze()
    for _ in range(3):                  # the second and third replay the first (memo pools)
        sim.run(seqs=[1], initial=start)
    assert sum(checked) > 5


def test_hermes_adjust_sees_a_change_it_did_not_make(tiny_model, tiny_hw, tiny_trace):
    """hermes.adjust trusts its own record of the GPU set only while the run applied exactly its
    own moves since; a foreign change (another caller's apply_partition) makes it rescan."""
    from .test_simulator import _sim

    part = registry("partition").create("hermes.adjust", {})
    hw, cost = _fast_gpu(tiny_hw)
    sim = _sim(tiny_model, hw, tiny_trace, part, registry("balancer").create("hermes.window"), 1,
               cost_params=cost, seqs=[1])
    run = sim.start(seqs=[1])
    swapped = 0
    while not run.done:
        run.next_window()
        if run.done:
            break
        window, placement = run.last.activity, run.placement
        assert np.array_equal(part._hot_ids(placement, window.t1), np.flatnonzero(placement.on_gpu))
        run.apply_partition(part.update(window, placement))
        hot, cold = np.flatnonzero(placement.on_gpu), np.flatnonzero(~placement.on_gpu)
        if len(hot) and len(cold):                     # someone else swaps one pair
            run.apply_partition(PartitionMoves(cold[:1], hot[-1:]), who="test")
            swapped += 1
    assert swapped > 3
