"""Gymnasium environments of ndpsched (importing this module registers them).

    import gymnasium as gym
    import ndpsched.envs
    env = gym.make("ndpsched/DimmBalance-v0", model="relullama-7b", dimms=8)

or, without the import, ``gym.make("ndpsched.envs:ndpsched/DimmBalance-v0")``. The entry points
are strings, so gymnasium imports an env's module only when it is made.
"""
from __future__ import annotations

import gymnasium as gym

#: registered ids -> entry points
ENV_IDS = {
    "ndpsched/DimmBalance-v0": "ndpsched.envs.dimm_balance:DimmBalanceEnv",
    "ndpsched/HotCold-v0": "ndpsched.envs.hot_cold:HotColdEnv",
    "ndpsched/Schedule-v0": "ndpsched.envs.schedule:ScheduleEnv",
}

# No OrderEnforcing or PassiveEnvChecker wrapper: the envs refuse a step before reset (and after
# the episode's end) themselves, with a message naming the fix, and the test suite runs
# gymnasium's and SB3's full env checkers on every id; the two wrappers only added a few
# microseconds to every step (about 2 % of a DimmBalance step on relullama-7b).
for _env_id, _entry_point in ENV_IDS.items():
    if _env_id not in gym.registry:
        gym.register(id=_env_id, entry_point=_entry_point, order_enforce=False, disable_env_checker=True)

__all__ = ["ENV_IDS"]
