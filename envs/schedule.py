"""``ndpsched/Schedule-v0``: the agent decides both the hot/cold partition and the DIMM balance."""
from __future__ import annotations

from .base import SchedulingEnv


class ScheduleEnv(SchedulingEnv):
    """Both scheduling decisions of Hermes, every window: promotions to the GPU and DIMM remaps.

    ## Description
    The union of ``HotCold-v0`` and ``DimmBalance-v0``: at every window boundary the agent
    picks the promotion rule's setting (applied first) and the balancer's setting.

    ## Action Space
    ``MultiDiscrete([n_partition, n_balancer])`` (16 x 16 by default), each component as in
    the single-role envs (0 = no move). ``action_masks()`` concatenates both roles' masks, as
    sb3-contrib's MaskablePPO expects for MultiDiscrete spaces. Hermes' own decision is
    ``env.unwrapped.heuristic_action()``.

    ## Observation Space
    As ``HotCold-v0``.

    ## Rewards
    ``latency`` (default) or ``latency_energy``.

    ## Starting State
    As ``DimmBalance-v0``.

    ## Episode End
    Terminated when the generation is complete; truncated by ``max_episode_steps``.

    ## Arguments
    See :class:`ndpsched.envs.base.SchedulingEnv`.

    ## Version History
    * v0: initial version.
    """

    controlled = ("partition", "balancer")
    default_policies = {"partition": "hermes.adjust", "predictor": "oracle", "balancer": "hermes.window"}
