"""Learned schedulers as policies like any other: ``--balancer rl:DIR`` / ``--partition rl:DIR``.

A model trained by ``ndpsched train`` on one of the environments picks, every window, a setting
of a base heuristic's knobs (see :mod:`ndpsched.envs.actions`). Inside the simulator the
wrapper rebuilds the env's observation from the run (same features, same history, same
normalisation statistics), asks the model, and lets the base heuristic carry the setting out.
The offline decision (initial placement) is the base heuristic's. A model trained on the
``Schedule-v0`` env drives both roles: give the same DIR to both flags.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ndpsched.errors import ConfigError
from ndpsched.policy import BalancerPolicy, PartitionPolicy, Placement, SchedContext, WindowActivity
from ndpsched.registry import register_policy, registry


@dataclass(frozen=True)
class LearnedParams:
    #: directory written by ``ndpsched train --out DIR``
    path: str = ""
    #: act greedily (True) or sample from the policy's distribution
    deterministic: bool = True


class LearnedMixin:
    """Shared by the learned partition and balancer: loading, observation, acting."""

    Params = LearnedParams
    artifact_param = "path"
    role = ""

    def _load(self) -> None:
        if getattr(self, "_agent", None) is not None:
            return
        from ndpsched.artifact import load_artifact
        from ndpsched.envs.actions import KnobGrid
        from ndpsched.envs.base import ENV_DEFAULTS
        from ndpsched.envs.observations import ObservationStack, feature_names

        if not self.params.path:
            raise ConfigError(f"learned {self.role} needs a trained scheduler: use '{self.role} rl:DIR' "
                              "with DIR written by ndpsched train")
        agent = load_artifact(self.params.path)
        meta = agent.meta
        roles = list(meta["controlled"])
        if self.role not in roles:
            raise ConfigError(f"'{self.params.path}' was trained to decide {roles}, not the {self.role}")
        kw = meta["env_kwargs"]
        base_name = meta["policies"][self.role]["name"]
        base_params = meta["policies"][self.role]["params"]
        self.base = registry(self.role).create(base_name, base_params)
        self.grids = {role: KnobGrid(role, meta["policies"][role]["name"], meta["policies"][role]["params"],
                                     (kw.get("knobs") or {}).get(role)) for role in roles}
        self.roles = roles
        self.n_dimms = int(meta["n_dimms"])
        self.with_candidates = bool(meta["with_candidates"])
        history = int(kw.get("history", 3))
        self.stack = ObservationStack(history, len(feature_names(self.n_dimms, self.with_candidates)))
        self.window_tokens = int(meta.get("window_tokens", ENV_DEFAULTS["window_tokens"]))
        self._agent = agent
        # the base heuristic's needs are the wrapper's needs
        self.uses_neuron_activity = self.base.uses_neuron_activity
        self.observes_tokens = self.base.observes_tokens

    def reset(self, ctx: SchedContext) -> None:
        self._load()
        super().reset(ctx)
        if ctx.n_dimms != self.n_dimms:
            raise ConfigError(f"'{self.params.path}' was trained with {self.n_dimms} DIMMs; this run has "
                              f"{ctx.n_dimms} (the observation has one entry per DIMM)")
        if ctx.window_tokens != self.window_tokens:
            raise ConfigError(f"'{self.params.path}' was trained on {self.window_tokens}-token windows; this "
                              f"run uses {ctx.window_tokens} (set --window {self.window_tokens})")
        self.base.reset(ctx)
        self.stack.reset()
        self._reference_token_s = None

    def start(self, active: np.ndarray, token: int) -> None:
        self.base.start(active, token)

    def observe(self, token: int, on: np.ndarray, off: np.ndarray) -> None:
        self.base.observe(token, on, off)

    def observe_window(self, token: int, ons: list[np.ndarray], offs: list[np.ndarray]) -> None:
        self.base.observe_window(token, ons, offs)

    def _act(self, window: WindowActivity) -> Any:
        """The model's setting for this role at this window (None = no move)."""
        from ndpsched.envs.actions import role_mask
        from ndpsched.envs.observations import candidate_histogram

        run, out = window.run, window.outcome
        if self._reference_token_s is None:       # the first decision follows the first window
            self._reference_token_s = out.window_s / out.n_tokens
        cand = candidate_histogram(run.sim.partition, run, out) if self.with_candidates else None
        obs = self.stack.push_window(run, out, self._reference_token_s, run.prior_decision, cand)
        has_hot = bool(run.initial_placement.on_gpu.any())
        masks = np.concatenate([role_mask(r, self.grids[r].n, self.n_dimms, has_hot) for r in self.roles])
        action = np.asarray(self._agent.act(obs, masks, self.params.deterministic)).reshape(-1)
        a = int(action[self.roles.index(self.role)])
        if not masks[sum(self.grids[r].n for r in self.roles[: self.roles.index(self.role)]) + a]:
            return None                               # masked: the model's choice is not allowed
        return self.grids[self.role].settings[a]

    def _update(self, window: WindowActivity, placement: Placement):
        setting = self._act(window)
        if setting is None:
            return None
        self.base.params = setting
        return self.base._update(window, placement)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if getattr(self, "_agent", None) is not None:
            out["base"] = self.base.describe()
            out["trained"] = {k: self._agent.meta.get(k) for k in ("algo", "env_id", "seed", "timesteps")}
        return out

    def __getstate__(self) -> dict[str, Any]:
        # the SB3 model is reloaded from its directory after unpickling (Ray workers, copies)
        state = dict(self.__dict__)
        state["_agent"] = None
        return state


@register_policy("balancer", "rl")
class LearnedBalancer(LearnedMixin, BalancerPolicy):
    """A balancer trained with ``ndpsched train`` (``rl:DIR``)."""

    role = "balancer"

    def _initial(self, ctx: SchedContext, on_gpu: np.ndarray) -> np.ndarray:
        return self.base._initial(ctx, on_gpu)


@register_policy("partition", "rl")
class LearnedPartition(LearnedMixin, PartitionPolicy):
    """A hot/cold policy trained with ``ndpsched train`` (``rl:DIR``)."""

    role = "partition"

    def _initial(self, ctx: SchedContext) -> np.ndarray:
        return self.base._initial(ctx)
