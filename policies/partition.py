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
