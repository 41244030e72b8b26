"""One code path to judge any scheduler in the environments: registered heuristics, fixed or
random actions and learned (Stable-Baselines3) policies all act through ``predict`` and are
scored by :func:`evaluate` on the same episodes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ndpsched.errors import ConfigError


class Agent(Protocol):
    """Stable-Baselines3's policy interface: ``predict(obs, state, episode_start, deterministic)
    -> (action, state)``. Agents that need their env define ``bind(env)``."""

    def predict(self, observation: np.ndarray, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> tuple[Any, Any]: ...


@dataclass
class HeuristicAgent:
    """A registered heuristic acting through the agent interface.

    ``policies`` maps each controlled role to a registered policy name (and ``params`` to its
    constants); :meth:`env_kwargs` configures the env to carry that policy out, and the agent
    then always picks the action that is the heuristic's own decision. With no policies it
    plays whatever heuristics the env was made with (Hermes' by default).
    """

    policies: dict[str, str] = field(default_factory=dict)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = "+".join(self.policies.values()) or "heuristic"
        self._env = None

    def env_kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.policies)
        for role, p in self.params.items():
            out[f"{role}_params"] = dict(p)
        return out

    def bind(self, env) -> None:
        self._env = env.unwrapped
        for role, name in self.policies.items():
            actual = getattr(self._env.config, role).name
            if role not in self._env.controlled or actual != name:
                raise ConfigError(f"heuristic '{self.name}' needs an env whose {role} is '{name}' and "
                                  f"controlled; make it with env_kwargs() (it has '{actual}')")

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        if self._env is None:
            raise ConfigError("HeuristicAgent.bind(env) must be called before predict()")
        return self._env.heuristic_action(), state


@dataclass
class FixedAgent:
    """Always the same action (0 = no move for every controlled role)."""

    action: Any = 0
    name: str = "no-move"

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        return self.action, state


@dataclass
class RandomAgent:
    """Uniformly random valid actions (respecting ``action_masks``), seeded."""

    seed: int = 0
    name: str = "random"

    def __post_init__(self) -> None:
        self._env = None
        self._rng = np.random.default_rng(self.seed)

    def bind(self, env) -> None:
        self._env = env.unwrapped

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        mask = self._env.action_masks()
        actions = []
        offset = 0
        for role in self._env.controlled:
            n = self._env.grids[role].n
            actions.append(int(self._rng.choice(np.flatnonzero(mask[offset: offset + n]))))
            offset += n
        return (actions[0] if len(actions) == 1 else np.array(actions)), state


def ci95_half_width(values: list[float] | np.ndarray) -> float:
    """Half width of the 95 % confidence interval of the mean (Student t; 0 for one value)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return 0.0
    from scipy.stats import t

    return float(t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))


def evaluate(agent: Agent, env_id: str = "ndpsched/DimmBalance-v0", n_episodes: int = 5, seed: int = 0,
             env_kwargs: dict[str, Any] | None = None, deterministic: bool = True, env=None,
             obs_transform=None) -> dict[str, Any]:
    """Run ``agent`` for ``n_episodes`` (reset seeds ``seed``, ``seed + 1``, ...) and return the
    same metrics for every kind of agent.

    Args:
        agent: anything with SB3's ``predict``; ``bind(env)`` is called when it has one; a
            MaskablePPO model receives the env's ``action_masks()``.
        env_id, env_kwargs: the environment (a heuristic agent's ``env_kwargs()`` are merged in).
        env: an already made env to use instead.
        obs_transform: applied to observations before ``predict`` (e.g. VecNormalize statistics).

    Returns:
        dict with per-episode lists and means: ``tokens_per_s`` (whole generation, prefill
        included), ``return``, ``dimm_imbalance``, ``bytes_migrated`` (DIMM-link + PCIe),
        ``remapped``, ``promoted``, plus ``tokens_per_s_ci95``.
    """
    if env is None:
        import gymnasium as gym

        import ndpsched.envs  # noqa: F401  (registers the ids)

        kwargs = dict(env_kwargs or {})
        if hasattr(agent, "env_kwargs"):
            kwargs.update(agent.env_kwargs())
        env = gym.make(env_id, **kwargs)
    if hasattr(agent, "bind"):
        agent.bind(env)
    trained_space = getattr(agent, "observation_space", None)
    if trained_space is not None and trained_space.shape != env.observation_space.shape:
        raise ConfigError(f"the policy was trained on observations of shape {trained_space.shape}, this env "
                          f"gives {env.observation_space.shape} (same DIMM count and history needed)")
    masked = type(agent).__name__ == "MaskablePPO"
    per: dict[str, list[float]] = {k: [] for k in ("tokens_per_s", "return", "dimm_imbalance",
                                                   "bytes_migrated", "remapped", "promoted")}
    for i in range(n_episodes):
        obs, _ = env.reset(seed=seed + i)
        total, state, start = 0.0, None, True
        while True:
            x = obs_transform(obs) if obs_transform is not None else obs
            if masked:
                action, state = agent.predict(x, state=state, episode_start=start, deterministic=deterministic,
                                              action_masks=env.unwrapped.action_masks())
            else:
                action, state = agent.predict(x, state=state, episode_start=start, deterministic=deterministic)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            start = False
            if terminated or truncated:
                break
        res = env.unwrapped.episode_result()
        per["tokens_per_s"].append(res.tokens_per_s)
        per["return"].append(total)
        per["dimm_imbalance"].append(res.dimm_imbalance)
        per["bytes_migrated"].append(res.bytes_moved["dimm_link"] + res.bytes_moved["pcie"])
        per["remapped"].append(res.moves["remapped"])
        per["promoted"].append(res.moves["promoted"])
    out: dict[str, Any] = {"agent": getattr(agent, "name", type(agent).__name__), "env": env_id,
                           "episodes": n_episodes, "per_episode": per}
    for k, v in per.items():
        out[k] = float(np.mean(v))
    out["tokens_per_s_ci95"] = ci95_half_width(per["tokens_per_s"])
    return out
