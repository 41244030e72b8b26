"""Named systems: compositions of policies for the three roles.

``ndpsched simulate --system NAME`` starts from one of these; per-role flags override a role.
"""
from __future__ import annotations

from .config import PolicySpec
from .errors import unknown_name

#: name -> (description, {role: PolicySpec})
SYSTEMS: dict[str, tuple[str, dict[str, PolicySpec]]] = {
    "hermes": (
        "Hermes: GPU + NDP-DIMMs, sparsity-aware hot/cold partition and DIMM balancing "
        "(until Hermes' own algorithms land: static frequency top-k, oracle predictor, round-robin)",
        {"partition": PolicySpec("topk"), "predictor": PolicySpec("oracle"), "balancer": PolicySpec("round-robin")},
    ),
    "random": (
        "random placement: random hot set, random DIMM per neuron (the first step of Hermes' ablation)",
        {"partition": PolicySpec("random"), "predictor": PolicySpec("oracle"), "balancer": PolicySpec("random")},
    ),
    "ndp-only": (
        "every sparse neuron on the NDP-DIMMs, none on the GPU (dense projection still on the GPU)",
        {"partition": PolicySpec("none"), "predictor": PolicySpec("oracle"), "balancer": PolicySpec("round-robin")},
    ),
}


def system_names() -> list[str]:
    return sorted(SYSTEMS)


def system_policies(name: str) -> dict[str, PolicySpec]:
    if name not in SYSTEMS:
        raise unknown_name("system", name, SYSTEMS)
    return {role: PolicySpec(spec.name, dict(spec.params)) for role, spec in SYSTEMS[name][1].items()}
