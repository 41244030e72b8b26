"""The compiled loops (ndpsched/jit.py) against plain numpy references written from their docstrings.

The end-to-end checks live elsewhere (hermes.adjust against a by-hand ranking, the simulator's
counts against a recount from scratch, the batch-1 pricing against the general path); these pin
each loop on random inputs with the edge cases the environments hit: idle stages, ties, neurons
that come back home, leftovers that share a cell.
"""
from __future__ import annotations

import numpy as np
import pytest

from ndpsched import simulator
from ndpsched.envs import observations
from ndpsched.policies import balancer, fsm, partition
from ndpsched.replay import SequenceReplay


def _feature_row(load, per_device, imbalance, scalars, cand=observations._NO_CANDIDATES, cap=1.0):
    """``scalars``: window_s, n_tokens, reference_token_s, exposed_s, gpu_compute_s, dimm_compute_s,
    link_bytes, pcie_bytes, progress; link and PCIe bytes hidden per window are 2 and 4."""
    J = load.shape[1] - 1
    row = np.full(len(observations.COMMON_FEATURES) + J + (len(observations.STATE_LEVELS) if len(cand) else 0), np.nan)
    consts = np.array([2.0, 4.0, cap])
    excess = np.full(len(load), np.nan)
    mean = observations._feature_row(row, excess, load, per_device, imbalance, cand, consts, *scalars)
    assert mean == sum(imbalance.tolist()) / len(imbalance)
    return row


@pytest.mark.parametrize("seed", range(4))
def test_feature_row_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    n_stages, J = 64, 8
    load = rng.integers(0, 40, size=(n_stages, J + 1)).astype(np.float64)
    load[rng.random(n_stages) < 0.2, 1:] = 0.0                    # idle stages
    load[3, 1:] = 7.0                                              # a perfectly even one
    per_device = load.sum(axis=0)
    dimm_total = float(per_device[1:].sum())
    imbalance = 1.0 + rng.random(5)
    window_s, n_tokens, ref_s, exposed_s, gpu_s, dimm_s, link_b, pcie_b, progress = (
        *rng.random(1), 5, *rng.random(7))
    scalars = (window_s, n_tokens, ref_s, exposed_s, gpu_s, dimm_s, link_b, pcie_b, progress)
    cand = rng.integers(0, 50, 16)                                 # candidates per FSM state
    got = _feature_row(load, per_device, imbalance, scalars, cand, 40.0)

    dimms = load[:, 1:]
    excess = np.sort((dimms.max(axis=1) * J + 1e-30) / (dimms.sum(axis=1) + 1e-30) - 1.0)
    want = [window_s / n_tokens / ref_s, imbalance.mean() - 1.0]
    want += [np.mean(excess > t) for t in observations.TOLERANCE_LEVELS]
    want += [excess[n_stages // 2], excess[int(0.9 * (n_stages - 1))], excess[-1]]
    want += [per_device[0] / per_device.sum(), exposed_s / window_s, link_b / 2.0, pcie_b / 4.0, progress,
             dimm_s / (gpu_s + dimm_s)]
    want += list(np.sort(per_device[1:])[::-1] * (J / dimm_total))
    want += [cand[s:].sum() / 40.0 for s in (7, 9, 11, 13, 15)]    # state above each level
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)
    idle = _feature_row(np.zeros((4, J + 1)), np.zeros(J + 1), np.ones(5), (1.0, 5, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0))
    assert idle.tolist() == [1.0] + [0.0] * 14 + [1.0] * J


def test_push_row_shifts_and_clips():
    stack = observations.ObservationStack(3, 4)
    for k, row in enumerate(([1.0, -2.0, 11.0, 0.5], [2.0, 3.0, np.inf, -np.inf], [0.25, 10.0, 9.5, 4.0])):
        flat = stack.push(np.array(row))
    np.testing.assert_array_equal(flat.reshape(3, 4), [[1.0, 0.0, 10.0, 0.5], [2.0, 3.0, 10.0, 0.0],
                                                       [0.25, 10.0, 9.5, 4.0]])
    flat[:] = -1.0                                                 # a copy, not a view
    assert stack.push(np.zeros(4)).min() >= 0.0


def test_pack_words_matches_numpy():
    rng = np.random.default_rng(0)
    states = rng.integers(0, 16, 1000).astype(np.uint8)
    active = rng.integers(0, 3, 1000).astype(np.uint8)
    want = (np.int32(37) << 8) | (states.astype(np.int32) << 1) | (active > 0).astype(np.int32)
    np.testing.assert_array_equal(fsm.SaturatingStates.pack(states, active, 37), want)
    np.testing.assert_array_equal(fsm.SaturatingStates.pack(states.astype(np.int64), active > 0, 37), want)


def _pair_by_numpy(cand, c_key, hot, hot_state, group_starts, cap):
    """hermes.adjust's swap rule, written with argsorts (the previous implementation)."""
    n_stage = len(group_starts) - 1
    c_stage, cand_state = c_key // 16, 15 - c_key % 16
    e_count = np.diff(np.searchsorted(hot, group_starts))
    e_order = np.argsort(np.repeat(np.arange(n_stage) * 16, e_count) + hot_state, kind="stable")
    sorted_state = hot_state[e_order]
    c_count = np.bincount(c_stage, minlength=n_stage)
    c_rank = np.arange(len(cand)) - (np.cumsum(c_count) - c_count)[c_stage]
    e_first = np.cumsum(e_count) - e_count
    pair = c_rank < e_count[c_stage]
    e_idx = np.where(pair, e_first[c_stage] + c_rank, 0)
    swap = pair & (cand_state > sorted_state[e_idx]) & (c_rank < cap[c_stage])
    leftover = cand[~swap & (c_rank < 3 * cap[c_stage])]
    evicted = hot[e_order[e_idx[swap]]]
    new_hot = np.sort(np.concatenate([np.setdiff1d(hot, evicted), cand[swap]]))
    return cand[swap], evicted, leftover, new_hot


@pytest.mark.parametrize("seed", range(6))
def test_pair_swaps_matches_argsort_version(seed):
    rng = np.random.default_rng(seed)
    n_stage, per_stage = 6, 200
    group_starts = np.arange(n_stage + 1, dtype=np.int64) * per_stage
    on_gpu = rng.random(n_stage * per_stage) < 0.3
    hot = np.flatnonzero(on_gpu).astype(np.int64)
    hot_state = rng.integers(0, 16, len(hot)).astype(np.uint8)     # many ties
    cold = np.flatnonzero(~on_gpu)
    cand = rng.choice(cold, size=len(cold) // 3, replace=False)
    state = rng.integers(8, 16, len(cand))
    c_key = (cand // per_stage) * 16 + 15 - state
    order = np.lexsort((cand, c_key))
    cand, c_key = cand[order].astype(np.int64), c_key[order].astype(np.int64)
    cap = rng.integers(0, 12, n_stage).astype(np.int64)
    got = partition._pair_swaps(cand, c_key, hot, hot_state, group_starts, cap, True)
    for g, w in zip(got, _pair_by_numpy(cand, c_key, hot, hot_state, group_starts, cap)):
        np.testing.assert_array_equal(g, w)
    # without a cap every candidate can swap and every loser is left over
    got = partition._pair_swaps(cand, c_key, hot, hot_state, group_starts, cap, False)
    for g, w in zip(got, _pair_by_numpy(cand, c_key, hot, hot_state, group_starts, np.full(n_stage, 10**9))):
        np.testing.assert_array_equal(g, w)


def test_memo_pool_cells_matches_numpy():
    rng = np.random.default_rng(3)
    n_stage, per_stage = 4, 1000
    n = n_stage * per_stage
    dense = rng.integers(0, 16, n).astype(np.uint8)
    dense[rng.random(n) < 0.5] = 15                                  # most share a state (a cell)
    on_gpu = rng.random(n) < 0.3
    on_gpu[:per_stage] = False                                       # a stage without GPU neurons
    in_set = rng.random(n) < 0.4
    cell = (np.arange(n) // per_stage) * 16 + 15 - dense.astype(np.int64)
    ws_cells = cell[in_set]
    starts = np.concatenate([[0], np.cumsum(np.bincount(ws_cells, minlength=n_stage * 16))]).astype(np.int64)
    hot = np.flatnonzero(on_gpu)
    leftover = rng.permutation(rng.choice(n, 500, replace=False)).astype(np.int64)   # any order
    blocks = (np.arange(0, n, 8) // per_stage).astype(np.int32)   # stages start at multiples of 8
    kept, kept_cell, totals, hot_state = partition._memo_pool_cells(np.packbits(in_set), starts, hot, blocks, 3,
                                                                    dense, leftover, on_gpu)
    want_kept = leftover[~on_gpu[leftover] & ~in_set[leftover]]
    np.testing.assert_array_equal(kept, want_kept)
    np.testing.assert_array_equal(kept_cell, cell[want_kept])
    candidates = np.concatenate([np.flatnonzero(in_set & ~on_gpu), want_kept])
    cells = np.bincount(cell[candidates], minlength=n_stage * 16)
    np.testing.assert_array_equal(totals, cells.reshape(n_stage, 16).sum(axis=0))
    np.testing.assert_array_equal(hot_state, dense[hot])


def test_memo_ranked_merges_leftovers_by_cell_then_id():
    rng = np.random.default_rng(1)
    n_stage, n = 3, 3000
    on_gpu = rng.random(n) < 0.2
    ws_all = np.sort(rng.choice(n, 1200, replace=False))
    ws_cell = (ws_all // 1000) * 16 + rng.integers(0, 16, len(ws_all))
    order = np.lexsort((ws_all, ws_cell))
    ws_ids, ws_cells = ws_all[order].astype(np.int32), ws_cell[order].astype(np.uint16)
    starts = np.concatenate([[0], np.cumsum(np.bincount(ws_cells, minlength=n_stage * 16))]).astype(np.int64)
    rest = np.setdiff1d(np.flatnonzero(~on_gpu), ws_all)
    leftover = rng.permutation(rng.choice(rest, 300, replace=False)).astype(np.int64)
    leftover_cell = (leftover // 1000) * 16 + rng.integers(0, 4, len(leftover))   # crowded cells
    n_cols = 6
    ids, cells = partition._memo_ranked(ws_ids, ws_cells, starts, on_gpu, leftover, leftover_cell, n_stage,
                                        n_cols, np.zeros(n_stage, dtype=np.int64), False)
    every = np.concatenate([ws_ids[~on_gpu[ws_ids]], leftover])
    every_cell = np.concatenate([ws_cells[~on_gpu[ws_ids]], leftover_cell]).astype(np.int64)
    usable = every_cell % 16 < n_cols
    order = np.lexsort((every[usable], every_cell[usable]))
    np.testing.assert_array_equal(ids, every[usable][order])
    np.testing.assert_array_equal(cells, every_cell[usable][order])
    limit = np.array([5, 0, 40], dtype=np.int64)
    ids_l, _ = partition._memo_ranked(ws_ids, ws_cells, starts, on_gpu, leftover, leftover_cell, n_stage,
                                      n_cols, limit, True)
    stage = ids // 1000
    want = np.concatenate([ids[stage == s][:limit[s]] for s in range(n_stage)])
    np.testing.assert_array_equal(ids_l, want)


def _algorithm1_by_numpy(load, groups, group_of, ids, home, A, move_fraction, max_moves):
    """hermes.window's Algorithm 1 with argsorts (the previous implementation)."""
    J = load.shape[1]
    dimm_at_rank = np.argsort(-load, axis=1, kind="stable")
    rank_of_dimm = np.argsort(dimm_at_rank, axis=1, kind="stable")
    row = (np.arange(len(groups)) * J)[:, None]
    partner = dimm_at_rank.take(row + (J - 1) - rank_of_dimm)
    busy_cell = (rank_of_dimm < J // 2).ravel()
    half_gap = (move_fraction / 2.0) * (load.ravel() - load.take(row + partner).ravel())
    cell = np.searchsorted(groups, group_of[ids]) * J + home
    keep = np.flatnonzero(busy_cell.take(cell))
    ids, cell, A = ids[keep], cell[keep], A[keep]
    order = np.lexsort((np.arange(len(ids)), -A, cell))
    cell_s, A_s = cell[order], A[order].astype(np.float64)
    csum = np.cumsum(A_s)
    first = np.searchsorted(cell_s, cell_s)
    moved_before = csum - A_s - (csum[first] - A_s[first])
    take = (moved_before + A_s) <= half_gap[cell_s]
    if max_moves:
        take &= (np.arange(len(order)) - first) < max_moves
    sel = order[take]
    return ids[sel], partner.ravel()[cell[sel]]


@pytest.mark.parametrize("seed,move_fraction,max_moves", [(0, 1.0, 0), (1, 0.5, 0), (2, 1.0, 3), (3, 0.25, 2)])
def test_algorithm1_matches_argsort_version(seed, move_fraction, max_moves):
    rng = np.random.default_rng(seed)
    n_groups, per_group, J = 10, 300, 8
    group_of = np.repeat(np.arange(n_groups), per_group).astype(np.int32)
    groups = np.sort(rng.choice(n_groups, 6, replace=False)).astype(np.int64)
    load = rng.integers(0, 60, size=(len(groups), J)).astype(np.float64)
    load[0, :4] = load[0, 4]                                       # tied loads
    ids = np.concatenate([np.arange(g * per_group, (g + 1) * per_group, 3) for g in groups]).astype(np.int64)
    home = rng.integers(0, J, len(ids)).astype(np.int64)
    A = rng.integers(1, 6, len(ids)).astype(np.int64)
    on_gpu = rng.random(n_groups * per_group) < 0.2
    home_dimm = np.zeros(n_groups * per_group, dtype=np.int16)
    home_dimm[ids] = home
    A[on_gpu[ids]] = 4                                             # GPU neurons that fired: not candidates
    A[rng.random(len(ids)) < 0.2] = 0                              # neurons that did not fire
    cand = (A > 0) & ~on_gpu[ids]
    want = _algorithm1_by_numpy(load, groups, group_of, ids[cand], home[cand], A[cand], move_fraction, max_moves)
    whole = (ids, np.array([0, len(ids)]), np.zeros(1, dtype=np.int64))             # one run: all of them
    device_load = rng.integers(0, 60, size=(n_groups, J + 1)).astype(np.float64)   # (stages, GPU + J DIMMs)
    device_load[groups, 1:] = load
    by_position = balancer._algorithm1(device_load, groups, group_of, 0, n_groups, *whole, A, False, on_gpu, home_dimm,
                                       move_fraction, max_moves)
    counts = np.zeros(n_groups * per_group, dtype=np.uint8)        # a replayed window's (N,) counts
    counts[ids] = A
    # by id, with the candidates as runs of a member list (each stage's run, out of order in the list)
    runs_of_group = [ids[(ids // per_group) == g] for g in groups]
    members = np.concatenate(runs_of_group[::-1])
    ptr = np.concatenate([[0], np.cumsum([len(r) for r in runs_of_group[::-1]])])
    runs = np.arange(len(groups))[::-1].astype(np.int64)
    by_id = balancer._algorithm1(device_load, groups, group_of, 0, n_groups, members, ptr, runs, counts, True, on_gpu, home_dimm,
                                 move_fraction, max_moves)
    for got in (by_position, by_id):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def _padded(bits: np.ndarray) -> np.ndarray:
    """A packed bitmap zero-padded to whole 64-bit words (what the simulator keeps)."""
    return np.concatenate([bits, np.zeros(-len(bits) % 8, dtype=np.uint8)])


@pytest.mark.parametrize("n", [800, 803])                          # whole words and a ragged tail
def test_recount_moved_from_rows_matches_numpy(n):
    rng = np.random.default_rng(2)
    n_tokens, K = 5, 40
    active = rng.random((n_tokens + 1, n)) < 0.3
    rows = np.packbits(active, axis=1)
    changed = _padded(np.bitwise_or.reduce(rows[1:] ^ rows[:-1], axis=0))
    base_key = rng.integers(0, K, n).astype(np.int16)
    key_of = base_key.copy()
    moved = rng.random(n) < 0.25
    key_of[moved] = (base_key[moved] + rng.integers(1, K, moved.sum())) % K       # away from their start
    got = np.zeros(n_tokens * K, dtype=np.int64)
    simulator._recount_moved_from_rows(got, rows, changed, _padded(np.packbits(moved)), int(moved.sum()), key_of,
                                       base_key, K)
    ids = np.flatnonzero(moved)
    step = np.diff(SequenceReplay.active_of(rows, ids).view(np.int8).astype(np.int64), axis=0)   # (n_tokens, m)
    want = np.zeros((n_tokens, K), dtype=np.int64)
    for t in range(n_tokens):
        np.add.at(want[t], key_of[ids], step[t])
        np.add.at(want[t], base_key[ids], -step[t])
    np.testing.assert_array_equal(got.reshape(n_tokens, K), want)


def test_trailing_zeros_and_moved_positions():
    import numba

    from ndpsched.jit import _register_overloads, trailing_zeros
    _register_overloads()
    compiled = numba.njit(lambda x: trailing_zeros(x))
    for b in (0, 1, 7, 8, 31, 32, 63):
        x = np.uint64(1) << np.uint64(b) | np.uint64(1) << np.uint64(63)
        assert trailing_zeros(x) == compiled(x) == b
    moved = np.zeros(100, dtype=bool)
    moved[[0, 9, 63, 64, 99]] = True
    ids = np.array([5, 99, 0, 64, 63, 63, 12], dtype=np.int64)
    np.testing.assert_array_equal(simulator._moved_positions(_padded(np.packbits(moved)), ids), [1, 2, 3, 4, 5])


def test_rekey_counts_moves_counts_and_tracks_moved_neurons():
    n, n_dev = 64, 3
    group_of = (np.arange(n) // 16).astype(np.int32)
    base_key = (group_of * n_dev + 1).astype(np.int16)            # every neuron starts on device 1
    key_of = base_key.copy()
    active = (np.arange(n) % 2).astype(np.uint8)                   # odd ids fire
    total = np.bincount(key_of, weights=active, minlength=4 * n_dev).astype(np.int64)
    moved_bits = np.zeros(8, dtype=np.uint8)

    def rekey(idx, dev, n_moved, packed=False):
        return simulator._rekey_counts(np.array(idx, dtype=np.int64), np.array(dev, dtype=np.int64), key_of,
                                       group_of[::16].copy(), 4, n_dev, packed,
                                       np.packbits(active) if packed else active[:0], active[:0] if packed else active,
                                       total, total, False, True, base_key, moved_bits, n_moved)

    n_moved = rekey([17, 2, 1, 33], [2, 2, 0, 1], 0)              # 33 stays where it started
    assert n_moved == 3
    np.testing.assert_array_equal(np.flatnonzero(np.unpackbits(moved_bits)), [1, 2, 17])
    np.testing.assert_array_equal(total, np.bincount(key_of, weights=active, minlength=4 * n_dev))
    # back home, and a new one: the counts follow, the first is no longer moved
    n_moved = rekey([1, 40], [1, 0], n_moved, packed=True)
    assert n_moved == 3 and key_of[1] == base_key[1]
    np.testing.assert_array_equal(np.flatnonzero(np.unpackbits(moved_bits)), [2, 17, 40])
    assert key_of[40] == group_of[40] * n_dev
    np.testing.assert_array_equal(total, np.bincount(key_of, weights=active, minlength=4 * n_dev))


def test_id_problem_flags_range_and_repeats_and_leaves_scratch_clean():
    bits = np.zeros(13, dtype=np.uint8)                            # 100 neurons
    for ids, want in (([3, 99, 0, 57], 0), ([3, 100], 1), ([-1], 1), ([5, 9, 5], 2), ([], 0), ([8, 9, 10, 11], 0)):
        assert simulator._id_problem(np.array(ids, dtype=np.int64), 100, bits) == want
        assert not bits.any()


@pytest.mark.parametrize("dims", [(4096, 11008), (8192, 28672), (48, 96), (5, 7)])
def test_group_blocks_give_every_neurons_group(dims):
    from ndpsched.policy import _block_shift, _neuron_tables
    from ndpsched.trace import NeuronLayout

    layout = NeuronLayout(3, *dims)
    group_of, _, _, _, blocks = _neuron_tables(layout, (10.0, 20.0))
    shift = _block_shift(layout)
    ids = np.arange(layout.n_neurons)
    np.testing.assert_array_equal(blocks[ids >> shift], group_of)


def test_over_tolerance_and_runs_of_match_numpy():
    rng = np.random.default_rng(7)
    load = rng.integers(0, 50, size=(40, 9)).astype(np.float64)
    load[::7, 1:] = 0.0                                            # idle stages
    load[3, 1:] = 5.0                                              # perfectly even
    for tol in (0.0, 0.05, 0.5):
        dimms = load[:, 1:]
        total = dimms.sum(axis=1)
        want = np.flatnonzero((total > 0) & (dimms.max(axis=1) * 8 > (1 + tol) * total))
        np.testing.assert_array_equal(balancer._over_tolerance(load, tol), want)
    members = np.arange(100, 160, dtype=np.intp)
    ptr = np.array([0, 10, 10, 35, 60], dtype=np.int64)            # an empty run
    groups = np.array([3, 1, 0], dtype=np.int64)
    np.testing.assert_array_equal(balancer._runs_of(members, ptr, groups),
                                  np.concatenate([members[ptr[g]: ptr[g + 1]] for g in groups]))
