"""Run configuration: one object that says what to simulate, loadable from YAML or flags.

Every pluggable slot is ``{name, params}``; params are checked against the plug-in's own
``Params`` dataclass, so a misspelt key fails at once with the valid keys. Dotted overrides
(``balancer.params.window=8``, ``cost.sync_us=5``, ``hardware.gpu.kernel_overhead_us=3``) set
any leaf and double as Optuna parameter names in sweeps.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, unknown_name

DEFAULT_SYSTEM = "hermes"
ROLES = ("partition", "predictor", "balancer")


@dataclass
class PolicySpec:
    """A pluggable slot: registry name plus parameters."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TraceSpec:
    """Where activations come from: a generator name ('skew', 'relullama7b', 'paper-relu'),
    ``fitted:PARAMS.yaml`` (a fit of a recorded trace, ``ndpsched trace fit``) or a .npz path."""

    source: str = "skew"
    top20_share: float = 0.8
    token_overlap: float = 0.9


@dataclass
class RunConfig:
    """Everything one ``ndpsched simulate`` run needs (all defaults are Hermes' evaluation set-up)."""

    system: str = DEFAULT_SYSTEM
    model: str = "llama2-70b"
    gpu: str = "rtx4090"
    dimms: int = 8
    batch: int = 1
    prompt_len: int = 128
    gen_len: int = 128
    seed: int = 0
    window_tokens: int = 5
    #: precision of the weights and of the KV cache: fp16 (the papers), bf16, int8, int4, fp32;
    #: every system is priced by the bytes it then moves and stores
    weight_dtype: str = "fp16"
    kv_dtype: str = "fp16"
    trace: TraceSpec = field(default_factory=TraceSpec)
    #: per-role policy overrides; a role left None takes the system's choice
    partition: PolicySpec | None = None
    predictor: PolicySpec | None = None
    balancer: PolicySpec | None = None
    #: CostParams overrides, e.g. {"sync_us": 5.0}
    cost: dict[str, Any] = field(default_factory=dict)
    #: hardware part overrides, e.g. {"gpu": {"kernel_overhead_us": 3.0}, "dimm": {...}}
    hardware: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: BaselineParams overrides for the baseline systems, e.g. {"zero_kv_offload": true}
    baseline: dict[str, Any] = field(default_factory=dict)
    #: execution mode: 'trace' (token-by-token simulation of an activation trace) or 'analytic'
    #: (expected activity from activation frequencies, see ndpsched.analytic; for design sweeps)
    mode: str = "trace"
    #: measured GPU profile (``ndpsched calibrate gpu``): a path or a shipped profile name; None
    #: keeps the GPU preset's own (the h100 preset names one), "" prices the GPU by roofline only.
    #: Stored as ``hardware.gpu.profile``, so every path that builds the hardware uses it.
    gpu_profile: str | None = None

    def __post_init__(self) -> None:
        # accept plain strings / mappings for the nested specs (YAML and Python callers)
        if isinstance(self.trace, str):
            self.trace = TraceSpec(source=self.trace)
        elif isinstance(self.trace, dict):
            _check_keys(self.trace, TraceSpec, "trace")
            self.trace = TraceSpec(**self.trace)
        for role in ROLES:
            value = getattr(self, role)
            if isinstance(value, str):
                setattr(self, role, PolicySpec(value))
            elif isinstance(value, dict):
                _check_keys(value, PolicySpec, role)
                setattr(self, role, PolicySpec(value.get("name", ""), dict(value.get("params") or {})))
        from .models import DTYPE_BYTES

        for name in ("weight_dtype", "kv_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise unknown_name(name, str(getattr(self, name)), DTYPE_BYTES)
        for name in ("batch", "prompt_len", "gen_len", "window_tokens", "dimms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.gpu_profile is not None:
            if not isinstance(self.gpu_profile, str):
                raise ConfigError(f"gpu_profile must be a file name or path, got {self.gpu_profile!r}")
            gpu_hw = dict(self.hardware.get("gpu") or {})
            if gpu_hw.get("profile", self.gpu_profile) != self.gpu_profile:
                raise ConfigError(f"gpu_profile '{self.gpu_profile}' and hardware.gpu.profile "
                                  f"'{gpu_hw['profile']}' disagree; set one of them")
            self.hardware = {**self.hardware, "gpu": {**gpu_hw, "profile": self.gpu_profile}}
        if self.mode not in ("trace", "analytic"):
            raise unknown_name("mode", str(self.mode), ("trace", "analytic"))
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")

    def load_model(self):
        """The model preset at this config's precision."""
        from .models import DTYPE_BYTES
        from .presets import load_model

        return load_model(self.model, weight_bytes=DTYPE_BYTES[self.weight_dtype], kv_bytes=DTYPE_BYTES[self.kv_dtype])

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        data = copy.deepcopy(dict(data))
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in valid:
                raise unknown_name("config key", key, valid)
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(load_yaml_mapping(path, "config file"))

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> "RunConfig":
        """Apply dotted ``key=value`` overrides (values parsed as YAML scalars)."""
        data = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides)
        for dotted, value in items:
            set_dotted(data, dotted, value)
        return RunConfig.from_dict(data)


def load_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping, or a one-line ConfigError naming ``what`` is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping of keys, got {type(data).__name__}")
    return data


def _split(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip(), parse_value(raw.strip())


def parse_value(raw: str) -> Any:
    """Parse a command-line value: int, then float (``4.6e5`` included), then a YAML scalar."""
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    try:
        return yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return raw


def _check_keys(values: dict[str, Any], cls: type, what: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in valid:
            raise unknown_name(f"key in {what}", key, valid)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set one leaf of a config dict by its dotted name; unknown keys are errors.

    Accepted: ``<top-level key>``, ``trace.<field>``, ``<role>.name``, ``<role>.params.<key>``,
    ``cost.<key>`` and ``hardware.<part>.<key>`` (the last three are checked by the object they
    configure when the run is built).
    """
    parts = dotted.split(".")
    top = parts[0]
    if top not in data:
        raise unknown_name("config key", dotted, list(data))
    if len(parts) == 1:
        data[top] = value
        if top == "gpu_profile":     # a new profile replaces the one folded into hardware.gpu
            (data.get("hardware") or {}).get("gpu", {}).pop("profile", None)
        return
    if top in ROLES:
        if data[top] is None:
            data[top] = {"name": "", "params": {}}
        if parts[1] == "name" and len(parts) == 2:
            data[top]["name"] = value
            return
        if parts[1] == "params" and len(parts) == 3:
            data[top]["params"][parts[2]] = value
            return
        raise ConfigError(f"'{dotted}': a policy slot takes {top}.name or {top}.params.<key>")
    if top == "trace" and len(parts) == 2:
        _check_keys({parts[1]: value}, TraceSpec, "trace")
        data["trace"][parts[1]] = value
        return
    if top in ("cost", "baseline") and len(parts) == 2:
        data[top][parts[1]] = value
        return
    if top == "hardware" and len(parts) == 3:
        data["hardware"].setdefault(parts[1], {})[parts[2]] = value
        return
    raise ConfigError(f"'{dotted}' is not a settable key: '{top}' takes no sub-key '{'.'.join(parts[1:])}'")
