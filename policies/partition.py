"""Hot/cold partition policies.

- ``topk``, ``random``, ``none``: static baselines;
- ``powerinfer.topk``: PowerInfer's offline solver;
- ``hermes.ilp``: Hermes' offline ILP; ``hermes.adjust``: the ILP plus Hermes' online adjustment.
"""
from __future__ import annotations

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
        self.states = SaturatingStates(initial_states(ctx.prefill_freqs), active > 0, token,
                                       self.params.state_inc, self.params.state_dec)
        # every neuron that fired since the last decision, plus the prompt's active set
        self._seen = [np.flatnonzero(active)]
        self._pool = None
        self._stamp = np.zeros(ctx.n_neurons, dtype=np.int64)
        self.promotions = 0

    def observe(self, token: int, on: np.ndarray, off: np.ndarray) -> None:
        self.states.toggle(on, off, token)
        self._seen.append(on)
        self._pool = None

    def _candidate_pool(self, placement: Placement, token: int) -> tuple[np.ndarray, np.ndarray]:
        """Distinct cold neurons that fired since the last decision and their states at ``token``;
        kept until the next token or decision, so an observer (the HotCold env) and the decision
        at the same window end share one computation."""
        pool = getattr(self, "_pool", None)
        if pool is None or pool[0] != token:
            seen = np.concatenate(self._seen)
            cand = self._distinct(seen[~placement.on_gpu[seen]])
            pool = (token, cand, self.states.states(cand, token))
            self._pool = pool
        return pool[1], pool[2]

    def candidate_state_histogram(self, placement: Placement, token: int) -> np.ndarray:
        """(16,) how many distinct cold neurons that fired since the last decision are in each
        FSM state at ``token`` (what the next decision picks its promotions from)."""
        return np.bincount(self._candidate_pool(placement, token)[1], minlength=16)

    def _distinct(self, ids: np.ndarray) -> np.ndarray:
        """Distinct ids (each at its last occurrence), in O(n): the last write into the stamp wins."""
        self._stamp[ids] = np.arange(len(ids))
        return ids[self._stamp[ids] == np.arange(len(ids))]

    def _update(self, window: WindowActivity, placement: Placement) -> PartitionMoves | None:
        ctx, p, now = self.ctx, self.params, window.t1 - 1
        pool, pool_state = self._candidate_pool(placement, now)
        self._pool = None                    # the decision changes the placement and the pool
        hot_enough = pool_state > p.hot_threshold
        cand, cand_state = pool[hot_enough], pool_state[hot_enough]
        if len(cand) == 0:
            return None
        hot = np.flatnonzero(placement.on_gpu)
        if len(hot) == 0:
            return None
        hot_state = self.states.states(hot, now)
        n_stage = ctx.layout.n_groups
        # candidates by stage, highest state first; evictees by stage, lowest state first (ties by
        # neuron id). 16-bit keys let numpy's stable argsort run as a radix sort.
        key_dtype = np.uint16 if n_stage * 16 < 2**16 else np.int64
        c_order = np.argsort((ctx.group_of[cand] * 16 + (15 - cand_state)).astype(key_dtype), kind="stable")
        e_order = np.argsort((ctx.group_of[hot] * 16 + hot_state).astype(key_dtype), kind="stable")
        cand, cand_state = cand[c_order], cand_state[c_order]
        hot, hot_state = hot[e_order], hot_state[e_order]
        c_stage, e_stage = ctx.group_of[cand], ctx.group_of[hot]
        c_count = np.bincount(c_stage, minlength=n_stage)
        c_rank = np.arange(len(cand)) - (np.cumsum(c_count) - c_count)[c_stage]
        e_count = np.bincount(e_stage, minlength=n_stage)
        e_first = np.cumsum(e_count) - e_count
        pair = c_rank < e_count[c_stage]
        e_idx = np.where(pair, e_first[c_stage] + c_rank, 0)
        swap = pair & (cand_state > hot_state[e_idx])
        if p.hide_copies:
            cm = ctx.cost
            per_layer = cm.projection_s(ctx.batch) * cm.pcie_bw              # bytes hidden per layer
            cap = np.floor(p.promote_scale * per_layer / 2 / ctx.cost.neuron_bytes[c_stage % 2]).astype(np.int64)
            swap &= c_rank < cap
            # candidates still hot are re-examined next window even without a new toggle; a
            # stage can take at most ``cap`` per window, so its best 2 x cap leftovers suffice
            self._seen = [cand[~swap & (c_rank < 2 * cap + cap)]]
        else:
            self._seen = [cand[~swap]]
        if not swap.any():
            return None
        self.promotions += int(swap.sum())
        return PartitionMoves(cand[swap], hot[e_idx[swap]])
