"""Named systems: compositions of policies for the three roles.

``ndpsched simulate --system NAME`` starts from one of these; per-role flags override a role.
"""
from __future__ import annotations

from .config import PolicySpec
from .errors import unknown_name

#: name -> (description, {role: PolicySpec})
SYSTEMS: dict[str, tuple[str, dict[str, PolicySpec]]] = {
    "hermes": (
        "Hermes (HPCA'25): offline ILP + online hot/cold adjustment, state-table + correlation "
        "predictor, window-based DIMM remapping (Algorithm 1)",
        {"partition": PolicySpec("hermes.adjust"), "predictor": PolicySpec("hermes.fsm"),
         "balancer": PolicySpec("hermes.window")},
    ),
    "hermes-oracle": (
        "Hermes' scheduling with a perfect predictor (upper bound of its predictor)",
        {"partition": PolicySpec("hermes.adjust"), "predictor": PolicySpec("oracle"),
         "balancer": PolicySpec("hermes.window")},
    ),
    "hermes-offline": (
        "Hermes' offline ILP only: no online adjustment, no remapping, perfect predictor",
        {"partition": PolicySpec("hermes.ilp"), "predictor": PolicySpec("oracle"), "balancer": PolicySpec("static")},
    ),
    "powerinfer-ndp": (
        "PowerInfer's partition solver (maximise GPU activations) on the NDP-DIMM machine",
        {"partition": PolicySpec("powerinfer.topk"), "predictor": PolicySpec("oracle"), "balancer": PolicySpec("static")},
    ),
    "powerinfer": (
        "PowerInfer (Hermes calls it hermes-host): hot neurons on the GPU, cold neurons computed by "
        "the host CPU at its memory bandwidth",
        {"partition": PolicySpec("powerinfer.topk"), "predictor": PolicySpec("oracle"), "balancer": PolicySpec("static")},
    ),
    "topk": (
        "static frequency top-k fills the GPU; round-robin DIMM mapping",
        {"partition": PolicySpec("topk"), "predictor": PolicySpec("oracle"), "balancer": PolicySpec("round-robin")},
    ),
    "random": (
        "random placement: random hot set, random DIMM per neuron (the first step of Hermes' ablation)",
        {"partition": PolicySpec("random"), "predictor": PolicySpec("oracle"), "balancer": PolicySpec("random")},
    ),
    "ndp-only": (
        "every sparse neuron on the NDP-DIMMs, none on the GPU (dense projection still on the GPU)",
        {"partition": PolicySpec("none"), "predictor": PolicySpec("oracle"), "balancer": PolicySpec("static")},
    ),
}


#: other names accepted for a system
ALIASES = {"hermes-host": "powerinfer"}
#: systems whose cold neurons run on the host CPU instead of NDP-DIMMs
HOST_SYSTEMS = {"powerinfer"}


def system_names() -> list[str]:
    from .baselines import BASELINES

    return sorted({*SYSTEMS, *ALIASES, *BASELINES})


def canonical(name: str) -> str:
    return ALIASES.get(name, name)


def system_policies(name: str) -> dict[str, PolicySpec]:
    name = canonical(name)
    if name not in SYSTEMS:
        raise unknown_name("system", name, system_names())
    return {role: PolicySpec(spec.name, dict(spec.params)) for role, spec in SYSTEMS[name][1].items()}
