"""Build a simulation from a :class:`RunConfig` and run it (the path every front end uses)."""
from __future__ import annotations

import dataclasses
from typing import Any

from .config import RunConfig
from .costmodel import CostParams
from .inputs import load_trace, resolve_policies  # noqa: F401  (load_trace: part of this module's API)
from .presets import build_spec, load_hardware
from .registry import registry
from .simulator import SimResult, Simulator
from .systems import HOST_SYSTEMS, canonical
from .trace import ActivationTrace


def build_simulator(cfg: RunConfig, trace: ActivationTrace | None = None) -> Simulator:
    """Validate ``cfg`` and assemble the simulator (presets, policies, trace)."""
    model = cfg.load_model()
    hw = load_hardware(cfg.gpu, cfg.dimms, overrides=cfg.hardware)
    if canonical(cfg.system) in HOST_SYSTEMS:
        from .baselines import host_platform

        hw = host_platform(hw)
    cost_params = build_spec(CostParams, cfg.cost, "cost parameters")
    specs = resolve_policies(cfg)
    policies = {role: registry(role).create(spec.name, spec.params) for role, spec in specs.items()}
    if trace is None:
        trace = load_trace(cfg, model)
    else:
        trace.check_model(model)
    return Simulator(model, hw, trace, policies["partition"], policies["predictor"], policies["balancer"],
                     batch=cfg.batch, prompt_len=cfg.prompt_len, gen_len=cfg.gen_len,
                     window_tokens=cfg.window_tokens, cost_params=cost_params, seed=cfg.seed)


def simulate(cfg: RunConfig, trace: ActivationTrace | None = None, progress: bool = False) -> SimResult:
    """Run one configuration; the result carries the fully resolved configuration.

    Baseline systems (``ndpsched.baselines.BASELINES``) are priced analytically; the NDP and
    host systems run the neuron-level simulator.
    """
    from .baselines import BASELINES, BaselineParams, run_baseline

    if cfg.system in BASELINES:
        model = cfg.load_model()
        hw = load_hardware(cfg.gpu, cfg.dimms, overrides=cfg.hardware)
        params = build_spec(BaselineParams, cfg.baseline, "baseline parameters")
        result = run_baseline(cfg.system, model, hw, cfg.batch, cfg.prompt_len, cfg.gen_len, params)
        result.config = {**cfg.to_dict(), **result.config}
        return result
    if cfg.mode == "analytic" and trace is None:
        from .analytic import simulate_analytic

        return simulate_analytic(cfg)
    sim = build_simulator(cfg, trace)
    result = sim.run(progress=progress)
    resolved: dict[str, Any] = cfg.to_dict()
    for role, policy in (("partition", sim.partition), ("predictor", sim.predictor), ("balancer", sim.balancer)):
        resolved[role] = policy.describe()
    resolved["cost"] = dataclasses.asdict(sim.cost.params)
    result.config = resolved
    return result
