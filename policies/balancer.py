"""Baseline DIMM balancers: round-robin and random (both static)."""
from __future__ import annotations

import numpy as np

from ndpsched.policy import BalancerPolicy, SchedContext
from ndpsched.registry import register_policy


@register_policy("balancer", "round-robin")
class RoundRobin(BalancerPolicy):
    """Neuron i of every (layer, kind) goes to DIMM i mod J, whatever its frequency."""

    def _initial(self, ctx: SchedContext, on_gpu: np.ndarray) -> np.ndarray:
        index_in_group = np.arange(ctx.n_neurons) - np.repeat(
            np.arange(ctx.layout.n_layers) * ctx.layout.per_layer, ctx.layout.per_layer)
        index_in_group = np.where(ctx.kind_of == 1, index_in_group - ctx.layout.d_qkv, index_in_group)
        return (index_in_group % ctx.n_dimms).astype(np.int16)


@register_policy("balancer", "random")
class RandomBalancer(BalancerPolicy):
    """Each neuron on a uniformly random DIMM (seeded)."""

    def _initial(self, ctx: SchedContext, on_gpu: np.ndarray) -> np.ndarray:
        return ctx.rng.integers(0, ctx.n_dimms, size=ctx.n_neurons).astype(np.int16)
