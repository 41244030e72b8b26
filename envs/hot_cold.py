"""``ndpsched/HotCold-v0``: the agent decides the online hot/cold partition."""
from __future__ import annotations

from .base import SchedulingEnv


class HotColdEnv(SchedulingEnv):
    """Decide, every window, which cold neurons are promoted to the GPU and which hot ones are evicted.

    ## Description
    Decode on one GPU + NDP-DIMMs, simulated by ndpsched's execution model. Hermes keeps a 4-bit
    saturating state per neuron and promotes cold neurons whose state exceeds T_h, overwriting
    the lowest-state GPU neuron of the same stage, copying over PCIe while the projection runs.
    The agent picks, at every window boundary, the rule's hot threshold and how many promotions
    the window may copy. The GPU budget per stage is the offline ILP's. DIMM balancing and the
    predictor are played by registered heuristics (default ``hermes.window`` and the oracle).

    ## Action Space
    ``Discrete(n)``: 0 = no promotion this window; k > 0 = run ``hermes.adjust`` with the k-th
    setting: hot threshold T_h in {6, 8, 10, 12, 14} x promotions per stage in {0.5, 1, 2} times
    what PCIe hides under one projection (16 actions). Hermes' own decision (T_h = 10, scale 1)
    is ``env.unwrapped.heuristic_action()``. Promotions are masked when the GPU holds no neuron copies.

    ## Observation Space
    ``Box(0, 10, (history x (20 + dimms),), float32)``: the features of ``DimmBalance-v0`` plus,
    for each threshold level, how many cold neurons that fired since the last decision have a
    state above it, per neuron that PCIe copies per window.

    ## Rewards
    As ``DimmBalance-v0``: ``latency`` (default) or ``latency_energy``.

    ## Starting State
    As ``DimmBalance-v0``.

    ## Episode End
    Terminated when the generation is complete; truncated by ``max_episode_steps``.

    ## Arguments
    See :class:`ndpsched.envs.base.SchedulingEnv` (``partition`` defaults to ``hermes.adjust``).

    ## Version History
    * v0: initial version.
    """

    controlled = ("partition",)
    default_policies = {"partition": "hermes.adjust", "predictor": "oracle", "balancer": "hermes.window"}
