"""Load hardware and model presets shipped as YAML under ``ndpsched/presets/``.

Presets are data: a user adds a GPU or model by passing a mapping (or a YAML file of their own)
with the same keys; every key is checked against the spec dataclass.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from importlib import resources
from typing import Any

import yaml

from .errors import ConfigError, unknown_name
from .hardware import DimmLinkSpec, DimmSpec, DiskSpec, GpuSpec, HardwareSpec, HostCpuSpec, PcieSpec
from .models import ModelSpec

DEFAULT_GPU = "rtx4090"
DEFAULT_DIMM = "ddr4-3200-ndp"
DEFAULT_HOST = "i9-13900k"
DEFAULT_DISK = "nvme-gen4"
DEFAULT_N_DIMMS = 8  # Hermes Table II: 8 NDP-DIMMs

#: a toy machine (RunConfig keys) for tests, examples and warm-ups, not a real one: the tiny
#: model on a 260 KB GPU with the GPU's per-stage overheads (kernel launch, sync) cut to 0.1 us,
#: so that even its tiny layers split neurons between GPU and DIMMs and every scheduling step
#: has work (the envs' 'tiny' preset; ``ndpsched bench`` warms the compiled loops up on it)
TINY_SPLIT: dict[str, Any] = {"model": "tiny", "gpu": "tiny-gpu", "dimms": 4, "prompt_len": 16, "gen_len": 40,
                              "cost": {"sync_us": 0.1}, "hardware": {"gpu": {"kernel_overhead_us": 0.1}}}


@functools.lru_cache(maxsize=None)
def _load_yaml(filename: str) -> dict[str, Any]:
    text = resources.files("ndpsched").joinpath("presets", filename).read_text()
    return yaml.safe_load(text)


def build_spec(cls: type, values: Mapping[str, Any], what: str):
    """Instantiate ``cls`` from a mapping, naming any unknown key and the valid ones.

    Numeric fields accept numbers written as strings (YAML 1.1 reads ``24.0e9`` as a string).
    """
    types = {f.name: f.type for f in dataclasses.fields(cls) if f.init}
    values = dict(values)
    for key, value in values.items():
        if key not in types:
            raise unknown_name(f"key in {what}", key, list(types))
        kind = types[key] if isinstance(types[key], str) else getattr(types[key], "__name__", "")
        if kind in ("float", "int") and not isinstance(value, bool):
            try:
                values[key] = float(value) if kind == "float" else _as_int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{what}: {key} must be a number, got {value!r}") from None
        elif kind == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{what}: {key} must be true or false, got {value!r}")
    try:
        return cls(**values)
    except TypeError as exc:  # a missing required field
        raise ConfigError(f"{what}: {exc}") from None


def _as_int(value: Any) -> int:
    number = float(value)
    if number != int(number):
        raise ValueError(value)
    return int(number)


def gpu_names() -> list[str]:
    return sorted(_load_yaml("gpus.yaml"))


def model_names() -> list[str]:
    return sorted(_load_yaml("models.yaml"))


def dimm_names() -> list[str]:
    return sorted(_load_yaml("platform.yaml")["dimm"])


def load_gpu(name: str, **overrides: Any) -> GpuSpec:
    table = _load_yaml("gpus.yaml")
    if name not in table:
        raise unknown_name("GPU", name, table)
    return build_spec(GpuSpec, {"name": name, **table[name], **overrides}, f"GPU preset '{name}'")


def load_model(name: str, **overrides: Any) -> ModelSpec:
    table = _load_yaml("models.yaml")
    if name not in table:
        raise unknown_name("model", name, table)
    return build_spec(ModelSpec, {"name": name, **table[name], **overrides}, f"model preset '{name}'")


def load_dimm(name: str = DEFAULT_DIMM, **overrides: Any) -> DimmSpec:
    table = _load_yaml("platform.yaml")["dimm"]
    if name not in table:
        raise unknown_name("DIMM", name, table)
    return build_spec(DimmSpec, {"name": name, **table[name], **overrides}, f"DIMM preset '{name}'")


def load_hardware(
    gpu: str = DEFAULT_GPU,
    n_dimms: int = DEFAULT_N_DIMMS,
    dimm: str = DEFAULT_DIMM,
    pcie_gen: int | None = None,
    host: str = DEFAULT_HOST,
    disk: str = DEFAULT_DISK,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> HardwareSpec:
    """Assemble a :class:`HardwareSpec` from presets.

    Args:
        gpu: GPU preset name.
        n_dimms: number of NDP-DIMMs (1-16).
        dimm: DIMM preset name.
        pcie_gen: PCIe generation; default the GPU's own.
        host: host CPU preset name.
        disk: NVMe disk preset name (the slowest memory tier).
        overrides: per-part field overrides, e.g. ``{"gpu": {"kernel_overhead_us": 3.0},
            "dimm": {"bw_efficiency": 0.8}, "dimm_link": {...}, "pcie": {...}, "host": {...}}``.
    """
    overrides = dict(overrides or {})
    parts = ("gpu", "dimm", "dimm_link", "pcie", "host", "disk")
    for key in overrides:
        if key not in parts:
            raise unknown_name("hardware part", key, parts)
    platform = _load_yaml("platform.yaml")
    gpu_spec = load_gpu(gpu, **overrides.get("gpu", {}))
    dimm_spec = load_dimm(dimm, **overrides.get("dimm", {}))
    link = build_spec(DimmLinkSpec, {**platform["dimm_link"], **overrides.get("dimm_link", {})}, "dimm_link")
    pcie_values = {"gen": pcie_gen or gpu_spec.pcie_gen, **platform["pcie"], **overrides.get("pcie", {})}
    pcie = build_spec(PcieSpec, pcie_values, "pcie")
    hosts = platform["host"]
    if host not in hosts:
        raise unknown_name("host CPU", host, hosts)
    host_spec = build_spec(HostCpuSpec, {"name": host, **hosts[host], **overrides.get("host", {})}, f"host '{host}'")
    disks = platform["disk"]
    if disk not in disks:
        raise unknown_name("disk", disk, disks)
    disk_spec = build_spec(DiskSpec, {"name": disk, **disks[disk], **overrides.get("disk", {})}, f"disk '{disk}'")
    return HardwareSpec(gpu=gpu_spec, dimm=dimm_spec, n_dimms=n_dimms, dimm_link=link, pcie=pcie, host=host_spec,
                        disk=disk_spec)
