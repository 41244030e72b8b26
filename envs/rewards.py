"""Rewards of the scheduling environments, as named, selectable objects.

Every reward is relative to the episode's *reference*: the per-token latency of its first
window, which is simulated before any decision (the offline placement). A reward of -0.97 thus
means "3 % faster than the offline schedule"; the scale is the same for relullama-7b and
llama2-70b, which lets a policy trained on one be judged on the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ndpsched.errors import ConfigError, unknown_name


@dataclass(slots=True)
class WindowReport:
    """What a reward sees of one window (all in SI units; slotted: one is made per env step)."""

    window_s: float                  # decode time of the window's tokens
    n_tokens: int
    reference_token_s: float         # per-token latency of the episode's first window
    migration_energy_j: float        # energy of the moves decided before this window
    dimm_link_bytes: float
    pcie_bytes: float

    @property
    def token_s(self) -> float:
        return self.window_s / self.n_tokens


class Reward:
    """Base: ``reward(report) -> float``. Subclasses take their constants as keyword arguments."""

    name = ""

    def __call__(self, report: WindowReport) -> float:
        raise NotImplementedError  # abstract

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


REWARDS: dict[str, type[Reward]] = {}


def register_reward(name: str) -> Callable[[type[Reward]], type[Reward]]:
    """Class decorator: make a reward selectable by name (``reward="name"`` env kwarg)."""
    def deco(cls: type[Reward]) -> type[Reward]:
        cls.name = name
        REWARDS[name] = cls
        return cls
    return deco


@register_reward("latency")
class NegativeLatency(Reward):
    """``-token_latency / reference_latency``: minimise decode time."""

    def __call__(self, report: WindowReport) -> float:
        return -report.token_s / report.reference_token_s


@register_reward("latency_gain")
class LatencyGain(Reward):
    """``100 x (1 - token_latency / reference_latency)``: percent faster than the episode's offline
    schedule. The same ordering of policies as ``latency``, centred on 0 and scaled to percent,
    which suits value learning better than rewards near -1."""

    def __call__(self, report: WindowReport) -> float:
        return 100.0 * (1.0 - report.token_s / report.reference_token_s)


@register_reward("latency_energy")
class NegativeLatencyEnergy(Reward):
    """``-(token_latency + w * migration_energy_per_token) / reference_latency``.

    Migration energy prices DIMM-link bytes at the DIMM link's pJ/bit (Hermes: 1.17) and PCIe
    bytes at the PCIe preset's pJ/bit. ``energy_weight_s_per_j`` converts joules into seconds of
    latency; its default, 100 s/J, is a chosen value (no paper gives one) at which one window of
    Hermes' remapping on relullama-7b costs a few percent of the window's latency, so that the
    trade-off is visible.
    """

    def __init__(self, energy_weight_s_per_j: float = 100.0) -> None:
        if energy_weight_s_per_j < 0:
            raise ConfigError(f"energy_weight_s_per_j must be >= 0, got {energy_weight_s_per_j}")
        self.energy_weight_s_per_j = float(energy_weight_s_per_j)

    def __call__(self, report: WindowReport) -> float:
        energy_s = self.energy_weight_s_per_j * report.migration_energy_j / report.n_tokens
        return -(report.token_s + energy_s) / report.reference_token_s


def make_reward(reward: str | Reward, params: dict[str, Any] | None = None) -> Reward:
    """A reward object from its registered name (and constants) or an instance."""
    if isinstance(reward, Reward):
        return reward
    if reward not in REWARDS:
        raise unknown_name("reward", str(reward), REWARDS)
    try:
        return REWARDS[reward](**(params or {}))
    except TypeError as exc:
        raise ConfigError(f"reward '{reward}': {exc}") from None
