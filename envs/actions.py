"""Action spaces over policy parameters: an agent picks, every window, the constants with which
a registered heuristic decides (or "no move").

An action is an index into a grid of parameter settings of the role's policy: for
``hermes.window`` the imbalance tolerance and the share of each DIMM pair's load gap to close,
for ``hermes.adjust`` the hot threshold T_h and the number of promotions per window. Index 0 is
"no move this window". The grid is the same whatever the model's width and depth, so an agent
trained on a small model acts on llama2-70b unchanged, and the heuristic's own decision (its
default parameters) is always one of the actions, so an agent can at least match it.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np

from ndpsched.errors import ConfigError, unknown_name
from ndpsched.registry import registry

#: the knobs an agent turns, per registered policy; the policy's default value of each knob is
#: added to its levels when missing (chosen grids: they bracket the paper's constants)
DEFAULT_KNOBS: dict[str, dict[str, list[Any]]] = {
    "hermes.window": {"tolerance": [0.0, 0.02, 0.05, 0.1, 0.2], "move_fraction": [0.25, 0.5, 1.0]},
    "greedy.lpt": {"tolerance": [0.0, 0.02, 0.05, 0.1, 0.2]},
    "hermes.adjust": {"hot_threshold": [6, 8, 10, 12, 14], "promote_scale": [0.5, 1.0, 2.0]},
}

NO_MOVE = "no move"


class KnobGrid:
    """The discrete actions of one role: 0 = no move, k > 0 = the policy with the k-th setting.

    Args:
        role: 'partition' or 'balancer'.
        policy: registered policy name of that role.
        params: the policy's base parameters (its defaults, updated by these).
        knobs: parameter name -> levels; None takes :data:`DEFAULT_KNOBS` (no knobs for a policy
            without an entry: then the actions are "no move" and "the policy's own decision").
    """

    def __init__(self, role: str, policy: str, params: dict[str, Any] | None = None,
                 knobs: dict[str, list[Any]] | None = None) -> None:
        self.role, self.policy = role, policy
        cls = registry(role).get(policy)
        base = cls.Params(**(params or {})) if cls.Params is not None else None
        knobs = DEFAULT_KNOBS.get(policy, {}) if knobs is None else knobs
        if knobs and base is None:
            raise ConfigError(f"{role} '{policy}' has no parameters to turn; give knobs={{}}")
        fields = [f.name for f in dataclasses.fields(base)] if base is not None else []
        levels: dict[str, list[Any]] = {}
        for name, values in knobs.items():
            if name not in fields:
                raise unknown_name(f"knob (parameter of {role} {policy})", name, fields)
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"knob '{name}' needs a non-empty list of values, got {values!r}")
            default = getattr(base, name)
            values = list(dict.fromkeys(values))          # unique, order kept
            if default not in values:                     # the heuristic's own decision is an action
                values.append(default)
            levels[name] = sorted(values) if all(isinstance(v, (int, float)) for v in values) else values
        self.knobs = levels
        self.base = base
        self.settings: list[Any] = [None]                 # index 0: no move
        for combo in itertools.product(*levels.values()):
            try:
                self.settings.append(dataclasses.replace(base, **dict(zip(levels, combo))) if levels else base)
            except ValueError as exc:
                raise ConfigError(f"knob setting {dict(zip(levels, combo))} of {role} '{policy}': {exc}") from None
        #: the action that reproduces the heuristic (its base parameters)
        self.default_action = self.settings.index(base, 1)
        #: readable name of every action (each step's info carries the one taken)
        self.names = [self._name(setting) for setting in self.settings]

    @property
    def n(self) -> int:
        return len(self.settings)

    def describe(self, action: int) -> str:
        """Readable name of an action."""
        return self.names[action]

    def _name(self, setting: Any) -> str:
        if setting is None:
            return NO_MOVE
        if not self.knobs:
            return self.policy
        return f"{self.policy}(" + ", ".join(f"{k}={getattr(setting, k)}" for k in self.knobs) + ")"

    def action_of(self, **values: Any) -> int:
        """Index of the setting with these knob values (others at their base values)."""
        want = dataclasses.replace(self.base, **values)
        if want not in self.settings[1:]:
            raise ConfigError(f"no action of {self.role} '{self.policy}' has {values}; knobs: {self.knobs}")
        return self.settings.index(want, 1)


def role_mask(role: str, n_actions: int, n_dimms: int, gpu_has_neurons: bool) -> np.ndarray:
    """Valid actions of a role: "no move" always; remaps need two DIMMs; promotions need neuron
    copies on the GPU to swap with."""
    mask = np.ones(n_actions, dtype=bool)
    if (role == "balancer" and n_dimms < 2) or (role == "partition" and not gpu_has_neurons):
        mask[1:] = False
    return mask
