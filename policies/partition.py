"""Baseline hot/cold partition policies: static frequency top-k and random."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ndpsched.policy import PartitionPolicy, SchedContext
from ndpsched.registry import register_policy


def fill_budget(order: np.ndarray, neuron_bytes: np.ndarray, budget_bytes: float) -> np.ndarray:
    """(N,) bool: take neurons in ``order`` while their cumulative bytes fit ``budget_bytes``."""
    on_gpu = np.zeros(len(neuron_bytes), dtype=bool)
    fits = np.cumsum(neuron_bytes[order]) <= budget_bytes
    on_gpu[order[fits]] = True
    return on_gpu


@register_policy("partition", "topk")
class StaticTopK(PartitionPolicy):
    """Static frequency top-k: the most frequently active neurons, over all layers, fill the GPU.

    The benefit of a GPU copy is proportional to f_i x bytes_i and its cost to bytes_i, so the
    ranking is by offline frequency f_i alone. Never changes online.
    """

    @dataclass(frozen=True)
    class Params:
        #: fraction of the GPU budget to fill (1.0 = all of it)
        budget_fraction: float = 1.0

        def __post_init__(self) -> None:
            if not 0 <= self.budget_fraction <= 1:
                raise ValueError(f"budget_fraction must be in [0, 1], got {self.budget_fraction}")

    def _initial(self, ctx: SchedContext) -> np.ndarray:
        order = np.argsort(-ctx.offline_freqs, kind="stable")
        return fill_budget(order, ctx.neuron_bytes, ctx.gpu_budget_bytes * self.params.budget_fraction)


@register_policy("partition", "random")
class RandomPartition(PartitionPolicy):
    """Random neurons fill the GPU budget (the 'random placement' step of Hermes' ablation)."""

    @dataclass(frozen=True)
    class Params:
        budget_fraction: float = 1.0

        def __post_init__(self) -> None:
            if not 0 <= self.budget_fraction <= 1:
                raise ValueError(f"budget_fraction must be in [0, 1], got {self.budget_fraction}")

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
