"""Hot/cold partition policies.

- ``topk``, ``random``, ``none``: static baselines;
- ``powerinfer.topk``: PowerInfer's offline solver;
- ``hermes.ilp``: Hermes' offline ILP; ``hermes.adjust``: the ILP plus Hermes' online adjustment.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

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
        order = np.argsort(-ctx.offline_freqs, kind="stable")
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
        # neurons that turned on since the last decision (first: the prompt's active set), and the
        # still-hot candidates the last decision had no room for
        self._turned_on = [np.flatnonzero(active > 0)]
        self._leftover = np.zeros(0, dtype=np.intp)
        self._carried: np.ndarray | None = None      # (N,) bool pool of a window nothing was decided on
        self._pool = None
        self._hot: np.ndarray | None = None          # see _hot_ids
        self.promotions = 0

    def observe(self, token: int, on: np.ndarray, off: np.ndarray) -> None:
        self._pending.append((token, on, off))
        self._turned_on.append(on)
        self._pool = None

    def _state_lookup(self, window: WindowActivity):
        """A function giving the FSM states of neuron ids after the window's last token.

        The states depend on the sequence's activity alone, so where the window belongs to a
        replayed sequence they are kept in its memo from the second visit on ((N,) uint8), and an
        episode replaying it reads them without updating the per-neuron words token by token.
        Otherwise the observed tokens' toggles are applied to the words (O(toggles))."""
        now, memo = window.t1 - 1, window.memo
        key = ("hermes.adjust.states", self.params.state_inc, self.params.state_dec)
        dense = memo.get(key) if memo is not None else None
        if dense is not None:
            self._pending.clear()
            self._behind = (now, dense, window)
            return dense.take
        self._catch_up()
        if memo is not None and memo.visits > 1:
            dense = self.states.all_states(now).astype(np.uint8)
            memo.put(key, dense)
            return dense.take
        return functools.partial(self.states.states, token=now)

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

    def _candidate_pool(self, placement: Placement, window: WindowActivity) -> tuple:
        """The next decision's candidates: cold neurons that turned on since the last decision (or
        were left over by it), by id. Returns (window end, ids, their states at the window's end,
        a function giving any neuron's state then, each candidate's (stage, 15 - state) cell as
        a key ``stage * 16 + 15 - state``, (G, 16) candidates per cell). Kept until the next token
        or decision, so an observer (the HotCold env) and the decision at the same window end
        share one computation."""
        pool = self._pool
        if pool is None or pool[0] != window.t1:
            mask = self._carried if self._carried is not None else np.zeros(self.ctx.n_neurons, dtype=bool)
            for ids in self._turned_on:
                mask[ids] = True
            mask[self._leftover] = True
            # kept as the start of the next pool unless a decision consumes it
            self._carried, self._turned_on, self._leftover = mask, [], self._leftover[:0]
            cand = np.flatnonzero(mask > placement.on_gpu)
            states = self._state_lookup(window)
            cand_state = states(cand)
            # the pool is by id, so its stages are runs; 16-bit keys let numpy's stable argsort
            # run as a radix sort
            n_stage = self.ctx.layout.n_groups
            key_dtype = np.uint16 if n_stage * 16 < 2**16 else np.int64
            key = (np.repeat(np.arange(n_stage, dtype=key_dtype) * 16, self._stage_bounds(cand))
                   + (15 - cand_state).astype(key_dtype))
            cells = np.bincount(key, minlength=n_stage * 16).reshape(n_stage, 16)
            pool = self._pool = (window.t1, cand, cand_state, states, key, cells)
        return pool

    def candidate_state_histogram(self, placement: Placement, window: WindowActivity) -> np.ndarray:
        """(16,) how many candidates of the next decision (cold neurons that turned on since the
        last one) are in each FSM state at the window's end."""
        return self._candidate_pool(placement, window)[5].sum(axis=0)[::-1]

    def _hot_ids(self, on_gpu: np.ndarray) -> np.ndarray:
        """Ids of the GPU-resident neurons, by id: the set this policy's last moves left, if the
        placement still has exactly it (a count and a gather), else a scan."""
        hot = self._hot
        if hot is None or len(hot) != np.count_nonzero(on_gpu) or not on_gpu.take(hot).all():
            hot = self._hot = np.flatnonzero(on_gpu)
        return hot

    def _stage_bounds(self, ids: np.ndarray) -> np.ndarray:
        """(G,) count of sorted ``ids`` in each stage (a stage's neurons are consecutive ids)."""
        return np.diff(np.searchsorted(ids, self.ctx.layout.group_starts()))

    def _update(self, window: WindowActivity, placement: Placement) -> PartitionMoves | None:
        ctx, p = self.ctx, self.params
        _, pool, pool_state, states, c_key, cells = self._candidate_pool(placement, window)
        self._pool = None                    # the decision changes the placement and the pool
        hot = self._hot_ids(placement.on_gpu)
        if len(hot) == 0 or not (pool_state > p.hot_threshold).any():
            return None                      # nothing decided: the pool carries over
        self._carried = None
        n_stage = ctx.layout.n_groups
        # candidates by stage, highest state first; evictees by stage, lowest state first, ties by
        # neuron id: pool and hot set are by id (so their stages are runs)
        key_dtype = c_key.dtype
        stage16 = np.arange(n_stage, dtype=key_dtype) * 16
        # cells (stage, 15 - state) that can promote: states above T_h and, with hidden copies,
        # only the first 3 x cap candidates of a stage (it promotes at most cap and keeps 2 x cap
        # leftovers), so whole cells past them are dropped before the sort
        usable = np.broadcast_to(np.arange(16) < 15 - p.hot_threshold, (n_stage, 16))
        cap = None
        if p.hide_copies:
            cm = ctx.cost
            per_layer = cm.projection_s(ctx.batch) * cm.pcie_bw              # bytes hidden per layer
            cap = np.floor(p.promote_scale * per_layer / 2 / cm.neuron_bytes[np.arange(n_stage) % 2]).astype(np.int64)
            cell_count = cells * usable
            usable = usable & (np.cumsum(cell_count, axis=1) - cell_count < 3 * cap[:, None])
        sel = np.flatnonzero(usable.ravel().take(c_key))
        c_order = sel.take(np.argsort(c_key.take(sel), kind="stable"))
        cand, cand_state, c_stage = pool.take(c_order), pool_state.take(c_order), c_key.take(c_order) // 16
        hot_state = states(hot)
        e_count = self._stage_bounds(hot)
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
