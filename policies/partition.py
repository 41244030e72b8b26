"""Hot/cold partition policies.

- ``topk``, ``random``, ``none``: static baselines;
- ``powerinfer.topk``: PowerInfer's offline solver;
- ``hermes.ilp``: Hermes' offline ILP; ``hermes.adjust``: the ILP plus Hermes' online adjustment.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ndpsched.policy import PartitionMoves, PartitionPolicy, Placement, SchedContext, WindowActivity
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

        ctx = self.ctx
        if getattr(self, "_initial_for", None) is not ctx.prefill_freqs:    # episodes share it
            self._initial_for, self._initial_states = ctx.prefill_freqs, initial_states(ctx.prefill_freqs)
        self.states = SaturatingStates(self._initial_states, active > 0, token,
                                       self.params.state_inc, self.params.state_dec)
        # tokens observed since the state words were brought up to date (see _state_lookup)
        self._pending: list[tuple[int, np.ndarray, np.ndarray]] = []
        # (token, (N,) states, window) when a replay memo answered and the words were left behind
        self._behind: tuple | None = None
        # neurons that turned on since the last pool was built (first: the prompt's active set),
        # the first token they were observed at (None while the prompt's set is among them), and
        # the still-hot candidates the last decision had no room for
        self._turned_on = [np.flatnonzero(active > 0)]
        self._turned_on_from: int | None = None
        self._leftover = np.zeros(0, dtype=np.intp)
        self._pool: _MaskPool | _MemoPool | None = None   # the last pool built (see _candidate_pool)
        self._hot: np.ndarray | None = None          # see _hot_ids
        self.promotions = 0

    def observe(self, token: int, on: np.ndarray, off: np.ndarray) -> None:
        self._pending.append((token, on, off))
        if not self._turned_on:
            self._turned_on_from = token
        self._turned_on.append(on)

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
            self.states.word = SaturatingStates.pack(dense, window.active > 0, token)
            self._behind = None
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
        if carried is None and from_token == window.t0 and dense is not None:
            window_set = self._window_set(window, turned_on, dense)
            if window_set is not None:
                self._pool = _MemoPool(window.t1, window_set, dense, leftover, placement.on_gpu,
                                       self._hot_ids(placement.on_gpu), self.ctx.group_of, layout.n_groups)
                return self._pool
        mask = carried if carried is not None else np.zeros(self.ctx.n_neurons, dtype=bool)
        for ids in turned_on:
            mask[ids] = True
        mask[leftover] = True
        self._pool = _MaskPool(window.t1, mask, placement.on_gpu, states, layout.group_starts())
        return self._pool

    def _window_set(self, window: WindowActivity, turned_on: list[np.ndarray], dense: np.ndarray):
        """The window's turn-ons sorted by (stage, 15 - state at its end, id) as a :class:`_WindowSet`,
        from the replay memo (built on the second visit), or None where the memo has no room."""
        memo, key = window.memo, self._memo_key("window set")
        names = ("ids", "cells", "starts", "bits")
        arrays = [memo.get(key + (name,)) for name in names]
        if any(a is None for a in arrays):
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
            arrays = [ids.take(order).astype(np.int32), cell.take(order), starts, np.packbits(mask)]
            for name, a in zip(names, arrays):
                memo.put(key + (name,), a)
            if any(memo.get(key + (name,)) is None for name in names):
                return None                   # past the replay budget: build pools by mask
        return _WindowSet(*arrays)

    def candidate_state_histogram(self, placement: Placement, window: WindowActivity) -> np.ndarray:
        """(16,) how many candidates of the next decision (cold neurons that turned on since the
        last one) are in each FSM state at the window's end."""
        return self._candidate_pool(placement, window).cells.sum(axis=0)[::-1]

    def _hot_ids(self, on_gpu: np.ndarray) -> np.ndarray:
        """Ids of the GPU-resident neurons, by id: the set this policy's last moves left, if the
        placement still has exactly it (a count and a gather), else a scan."""
        hot = self._hot
        if hot is None or len(hot) != np.count_nonzero(on_gpu) or not on_gpu.take(hot).all():
            hot = self._hot = np.flatnonzero(on_gpu)
        return hot

    def _update(self, window: WindowActivity, placement: Placement) -> PartitionMoves | None:
        ctx, p = self.ctx, self.params
        pool = self._candidate_pool(placement, window)
        cells = pool.cells
        hot = self._hot_ids(placement.on_gpu)
        if len(hot) == 0 or not cells[:, :15 - p.hot_threshold].any():
            return None                      # nothing decided: the pool carries over
        pool.consumed = True
        n_stage = ctx.layout.n_groups
        # candidates by stage, highest state first; evictees by stage, lowest state first, ties by
        # neuron id on both sides
        key_dtype = _cell_dtype(n_stage)
        stage16 = np.arange(n_stage, dtype=key_dtype) * 16
        # cells (stage, 15 - state) that can promote: states above T_h and, with hidden copies,
        # only the first 3 x cap candidates of a stage (it promotes at most cap and keeps 2 x cap
        # leftovers), so whole cells past them are dropped before the ranking
        usable = np.broadcast_to(np.arange(16) < 15 - p.hot_threshold, (n_stage, 16))
        cap = None
        if p.hide_copies:
            cm = ctx.cost
            per_layer = cm.projection_s(ctx.batch) * cm.pcie_bw              # bytes hidden per layer
            cap = np.floor(p.promote_scale * per_layer / 2 / cm.neuron_bytes[np.arange(n_stage) % 2]).astype(np.int64)
            cell_count = cells * usable
            usable = usable & (np.cumsum(cell_count, axis=1) - cell_count < 3 * cap[:, None])
        cand, c_key = pool.ranked(usable, None if cap is None else 3 * cap)
        c_stage, cand_state = np.divmod(c_key, 16)
        cand_state = 15 - cand_state
        hot_state = pool.states(hot)
        e_count = _stage_counts(hot, ctx.layout.group_starts())
        e_order = np.argsort(np.repeat(stage16, e_count) + hot_state.astype(key_dtype), kind="stable")
        hot_state = hot_state.take(e_order)
        c_count = np.bincount(c_stage, minlength=n_stage)
        c_rank = np.arange(len(cand)) - (np.cumsum(c_count) - c_count).take(c_stage)
        e_first = np.cumsum(e_count) - e_count
        pair = c_rank < e_count.take(c_stage)
        e_idx = np.where(pair, e_first.take(c_stage) + c_rank, 0)
        swap = pair & (cand_state > hot_state.take(e_idx))
        if cap is not None:
            c_cap = cap.take(c_stage)
            swap &= c_rank < c_cap
            # candidates still hot are re-examined next window even without a new toggle; a
            # stage can take at most ``cap`` per window, so its best 2 x cap leftovers suffice
            self._leftover = cand[~swap & (c_rank < 3 * c_cap)]
        else:
            self._leftover = cand[~swap]
        if not swap.any():
            return None
        self.promotions += int(swap.sum())
        promote, evicted_at = cand[swap], e_order.take(e_idx[swap])     # positions in ``hot``
        # the hot set these moves leave, by id (checked against the placement next time)
        keep = np.ones(len(hot), dtype=bool)
        keep[evicted_at] = False
        kept, added = hot[keep], np.sort(promote)
        self._hot = np.insert(kept, np.searchsorted(kept, added), added)
        return PartitionMoves(promote, hot.take(evicted_at))


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


def _member(bits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(len(ids),) bool: whether neurons ``ids`` are set in packed ``bits``."""
    from ndpsched.replay import SequenceReplay

    return SequenceReplay.active_of(bits[None], ids)[0].view(bool)


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
    ranked. ``cells`` is (G, 16) candidates per (stage, 15 - state)."""

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

    def members(self) -> np.ndarray:
        """(N,) bool: the pool, to carry into the next one (hot members included)."""
        return self.mask

    def ranked(self, usable: np.ndarray, limit: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Candidates in ``usable`` (G, 16) cells by (cell, id), with their cells. ``limit``: (G,)
        how many of each stage's first are needed (here: all of them are returned)."""
        sel = np.flatnonzero(usable.ravel().take(self.key))
        order = sel.take(np.argsort(self.key.take(sel), kind="stable"))
        return self.ids.take(order), self.key.take(order)


class _MemoPool:
    """Promotion candidates of a replayed window whose pool is its own turn-ons plus leftovers:
    the memo's window set, sorted once by (cell, id), minus the GPU-resident neurons. Work per
    decision: O(GPU neurons + leftovers + what is ranked), none over all neurons."""

    def __init__(self, t1: int, window_set: _WindowSet, dense: np.ndarray, leftover: np.ndarray,
                 on_gpu: np.ndarray, hot: np.ndarray, group_of: np.ndarray, n_stage: int) -> None:
        self.t1, self.window_set, self.on_gpu, self.consumed = t1, window_set, on_gpu, False
        self.states = dense.take
        n_cells = n_stage * 16
        hot_in = hot[_member(window_set.bits, hot)]             # in the set but not candidates
        self.hot_cells = np.bincount(_cells(group_of, dense, hot_in), minlength=n_cells)
        if len(leftover):
            leftover = leftover[~(on_gpu.take(leftover) | _member(window_set.bits, leftover))]
        self.leftover = leftover
        self.leftover_cell = _cells(group_of, dense, leftover)
        self.cells = (np.diff(window_set.starts) - self.hot_cells
                      + np.bincount(self.leftover_cell, minlength=n_cells)).reshape(n_stage, 16)

    def members(self) -> np.ndarray:
        mask = np.zeros(len(self.on_gpu), dtype=bool)
        mask[self.window_set.ids] = True
        mask[self.leftover] = True
        return mask

    def ranked(self, usable: np.ndarray, limit: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`_MaskPool.ranked`, but with ``limit`` only each stage's first ``limit`` are
        sure to be there: a stage's usable cells are a prefix of its run in the window set, and
        its first ``limit`` + (GPU neurons among them) entries hold its first ``limit`` cold ones."""
        ws, n_stage = self.window_set, usable.shape[0]
        first = np.arange(n_stage) * 16
        begin = ws.starts.take(first)
        take = ws.starts.take(first + usable.sum(axis=1)) - begin
        if limit is not None:
            hot_in = (self.hot_cells.reshape(n_stage, 16) * usable).sum(axis=1)
            take = np.minimum(take, limit + hot_in)
        pos = np.repeat(begin - (np.cumsum(take) - take), take) + np.arange(take.sum())
        ids = ws.ids.take(pos)
        cold = np.flatnonzero(~self.on_gpu.take(ids))
        ids, cell = ids.take(cold), ws.cells.take(pos.take(cold))
        extra = usable.ravel().take(self.leftover_cell)
        if extra.any():
            # merge the leftovers (none of them in the window set) in (cell, id) order
            # (one sort of the concatenation: about 2x faster here than sorting them and inserting)
            both = np.sort(np.concatenate([(cell.astype(np.int64) << 32) | ids,
                                           (self.leftover_cell[extra].astype(np.int64) << 32) | self.leftover[extra]]))
            ids, cell = both & 0xFFFFFFFF, both >> 32
        return ids.astype(np.intp), cell
