"""Hot/cold partition policies.

- ``topk``, ``random``, ``none``: static baselines;
- ``powerinfer.topk``: PowerInfer's offline solver;
- ``hermes.ilp``: Hermes' offline ILP; ``hermes.adjust``: the ILP plus Hermes' online adjustment.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ndpsched.policy import PartitionMoves, PartitionPolicy, Placement, SchedContext, WindowActivity
from ndpsched.jit import kernel
from ndpsched.registry import register_policy


def fill_budget(order: np.ndarray, neuron_bytes: np.ndarray, budget_bytes: float) -> np.ndarray:
    """(N,) bool: take neurons in ``order`` while their cumulative bytes fit ``budget_bytes``."""
    on_gpu = np.zeros(len(neuron_bytes), dtype=bool)
    fits = np.cumsum(neuron_bytes[order]) <= budget_bytes
    on_gpu[order[fits]] = True
    return on_gpu


@dataclass(frozen=True)
class BudgetParams:
    #: fraction of the GPU budget to fill (1.0 = all of it)
    budget_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.budget_fraction <= 1:
            raise ValueError(f"budget_fraction must be in [0, 1], got {self.budget_fraction}")


@register_policy("partition", "topk")
class StaticTopK(PartitionPolicy):
    """Static frequency top-k: the most frequently active neurons, over all layers, fill the GPU.

    The benefit of a GPU copy is proportional to f_i x bytes_i and its cost to bytes_i, so the
    ranking is by offline frequency f_i alone. Never changes online.
    """

    Params = BudgetParams

    def _initial(self, ctx: SchedContext) -> np.ndarray:
        from ndpsched.content_cache import cached_array

        # (the order depends on the profile alone: a sweep worker sorts it once)
        order = cached_array("frequency order", (ctx.offline_freqs,), None,
                             lambda: np.argsort(-ctx.offline_freqs, kind="stable"))
        return fill_budget(order, ctx.neuron_bytes, ctx.gpu_budget_bytes * self.params.budget_fraction)


@register_policy("partition", "random")
class RandomPartition(PartitionPolicy):
    """Random neurons fill the GPU budget (the 'random placement' step of Hermes' ablation)."""

    Params = BudgetParams

    def _initial(self, ctx: SchedContext) -> np.ndarray:
        order = ctx.rng.permutation(ctx.n_neurons)
        return fill_budget(order, ctx.neuron_bytes, ctx.gpu_budget_bytes * self.params.budget_fraction)


@register_policy("partition", "none")
class NoGpuNeurons(PartitionPolicy):
    """Nothing hot: every QKV/FFN neuron is computed on the DIMMs (a dense-NDP reference)."""

    def _initial(self, ctx: SchedContext) -> np.ndarray:
        return np.zeros(ctx.n_neurons, dtype=bool)


@register_policy("partition", "hermes.ilp")
class HermesIlp(PartitionPolicy):
    """Hermes' offline ILP (Eqs. 1-7): minimise the sum over stages of max(GPU, slowest DIMM)
    under the GPU (and DIMM) capacity, on frequency buckets, solved with HiGHS.

    Never changes online (``hermes.adjust`` adds the online adjustment). ``info`` holds the
    solve time, objective and optimality gap of the last solve.
    """

    @dataclass(frozen=True)
    class Params:
        #: neurons of a stage are grouped into this many frequency buckets (PowerInfer groups
        #: 64-256 neurons). 16 buckets solve llama2-70b in ~3 s with a 0.004 % gap here; 32 give
        #: the same objective to 5 digits but take HiGHS ~12 s to prove
        buckets_per_stage: int = 16
        #: model every DIMM explicitly (Hermes' exact form) instead of an evenly spread pool
        per_dimm: bool = False
        mip_rel_gap: float = 0.01
        time_limit_s: float = 60.0

        def __post_init__(self) -> None:
            if self.buckets_per_stage < 1:
                raise ValueError(f"buckets_per_stage must be >= 1, got {self.buckets_per_stage}")
            if not 0 <= self.mip_rel_gap < 1:
                raise ValueError(f"mip_rel_gap must be in [0, 1), got {self.mip_rel_gap}")

    def _initial(self, ctx: SchedContext) -> np.ndarray:
        from .ilp import solve_hermes_ilp

        p = self.params
        res = solve_hermes_ilp(ctx, p.buckets_per_stage, p.per_dimm, p.mip_rel_gap, p.time_limit_s)
        self.info = {"solve_s": res.solve_s, "objective_s": res.objective_s, "mip_gap": res.mip_gap,
                     "n_variables": res.n_variables, "status": res.status}
        return res.on_gpu


@register_policy("partition", "powerinfer.topk")
class PowerInferTopK(PartitionPolicy):
    """PowerInfer's offline solver: maximise the activation frequency placed on the GPU under the
    VRAM budget; a stage gets either no GPU neurons or enough that their saving pays for its
    syncs (the per-layer minimum). Solved as an ILP on frequency buckets as the paper describes
    (GLPK there, HiGHS here); PowerInfer's released code does the same greedily per layer.
    """

    @dataclass(frozen=True)
    class Params:
        buckets_per_stage: int = 32
        mip_rel_gap: float = 0.005
        time_limit_s: float = 60.0

        def __post_init__(self) -> None:
            if self.buckets_per_stage < 1:
                raise ValueError(f"buckets_per_stage must be >= 1, got {self.buckets_per_stage}")

    def _initial(self, ctx: SchedContext) -> np.ndarray:
        from .ilp import solve_powerinfer_ilp

        p = self.params
        res = solve_powerinfer_ilp(ctx, p.buckets_per_stage, p.mip_rel_gap, p.time_limit_s)
        self.info = {"solve_s": res.solve_s, "objective": res.objective_s, "mip_gap": res.mip_gap,
                     "n_variables": res.n_variables, "status": res.status}
        return res.on_gpu


@register_policy("partition", "hermes.adjust")
class HermesAdjust(HermesIlp):
    """Hermes' online hot/cold adjustment on top of the offline ILP.

    Every neuron has a 4-bit saturating state (+4 when it fires, -1 when not, initialised from its
    prefill frequency); a cold neuron whose state exceeds ``hot_threshold`` (T_h = 10) is hot and
    is copied to the GPU during the projection, overwriting the GPU-resident neuron of the same
    stage with the lowest state (weights stay in the DIMMs: no write-back). Decisions once per
    window. With ``hide_copies`` a stage copies at most what PCIe moves during one projection
    (the paper hides copies there; chosen so they never stall the layer), else all swaps happen
    and the execution model exposes what does not fit.

    Candidates (chosen; the paper does not say how the hardware finds them): the cold neurons
    that turned on since the last decision, plus the still-hot ones the last decision had no room
    for; the best-state candidates of a stage replace its lowest-state GPU neurons, ties broken
    by neuron id on both sides. On a replayed sequence the states come from the replay memo
    (see :class:`~ndpsched.replay.WindowMemo`), with identical decisions.
    """

    observes_tokens = True

    @dataclass(frozen=True)
    class Params(HermesIlp.Params):
        #: T_h: a neuron with state above this is hot (Hermes: 10)
        hot_threshold: int = 10
        #: counter increment when a neuron fires / decrement when it does not (Hermes: +4 / -1)
        state_inc: int = 4
        state_dec: int = 1
        #: cap promotions per stage to what PCIe copies within one projection
        hide_copies: bool = True
        #: multiplier of that cap (1.0: the paper's hidden copies; 0: no promotions this window;
        #: above 1 some copies are exposed). Ignored when ``hide_copies`` is False.
        promote_scale: float = 1.0

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 0 <= self.hot_threshold <= 15:
                raise ValueError(f"hot_threshold must be in 0..15, got {self.hot_threshold}")
            if self.state_inc < 0 or self.state_dec < 0:
                raise ValueError("state_inc and state_dec must be >= 0")
            if self.promote_scale < 0:
                raise ValueError(f"promote_scale must be >= 0, got {self.promote_scale}")

    def start(self, active: np.ndarray, token: int) -> None:
        from .fsm import SaturatingStates, initial_states

        ctx, p = self.ctx, self.params
        # the state table and active ids a batch starts from, kept per prefill profile: episodes on
        # a pool of sequences start from a few profiles over and over (the simulator keeps each
        # profile as one array per batch, so its identity names it; the entry holds the array to
        # keep it so) and, for it, per start token and active set (checked equal: one pass)
        cache = self.__dict__.setdefault("_starts", {})
        key = (id(ctx.prefill_freqs), token, p.state_inc, p.state_dec)
        entry = cache.get(key)
        # (a read-only active set is the simulator's shared start for the batch: kept, not copied,
        # and then recognised by identity)
        if entry is None or entry[0] is not ctx.prefill_freqs or not (entry[1] is active or np.array_equal(entry[1], active)):
            if len(cache) >= 16:
                cache.pop(next(iter(cache)))
            fired = np.flatnonzero(active > 0)
            fired.flags.writeable = False
            states = SaturatingStates(initial_states(ctx.prefill_freqs).astype(np.uint8), active, token,
                                      p.state_inc, p.state_dec)
            entry = cache[key] = (ctx.prefill_freqs, active if not active.flags.writeable else active.copy(), states, fired)
        # the cached start states, shared until this run changes them (replayed windows read their
        # states from the memo and never do: the 4-byte-a-neuron copy was a third of a reset)
        self.states, self._states_shared = entry[2], True
        # tokens observed since the state words were brought up to date (see _state_lookup)
        self._pending: list[tuple[int, np.ndarray, np.ndarray]] = []
        # (token, (N,) states, window) when a replay memo answered and the words were left behind
        self._behind: tuple | None = None
        # neurons that turned on since the last pool was built (first: the prompt's active set),
        # the first token they were observed at (None while the prompt's set is among them), and
        # the still-hot candidates the last decision had no room for
        self._turned_on = [entry[3]]
        self._turned_on_from: int | None = None
        self._leftover = np.zeros(0, dtype=np.int32)
        self._pool: _MaskPool | _MemoPool | None = None   # the last pool built (see _candidate_pool)
        # see _hot_ids; the last run's start set is checked first (runs start from one placement)
        self._hot: np.ndarray | None = self.__dict__.get("_start_hot")
        self._run_start = True
        self._hot_checked_at: int | None = None      # the window end _hot was last checked at
        # (placement, its change count, its last change) under which _hot holds (see _hot_ids)
        self._hot_mark: tuple | None = None
        self.promotions = 0

    def observe(self, token: int, on: np.ndarray, off: np.ndarray) -> None:
        self._pending.append((token, on, off))
        if not self._turned_on:
            self._turned_on_from = token
        self._turned_on.append(on)

    def observe_window(self, token: int, ons: list[np.ndarray], offs: list[np.ndarray]) -> None:
        self._pending.extend(zip(range(token, token + len(ons)), ons, offs))
        if not self._turned_on:
            self._turned_on_from = token
        self._turned_on.extend(ons)

    def _memo_key(self, what: str) -> tuple:
        return ("hermes.adjust", what, self.params.state_inc, self.params.state_dec)

    def _state_lookup(self, window: WindowActivity):
        """A function giving the FSM states of neuron ids after the window's last token, and the
        (N,) uint8 states of all neurons then if a replay memo holds them (else None).

        The states depend on the sequence's activity alone, so where the window belongs to a
        replayed sequence they are kept in its memo from the second visit on, and an episode
        replaying it reads them without updating the per-neuron words token by token.
        Otherwise the observed tokens' toggles are applied to the words (O(toggles))."""
        now, memo = window.t1 - 1, window.memo
        key = self._memo_key("states")
        dense = memo.get(key) if memo is not None else None
        if dense is not None:
            self._pending.clear()
            self._behind = (now, dense, window)
            return dense.take, dense
        self._catch_up()
        if memo is not None and memo.visits > 1:
            dense = self.states.all_states(now)
            memo.put(key, dense)
            return dense.take, dense
        return functools.partial(self.states.states, token=now), None

    def _catch_up(self) -> None:
        """Bring the state words up to the last observed token."""
        from .fsm import SaturatingStates

        if self._behind is not None:
            token, dense, window = self._behind
            if self._states_shared:              # new words: the shared ones need no copy
                self.states = copy.copy(self.states)
                self._states_shared = False
            self.states.word = SaturatingStates.pack(dense, window.active > 0, token)
            self._behind = None
        if self._pending and self._states_shared:
            self.states, self._states_shared = self.states.copy(), False
        for token, on, off in self._pending:
            self.states.toggle(on, off, token)
        self._pending.clear()

    def _candidate_pool(self, placement: Placement, window: WindowActivity) -> _MaskPool | _MemoPool:
        """The next decision's candidates: cold neurons that turned on since the last decision (or
        were left over by it), with their FSM states at the window's end. Kept for the window, so
        an observer (the HotCold env) and the decision at the same window end share it; a pool no
        decision consumed carries over into the next one.

        Where the window is replayed (see :class:`~ndpsched.replay.WindowMemo`) and the pool holds
        just its own tokens' turn-ons (the last pool was consumed), the pool is the memo's sorted
        window set minus what is on the GPU, plus the leftovers: O(GPU neurons + leftovers) per
        decision instead of O(neurons)."""
        pool = self._pool
        if pool is not None and pool.t1 == window.t1:
            return pool
        carried = pool.members() if pool is not None and not pool.consumed else None
        turned_on, from_token, leftover = self._turned_on, self._turned_on_from, self._leftover
        self._turned_on, self._leftover = [], self._leftover[:0]
        states, dense = self._state_lookup(window)
        layout = self.ctx.layout
        if carried is None and from_token in (window.t0, None) and dense is not None:
            # (the first pool of a run also holds the prompt's active set: the same for every
            # episode on the sequence, so it is kept under a key of its own)
            window_set = self._window_set(window, turned_on, dense,
                                          "window set" if from_token is not None else "window set from prompt")
            if window_set is not None:
                self._pool = _MemoPool(window.t1, window_set, dense, leftover, placement.on_gpu,
                                       self._hot_ids(placement, window.t1), self.ctx.group_blocks,
                                       self.ctx.group_shift)
                return self._pool
        mask = carried if carried is not None else np.zeros(self.ctx.n_neurons, dtype=bool)
        for ids in turned_on:
            mask[ids] = True
        mask[leftover] = True
        self._pool = _MaskPool(window.t1, mask, placement.on_gpu, states, layout.group_starts())
        return self._pool

    def _window_set(self, window: WindowActivity, turned_on: list[np.ndarray], dense: np.ndarray, what: str):
        """The window's turn-ons sorted by (stage, 15 - state at its end, id) as a :class:`_WindowSet`,
        from the replay memo under ``what`` (built on the second visit), or None where the memo
        has no room."""
        memo, key = window.memo, self._memo_key(what)
        window_set = memo.get(key)
        if window_set is None:
            if memo.visits < 2:
                return None
            mask = np.zeros(self.ctx.n_neurons, dtype=bool)
            for ids in turned_on:
                mask[ids] = True
            ids = np.flatnonzero(mask)
            n_stage = self.ctx.layout.n_groups
            cell = _cells(self.ctx.group_of, dense, ids).astype(_cell_dtype(n_stage))
            order = np.argsort(cell, kind="stable")              # ids stay by id within a cell
            starts = np.concatenate([[0], np.cumsum(np.bincount(cell, minlength=n_stage * 16))])
            memo.put(key, _WindowSet(ids.take(order).astype(np.int32), cell.take(order), starts, np.packbits(mask)))
            window_set = memo.get(key)        # None past the replay budget: pools are built by mask
        return window_set

    def candidate_state_histogram(self, placement: Placement, window: WindowActivity) -> np.ndarray:
        """(16,) how many candidates of the next decision (cold neurons that turned on since the
        last one) are in each FSM state at the window's end."""
        return self._candidate_pool(placement, window).state_totals[::-1].copy()

    def _hot_ids(self, placement: Placement, t1: int) -> np.ndarray:
        """Ids of the GPU-resident neurons, by id: the set this policy's last moves left, if the
        placement still has exactly it, else a scan. It does when the run applied exactly those
        moves since (the placement counts the changes applied to it and keeps the last); else a
        count and a gather check it, once per window end ``t1`` (moves come between windows)."""
        hot, mark = self._hot, self._hot_mark
        if hot is not None and (self._hot_checked_at == t1 or (
                mark is not None and mark[0] is placement and placement.hot_changes == mark[1]
                and placement.last_hot_change is mark[2])):
            self._hot_checked_at = t1
            return hot
        on_gpu = placement.on_gpu
        if hot is None or len(hot) != np.count_nonzero(on_gpu) or not on_gpu.take(hot).all():
            hot = self._hot = np.flatnonzero(on_gpu).astype(np.int32)
            if self._run_start:
                self._start_hot = hot
        self._run_start = False
        self._hot_checked_at = t1
        self._hot_mark = (placement, placement.hot_changes, placement.last_hot_change)
        return hot

    def _promotion_cap(self, promote_scale: float) -> np.ndarray:
        """(G,) int64 promotions per stage whose PCIe copies one projection hides (half of its
        time each way), times ``promote_scale``; kept per scale (the same at every decision)."""
        ctx = self.ctx
        caps = self.__dict__.get("_caps")
        if caps is None or caps[0] is not ctx:                 # (a policy may be bound to a new context)
            caps = self._caps = (ctx, {})
        cap = caps[1].get(promote_scale)
        if cap is None:
            cm = ctx.cost
            per_layer = cm.projection_s(ctx.batch) * cm.pcie_bw              # bytes hidden per layer
            kind = np.arange(ctx.layout.n_groups) % 2
            cap = caps[1][promote_scale] = np.floor(promote_scale * per_layer / 2 / cm.neuron_bytes[kind]).astype(np.int64)
        return cap

    def _update(self, window: WindowActivity, placement: Placement) -> PartitionMoves | None:
        ctx, p = self.ctx, self.params
        pool = self._candidate_pool(placement, window)
        hot = self._hot_ids(placement, window.t1)
        if len(hot) == 0 or not pool.state_totals[:15 - p.hot_threshold].any():
            return None                      # nothing decided: the pool carries over
        pool.consumed = True
        n_stage = ctx.layout.n_groups
        # candidates with states above T_h by stage, highest state first, ties by neuron id; with
        # hidden copies a stage promotes at most ``cap`` and keeps 2 x cap leftovers, so only its
        # first 3 x cap candidates are ranked
        cap = self._promotion_cap(p.promote_scale) if p.hide_copies else None
        cand, c_key = pool.ranked(15 - p.hot_threshold, None if cap is None else 3 * cap)
        # each stage's candidates meet its GPU neurons by lowest state first (ties by id): a
        # candidate with a higher state than its partner swaps with it (one compiled pass)
        promote, evict, self._leftover, self._hot = _pair_swaps(
            np.asarray(cand, dtype=np.int32), np.asarray(c_key, dtype=np.int32), hot,
            pool.hot_state if pool.hot is hot else pool.states(hot), ctx.layout.group_starts(),
            cap if cap is not None else np.zeros(n_stage, dtype=np.int64), cap is not None)
        self._hot_checked_at = None                  # the moves are not applied yet
        if len(promote) == 0:
            return None
        self.promotions += len(promote)
        moves = PartitionMoves(promote, evict)
        # the GPU set is self._hot once the run has applied exactly these moves
        self._hot_mark = (placement, placement.hot_changes + 1, moves)
        return moves


@kernel
def _pair_swaps(cand, c_key, hot, hot_state, group_starts, cap, has_cap):
    """Hermes' swap rule, one stage after another: ``cand`` (int32 ids) ranked by their cells
    ``c_key`` (stage * 16 + 15 - state, then id), ``hot`` the GPU neurons by id with their states.
    The r-th candidate of a stage swaps with the stage's r-th lowest-state GPU neuron (ties by
    id) if its state is higher (and, with ``has_cap``, r < ``cap[stage]``); the others ranked
    below 3 x cap (all without a cap) are left over for the next window.

    Returns (promoted ids, evicted ids (pairwise), leftover ids, the GPU set after the swaps by id)."""
    n_stage, n_hot, nc = len(group_starts) - 1, len(hot), len(cand)
    e_first = np.searchsorted(hot, group_starts)       # each stage's GPU neurons are a run of ``hot``
    c_first = np.zeros(n_stage + 1, np.int64)          # and its candidates a run of ``cand``
    for i in range(nc):
        c_first[(c_key[i] >> 4) + 1] += 1
    for s in range(n_stage):
        c_first[s + 1] += c_first[s]
    e_order = np.empty(n_hot, np.int32)
    count = np.empty(4 * 17, np.int64)
    promote = np.empty(nc, np.int32)
    evicted_at = np.empty(nc, np.int32)
    leftover = np.empty(nc, np.int32)
    n_swap = n_left = 0
    for s in range(n_stage):
        a, b, c0, c1 = e_first[s], e_first[s + 1], c_first[s], c_first[s + 1]
        n_paired = min(b - a, c1 - c0)
        if has_cap:
            n_paired = min(n_paired, cap[s])
        k = 0                                          # the stage's candidates swapped
        if n_paired > 0:
            # its n_paired lowest (state, id) GPU neurons, by a counting sort that places only the
            # states below the highest one needed and the first ids of that one. Most GPU neurons
            # share one state: four interleaved histograms, so that an increment does not wait for
            # the last one's store
            count[:] = 0
            i = a
            while i + 4 <= b:
                count[hot_state[i] + 1] += 1
                count[17 + hot_state[i + 1] + 1] += 1
                count[34 + hot_state[i + 2] + 1] += 1
                count[51 + hot_state[i + 3] + 1] += 1
                i += 4
            while i < b:
                count[hot_state[i] + 1] += 1
                i += 1
            for v in range(1, 17):
                count[v] += count[17 + v] + count[34 + v] + count[51 + v]
            for v in range(16):
                count[v + 1] += count[v]
            last = 0                                   # the highest state needed
            while count[last + 1] < n_paired:
                last += 1
            for i in range(a, b):
                v = hot_state[i]
                if v <= last and count[v] < n_paired:
                    e_order[a + count[v]] = i
                    count[v] += 1
            # candidates by decreasing state meet partners by increasing state: after the first
            # pair that does not swap, none does
            while k < n_paired:
                e = e_order[a + k]
                if 15 - (c_key[c0 + k] & 15) <= hot_state[e]:
                    break
                promote[n_swap] = cand[c0 + k]
                evicted_at[n_swap] = e
                n_swap += 1
                k += 1
        end = min(c1, c0 + 3 * cap[s]) if has_cap else c1
        for i in range(c0 + k, end):
            leftover[n_left] = cand[i]
            n_left += 1
    # the GPU set after the swaps: the kept ids merged with the promoted ones (a few per stage,
    # sorted by an insertion sort within each stage's run); an evicted id is written and then
    # overwritten (no branch on it: the swaps are a small random part of the set)
    gone = np.zeros(n_hot, np.uint8)
    for k in range(n_swap):
        gone[evicted_at[k]] = 1
    added = promote[:n_swap].copy()
    for k in range(1, n_swap):
        v = added[k]
        j = k
        while j > 0 and added[j - 1] > v:
            added[j] = added[j - 1]
            j -= 1
        added[j] = v
    new_hot = np.empty(n_hot + 1, np.int32)         # (a swap keeps the count; +1: the last write)
    a = n = 0
    for h in range(n_hot):
        x = hot[h]
        while a < n_swap and added[a] < x:
            new_hot[n] = added[a]
            a += 1
            n += 1
        new_hot[n] = x
        n += 1 - gone[h]
    while a < n_swap:
        new_hot[n] = added[a]
        a += 1
        n += 1
    evicted = np.empty(n_swap, np.int32)
    for k in range(n_swap):
        evicted[k] = hot[evicted_at[k]]
    return promote[:n_swap].copy(), evicted, leftover[:n_left].copy(), new_hot[:n_hot]


class _WindowSet(NamedTuple):
    """A replayed window's turn-ons (placement-independent, kept in its memo)."""
    #: (M,) int32 ids, sorted by cell then id
    ids: np.ndarray
    #: (M,) their cells ``stage * 16 + 15 - state`` (state at the window's end)
    cells: np.ndarray
    #: (G * 16 + 1,) where each cell's run starts in ``ids``
    starts: np.ndarray
    #: (N / 8,) uint8 packed membership bits
    bits: np.ndarray


def _cell_dtype(n_stage: int) -> type:
    """dtype of (stage, 15 - state) cell keys: 16 bits where they fit (numpy's stable argsort then
    runs as a radix sort)."""
    return np.uint16 if n_stage * 16 <= 2**16 else np.int64


def _cells(group_of: np.ndarray, states: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """int32 cell keys ``stage * 16 + 15 - state`` of neurons ``ids`` ((N,) ``states``)."""
    return group_of.take(ids) * 16 + (15 - states.take(ids).astype(np.int32))


def _stage_counts(ids: np.ndarray, group_starts: np.ndarray) -> np.ndarray:
    """(G,) count of sorted ``ids`` in each stage (a stage's neurons are consecutive ids)."""
    return np.diff(np.searchsorted(ids, group_starts))


class _MaskPool:
    """Promotion candidates given by a membership mask (the general case): every cold member is
    ranked. ``cells`` is (G, 16) candidates per (stage, 15 - state), ``state_totals`` (16,) its
    column sums."""

    #: the GPU set whose states ``hot_state`` holds (a memo pool keeps them; this one does not)
    hot, hot_state = None, None

    def __init__(self, t1: int, mask: np.ndarray, on_gpu: np.ndarray, states, group_starts: np.ndarray) -> None:
        self.t1, self.mask, self.states, self.consumed = t1, mask, states, False
        self.ids = np.flatnonzero(mask > on_gpu)
        # the ids are sorted, so their stages are runs; 16-bit keys let numpy's stable argsort run
        # as a radix sort
        n_stage = len(group_starts) - 1
        key_dtype = _cell_dtype(n_stage)
        self.key = (np.repeat(np.arange(n_stage, dtype=key_dtype) * 16, _stage_counts(self.ids, group_starts))
                    + (15 - states(self.ids)).astype(key_dtype))
        self.cells = np.bincount(self.key, minlength=n_stage * 16).reshape(n_stage, 16)
        self.state_totals = self.cells.sum(axis=0)      # (16,) candidates per 15 - state

    def members(self) -> np.ndarray:
        """(N,) bool: the pool, to carry into the next one (hot members included)."""
        return self.mask

    def ranked(self, n_cols: int, limit: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Candidates in the first ``n_cols`` cells of each stage (states above 15 - n_cols) by
        (cell, id), with their cells. ``limit``: (G,) how many of each stage's first are needed
        (whole cells past them are dropped before the sort; the rest are returned)."""
        n_stage = self.cells.shape[0]
        usable = np.broadcast_to(np.arange(16) < n_cols, (n_stage, 16))
        if limit is not None:
            cell_count = self.cells * usable
            usable = usable & (np.cumsum(cell_count, axis=1) - cell_count < limit[:, None])
        sel = np.flatnonzero(usable.ravel().take(self.key))
        order = sel.take(np.argsort(self.key.take(sel), kind="stable"))
        return self.ids.take(order), self.key.take(order)


class _MemoPool:
    """Promotion candidates of a replayed window whose pool is its own turn-ons plus leftovers:
    the memo's window set, sorted once by (cell, id), minus the GPU-resident neurons. Work per
    decision: O(GPU neurons + leftovers + what is ranked), none over all neurons."""

    def __init__(self, t1: int, window_set: _WindowSet, dense: np.ndarray, leftover: np.ndarray,
                 on_gpu: np.ndarray, hot: np.ndarray, group_blocks: np.ndarray, group_shift: int) -> None:
        self.t1, self.window_set, self.on_gpu, self.consumed = t1, window_set, on_gpu, False
        self.n_stage = (len(window_set.starts) - 1) // 16
        self.states = dense.take
        self.leftover, self.leftover_cell, self.state_totals, self.hot_state = _memo_pool_cells(
            window_set.bits, window_set.starts, hot, group_blocks, group_shift, dense,
            np.asarray(leftover, dtype=np.int32), on_gpu)
        self.hot = hot

    def members(self) -> np.ndarray:
        mask = np.zeros(len(self.on_gpu), dtype=bool)
        mask[self.window_set.ids] = True
        mask[self.leftover] = True
        return mask

    def ranked(self, n_cols: int, limit: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`_MaskPool.ranked`, but with ``limit`` exactly each stage's first ``limit``
        are returned: its window-set run (cold ones only) merged with its leftovers."""
        n_stage = self.n_stage
        ws = self.window_set
        return _memo_ranked(ws.ids, ws.cells, ws.starts, self.on_gpu, self.leftover, self.leftover_cell, n_stage,
                            n_cols, limit if limit is not None else np.zeros(n_stage, dtype=np.int64), limit is not None)


@kernel
def _memo_pool_cells(bits, starts, hot, group_blocks, group_shift, dense, leftover, on_gpu):
    """A replayed window's pool: (leftovers still candidates, their cells, (16,) candidates per
    15 - state over the stages, the GPU neurons' states). Candidates are the window set (packed
    ``bits``, ``starts`` of its cell runs) less the GPU neurons ``hot``, plus the leftovers that
    are cold and not in the set. A neuron's stage is ``group_blocks[id >> group_shift]`` (see
    SchedContext).

    The loops are kept free of data-dependent branches and of chains of increments of one counter
    (most GPU neurons share a state): each a few cycles per neuron."""
    n_cells, n_hot = len(starts) - 1, len(hot)
    hot_state = np.empty(n_hot, np.uint8)
    for k in range(n_hot):
        hot_state[k] = dense[hot[k]]
    removed = np.zeros(64, np.int64)                    # GPU neurons in the set: four counts per state
    for k in range(n_hot):
        h = hot[k]
        removed[((k & 3) << 4) + 15 - hot_state[k]] += (bits[h >> 3] >> (7 - (h & 7))) & 1
    totals = np.zeros(16, np.int64)
    for c in range(n_cells):
        totals[c & 15] += starts[c + 1] - starts[c]
    for c in range(16):
        totals[c] -= removed[c] + removed[16 + c] + removed[32 + c] + removed[48 + c]
    kept = np.empty(len(leftover), np.int32)
    kept_cell = np.empty(len(leftover), np.int32)
    n = 0
    for i in leftover:
        if not on_gpu[i] and not (bits[i >> 3] >> (7 - (i & 7))) & 1:
            stage = group_blocks[i >> group_shift]
            kept[n] = i
            kept_cell[n] = stage * 16 + 15 - dense[i]
            totals[15 - dense[i]] += 1
            n += 1
    return kept[:n].copy(), kept_cell[:n].copy(), totals, hot_state


@kernel
def _memo_ranked(ws_ids, ws_cells, starts, on_gpu, leftover, leftover_cell, n_stage, n_cols, limit, has_limit):
    """Per stage, its candidates in cells s * 16 + (0 .. n_cols - 1) by (cell, id): the cold ids
    of the window set's runs merged with the leftovers (with ``has_limit``, the first
    ``limit[s]`` of them). Returns (ids, cells)."""
    # leftovers by (cell, id): a counting sort by cell, then an insertion sort of each cell's few
    # ids (a general sort of a few thousand keys costs more than the rest of the ranking)
    n_left, n_cells = len(leftover), len(starts) - 1
    at = np.zeros(n_cells + 1, np.int64)
    for c in leftover_cell:
        at[c + 1] += 1
    for c in range(n_cells):
        at[c + 1] += at[c]
    begin = at.copy()
    l_ids = np.empty(n_left, np.int32)
    l_cell = np.empty(n_left, np.int32)
    for i in range(n_left):
        c = leftover_cell[i]
        k = at[c]
        at[c] += 1
        while k > begin[c] and l_ids[k - 1] > leftover[i]:
            l_ids[k], l_cell[k] = l_ids[k - 1], c
            k -= 1
        l_ids[k], l_cell[k] = leftover[i], c
    size = n_left + (limit.sum() if has_limit else starts[-1])
    out_ids = np.empty(size, np.int32)
    out_cell = np.empty(size, np.int32)
    n = q = 0
    for s in range(n_stage):
        first, end = s * 16, s * 16 + n_cols
        p, p_end = starts[first], starts[end]
        while q < n_left and l_cell[q] < first:
            q += 1
        budget = limit[s] if has_limit else starts[-1] + n_left
        while budget > 0:
            while p < p_end and on_gpu[ws_ids[p]]:
                p += 1
            have_p, have_q = p < p_end, q < n_left and l_cell[q] < end
            if not have_p and not have_q:
                break
            if have_p and (not have_q or ws_cells[p] < l_cell[q] or (ws_cells[p] == l_cell[q] and ws_ids[p] < l_ids[q])):
                out_ids[n], out_cell[n] = ws_ids[p], ws_cells[p]
                p += 1
            else:
                out_ids[n], out_cell[n] = l_ids[q], l_cell[q]
                q += 1
            n += 1
            budget -= 1
    return out_ids[:n].copy(), out_cell[:n].copy()
