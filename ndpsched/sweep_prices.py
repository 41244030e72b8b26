"""Hardware cost in US$ of a run configuration, from ``ndpsched/presets/prices.yaml``.

``cost_usd = GPU + n_dimms x (module + NDP buffer chip + multipliers + DIMM-link)``; the module's
price scales with its capacity and data rate. Each price in the YAML names its source and says
where it is an estimate. The host is the same for every design point and is left out.
"""
from __future__ import annotations

from typing import Any

from .config import RunConfig
from .errors import unknown_name


def load_prices() -> dict[str, Any]:
    """The price table (cached by the preset loader)."""
    from .presets import _load_yaml

    return _load_yaml("prices.yaml")


def hardware_cost_usd(cfg: RunConfig) -> dict[str, float]:
    """Cost breakdown of ``cfg``'s machine: gpu_usd, dimm_usd (each), dimms_usd, cost_usd (total)."""
    from .presets import load_hardware

    prices = load_prices()
    gpus = prices["gpu"]
    if cfg.gpu not in gpus:
        raise unknown_name("GPU in prices.yaml", cfg.gpu, gpus)
    hw = load_hardware(cfg.gpu, cfg.dimms, overrides=cfg.hardware)
    d = prices["dimm"]
    module = d["module"]
    rate_factor = 1.0 + d["data_rate_premium_per_1600_mtps"]["fraction"] * (
        (hw.dimm.data_rate_mtps - module["data_rate_mtps"]) / 1600.0)
    module_usd = module["price_usd"] * hw.dimm.capacity_bytes / float(module["capacity_bytes"]) * rate_factor
    ndp_usd = d["ndp_buffer_chip"]["price_usd"] + d["ndp_multiplier"]["price_usd"] * hw.dimm.ndp_multipliers
    link_usd = d["dimm_link_per_gbps"]["price_usd"] * hw.dimm_link.bw_gbps
    dimm_usd = module_usd + ndp_usd + link_usd
    gpu_usd = float(gpus[cfg.gpu]["price_usd"])
    return {"gpu_usd": gpu_usd, "dimm_usd": dimm_usd, "dimms_usd": hw.n_dimms * dimm_usd,
            "cost_usd": gpu_usd + hw.n_dimms * dimm_usd}
