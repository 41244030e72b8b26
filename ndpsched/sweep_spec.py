"""Sweep specification: what ``ndpsched sweep --config SWEEP.yaml`` reads, validated up front.

A sweep file is a mapping::

    name: hermes-constants            # study name and output folder name
    base: {model: llama2-13b, ...}    # a run configuration (mapping or a YAML path next to this file)
    objective: {kind: simulate, seeds: [0, 1, 2]}
    space:                            # dotted keys of the run configuration (or of the train kind)
      window_tokens: int[2, 16]
      predictor.params.lam: float[1, 10]
      hardware.dimm.ndp_multipliers: int[32, 512, log]
      gpu: choice[rtx4090, rtx3090]   # or a YAML list
    metrics: {tokens_per_s: max}      # one or more objectives, in order, with their directions
    constraints: {predictor_recall: ">= 0.7"}   # feasible trials only (TPE / NSGA-II constraints)
    sampler: {name: tpe, seed: 0}     # tpe (default, one metric), nsga2 (default, several), random
    pruner: {name: median}            # median, percentile, hyperband, none (trials that report)
    n_trials: 40
    max_retries: 1                    # Ray re-runs a trial whose worker died this many times
    holdout: {seeds: [100, 101]}      # after the sweep: tuned vs base configuration on these seeds

Every mistake is one line: an unknown key names the closest valid one (``errors.unknown_name``).
Nothing here imports Ray or Optuna.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import RunConfig
from .errors import ConfigError, NdpschedError, unknown_name

TOP_KEYS = ("name", "base", "objective", "space", "metrics", "constraints", "sampler", "pruner", "n_trials",
            "max_retries", "holdout", "output")
#: objective kinds: simulate (the execution model), train (RL training, ndpsched.train.train_policy),
#: test (a cheap analytic function with test hooks; used by the test suite and the scaling bench)
OBJECTIVE_KINDS = ("simulate", "train", "test")
OBJECTIVE_KEYS = {
    "simulate": ("kind", "seeds", "report_seeds", "test_crash_once_dir", "test_sleep_s"),
    "train": ("kind", "env_id", "algo", "timesteps", "seed", "eval_every", "env_kwargs", "hyperparams",
              "test_crash_once_dir", "test_sleep_s"),
    "test": ("kind", "steps", "sleep_s", "busy_s", "test_crash_once_dir", "test_sleep_s"),
}
#: metric name -> what it is; the simulate kind's metrics are means over the objective's seeds
METRICS = {
    "simulate": {
        "tokens_per_s": "generated tokens per second, prefill included (Hermes' metric)",
        "decode_ms_per_token": "decode time per step, ms",
        "decode_s": "decode time, s",
        "prefill_s": "prefill time, s",
        "dimm_imbalance": "slowest / mean DIMM time per stage",
        "hot_fraction": "share of neuron activations computed on the GPU",
        "cost_usd": "hardware cost, US$ (ndpsched/presets/prices.yaml)",
        "tokens_per_s_per_kusd": "tokens/s per 1000 US$ of hardware",
        "predictor_recall": "predictor recall (1 for the oracle)",
        "pcie_gb": "GB copied over PCIe by online moves",
        "sim_wall_s": "wall time of the simulation, s",
    },
    "train": {"score": "final mean evaluation reward (TrainResult.score)"},
    "test": {"value": "-(x - 3)^2 - (y + 1)^2 over the space's numeric keys x, y (test objective)",
             "cost": "x^2 + y^2 (a second, conflicting test objective)"},
}
DIRECTIONS = {"max": "maximize", "maximize": "maximize", "min": "minimize", "minimize": "minimize"}
SAMPLERS = ("tpe", "nsga2", "random")
PRUNERS = ("median", "percentile", "hyperband", "none")
SAMPLER_KEYS = {"tpe": ("name", "seed", "n_startup_trials", "multivariate"),
                "nsga2": ("name", "seed", "population_size"),
                "random": ("name", "seed")}
PRUNER_KEYS = {"median": ("name", "n_startup_trials", "n_warmup_steps"),
               "percentile": ("name", "percentile", "n_startup_trials", "n_warmup_steps"),
               "hyperband": ("name", "min_resource", "max_resource", "reduction_factor"),
               "none": ("name",)}

_RANGE = re.compile(r"^\s*(int|float|log|choice)\s*\[(.*)\]\s*$")


@dataclass(frozen=True)
class Param:
    """One search dimension: ``int[lo, hi]``, ``float[lo, hi]`` (``, log`` / ``, step=s``) or ``choice[...]``."""

    name: str
    kind: str                      # int, float, categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        """Draw this parameter from an Optuna trial (driver side)."""
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step) if self.step else 1)
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        return trial.suggest_categorical(self.name, list(self.choices))

    def example(self) -> Any:
        return self.choices[0] if self.kind == "categorical" else (int(self.low) if self.kind == "int" else self.low)


def parse_param(name: str, spec: Any) -> Param:
    """Parse one ``space`` entry; a YAML list is a categorical choice."""
    where = f"space '{name}'"
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: an empty list of choices")
        return Param(name, "categorical", choices=tuple(spec))
    if not isinstance(spec, str):
        raise ConfigError(f"{where}: expected 'int[lo, hi]', 'float[lo, hi]', 'float[lo, hi, log]', "
                          f"'choice[a, b]' or a list, got {spec!r}")
    m = _RANGE.match(spec)
    if not m:
        raise ConfigError(f"{where}: bad range syntax {spec!r}; expected 'int[lo, hi]', 'float[lo, hi]', "
                          "'float[lo, hi, log]', 'int[lo, hi, step=s]' or 'choice[a, b]'")
    kind, body = m.group(1), m.group(2)
    items = [x.strip() for x in body.split(",") if x.strip()]
    if kind == "choice":
        if not items:
            raise ConfigError(f"{where}: choice[] needs at least one value")
        return Param(name, "categorical", choices=tuple(yaml.safe_load(x) for x in items))
    log = kind == "log"
    kind = "float" if kind == "log" else kind
    if len(items) < 2:
        raise ConfigError(f"{where}: {spec!r} needs a low and a high bound")
    step = None
    for opt in items[2:]:
        if opt == "log":
            log = True
        elif opt.startswith("step="):
            step = _number(opt[5:], where)
        else:
            raise ConfigError(f"{where}: unknown range option {opt!r}; valid: log, step=<number>")
    low, high = _number(items[0], where), _number(items[1], where)
    if kind == "int" and (low != int(low) or high != int(high)):
        raise ConfigError(f"{where}: int bounds must be integers, got {items[0]}, {items[1]}")
    if not low < high:
        raise ConfigError(f"{where}: low {items[0]} must be below high {items[1]}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs a positive low bound, got {items[0]}")
    if log and step is not None:
        raise ConfigError(f"{where}: a range cannot be both log and stepped")
    return Param(name, kind, low, high, log, step)


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{where}: bound {text!r} must be finite")
    return value


@dataclass
class SweepSpec:
    """A validated sweep (see module doc)."""

    name: str
    base: dict[str, Any]
    objective: dict[str, Any]
    space: list[Param]
    metrics: list[tuple[str, str]]             # (metric, 'maximize' | 'minimize')
    constraints: list[tuple[str, str, float]] = field(default_factory=list)   # (metric, '>=' | '<=', bound)
    sampler: dict[str, Any] = field(default_factory=dict)
    pruner: dict[str, Any] = field(default_factory=dict)
    n_trials: int = 20
    max_retries: int = 1
    holdout: dict[str, Any] = field(default_factory=dict)
    output: str = ""

    @property
    def kind(self) -> str:
        return self.objective["kind"]

    @property
    def directions(self) -> list[str]:
        return [d for _, d in self.metrics]

    def run_config(self, params: dict[str, Any]) -> RunConfig:
        """The run configuration of a trial: base + the trial's dotted parameters (simulate kind)."""
        return RunConfig.from_dict(self.base).with_overrides(params)

    def to_payload(self) -> dict[str, Any]:
        """Plain data sent to Ray workers (pickles cheaply)."""
        return {"name": self.name, "base": self.base, "objective": self.objective,
                "metrics": [m for m, _ in self.metrics]}


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep YAML file; errors are one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file '{path}' must hold a mapping of keys")
    return parse_sweep(data, base_dir=path.parent, default_name=path.stem)


def parse_sweep(data: dict[str, Any], base_dir: Path | None = None, default_name: str = "sweep") -> SweepSpec:
    """Validate a sweep mapping (see module doc)."""
    for key in data:
        if key not in TOP_KEYS:
            raise unknown_name("sweep key", str(key), TOP_KEYS)
    for key in ("space", "metrics"):
        if not data.get(key):
            raise ConfigError(f"sweep: '{key}' is required and must not be empty")
    objective = dict(data.get("objective") or {"kind": "simulate"})
    objective.setdefault("kind", "simulate")
    kind = objective["kind"]
    if kind not in OBJECTIVE_KINDS:
        raise unknown_name("objective kind", str(kind), OBJECTIVE_KINDS)
    for key in objective:
        if key not in OBJECTIVE_KEYS[kind]:
            raise unknown_name(f"key of a '{kind}' objective", str(key), OBJECTIVE_KEYS[kind])
    if kind == "simulate":
        seeds = objective.setdefault("seeds", [0])
        _check_seeds(seeds, "objective.seeds")
    if kind == "train":
        for key in ("env_id", "algo", "timesteps"):
            if key not in objective:
                raise ConfigError(f"sweep: a 'train' objective needs '{key}'")
    base = data.get("base") or {}
    if isinstance(base, str):
        base_path = Path(base) if base_dir is None or Path(base).is_absolute() else Path(base_dir) / base
        base = RunConfig.from_yaml(base_path).to_dict()
    if not isinstance(base, dict):
        raise ConfigError("sweep: 'base' must be a run configuration mapping or a YAML path")
    if kind == "simulate":
        base = RunConfig.from_dict(base).to_dict()     # validates keys now
    if not isinstance(data["space"], dict):
        raise ConfigError("sweep: 'space' must map dotted keys to ranges, e.g. 'balancer.params.window: int[2, 16]'")
    space = [parse_param(str(k), v) for k, v in data["space"].items()]
    metrics_raw = data["metrics"]
    if isinstance(metrics_raw, str):
        metrics_raw = {metrics_raw: "max"}
    if isinstance(metrics_raw, list):
        raise ConfigError("sweep: 'metrics' must map each metric to max or min, e.g. {tokens_per_s: max}")
    metrics = []
    for metric, direction in metrics_raw.items():
        if metric not in METRICS[kind]:
            raise unknown_name(f"metric of a '{kind}' objective", str(metric), METRICS[kind])
        if str(direction) not in DIRECTIONS:
            raise unknown_name(f"direction of metric '{metric}'", str(direction), ("max", "min"))
        metrics.append((str(metric), DIRECTIONS[str(direction)]))
    constraints = _parse_constraints(data.get("constraints") or {}, kind)
    sampler = dict(data.get("sampler") or {})
    sampler.setdefault("name", "tpe" if len(metrics) == 1 else "nsga2")
    if sampler["name"] not in SAMPLERS:
        raise unknown_name("sampler", str(sampler["name"]), SAMPLERS)
    _check_sub(sampler, SAMPLER_KEYS[sampler["name"]], f"sampler '{sampler['name']}'")
    if constraints and sampler["name"] == "random":
        raise ConfigError("sweep: constraints need the tpe or nsga2 sampler")
    pruner = dict(data.get("pruner") or {"name": "none"})
    pruner.setdefault("name", "median")
    if pruner["name"] not in PRUNERS:
        raise unknown_name("pruner", str(pruner["name"]), PRUNERS)
    _check_sub(pruner, PRUNER_KEYS[pruner["name"]], f"pruner '{pruner['name']}'")
    if pruner["name"] != "none" and len(metrics) > 1:
        raise ConfigError("sweep: pruning works with one metric only; set pruner: {name: none}")
    n_trials = data.get("n_trials", 20)
    max_retries = data.get("max_retries", 1)
    for key, value, low in (("n_trials", n_trials, 1), ("max_retries", max_retries, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"sweep: {key} must be an integer >= {low}, got {value!r}")
    holdout = dict(data.get("holdout") or {})
    for key in holdout:
        if key != "seeds":
            raise unknown_name("holdout key", str(key), ["seeds"])
    if holdout:
        if kind != "simulate":
            raise ConfigError("sweep: 'holdout' applies to the simulate objective only")
        _check_seeds(holdout.get("seeds"), "holdout.seeds")
    spec = SweepSpec(name=str(data.get("name") or default_name), base=base, objective=objective, space=space,
                     metrics=metrics, constraints=constraints, sampler=sampler, pruner=pruner, n_trials=n_trials, max_retries=max_retries,
                     holdout=holdout, output=str(data.get("output") or ""))
    check_space(spec)
    return spec


def _parse_constraints(raw: Any, kind: str) -> list[tuple[str, str, float]]:
    """``{metric: ">= 0.7"}`` -> [(metric, '>=', 0.7)]."""
    if not isinstance(raw, dict):
        raise ConfigError("sweep: 'constraints' must map metrics to bounds, e.g. {predictor_recall: '>= 0.7'}")
    out = []
    for metric, bound in raw.items():
        if metric not in METRICS[kind]:
            raise unknown_name(f"metric of a '{kind}' objective", str(metric), METRICS[kind])
        m = re.match(r"^\s*(>=|<=)\s*(\S+)\s*$", str(bound))
        if not m:
            raise ConfigError(f"sweep: constraint on '{metric}' must look like '>= 0.7' or '<= 3000', got {bound!r}")
        out.append((str(metric), m.group(1), _number(m.group(2), f"constraint '{metric}'")))
    return out


def constraint_violations(constraints: list[tuple[str, str, float]], metrics: dict[str, float]) -> list[float]:
    """Optuna's convention: one value per constraint, <= 0 when it holds (missing metric: violated)."""
    out = []
    for metric, op, bound in constraints:
        value = metrics.get(metric)
        if value is None:
            out.append(float("inf"))
        else:
            out.append(bound - float(value) if op == ">=" else float(value) - bound)
    return out


def _check_seeds(seeds: Any, where: str) -> None:
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"sweep: {where} must be a non-empty list of non-negative integers, got {seeds!r}")


def _check_sub(values: dict[str, Any], valid: tuple[str, ...], what: str) -> None:
    for key in values:
        if key not in valid:
            raise unknown_name(f"key of {what}", str(key), valid)


def check_space(spec: SweepSpec) -> None:
    """Every space key must name something the trial can set: a run-configuration leaf whose
    policy, cost and hardware parameters exist (simulate), ``hyperparams.*`` / ``env_kwargs.*`` (train)."""
    names = [p.name for p in spec.space]
    if len(set(names)) != len(names):
        raise ConfigError("sweep: a space key appears twice")
    if spec.kind == "train":
        for p in spec.space:
            if p.name.split(".")[0] not in ("hyperparams", "env_kwargs") or "." not in p.name:
                raise ConfigError(f"space '{p.name}': a train objective searches 'hyperparams.<name>' or "
                                  "'env_kwargs.<name>'")
        return
    if spec.kind == "test":
        return
    # low end, high end and every choice: each must build (catches misspelt policy params at once)
    for p in spec.space:
        values = list(p.choices) if p.kind == "categorical" else [p.low, p.high]
        for value in values:
            if p.kind == "int":
                value = int(value)
            try:
                cfg = spec.run_config({p.name: value})
                validate_run_config(cfg)
            except NdpschedError as exc:
                raise type(exc)(f"space '{p.name}' = {value!r}: {exc}") from None


def validate_run_config(cfg: RunConfig) -> None:
    """Build everything of ``cfg`` that is cheap to build (policies, cost, hardware, model);
    raises the one-line error of the first bad key."""
    from .costmodel import CostParams
    from .presets import build_spec, load_hardware
    from .registry import registry
    from .run import resolve_policies

    cfg.load_model()
    load_hardware(cfg.gpu, cfg.dimms, overrides=cfg.hardware)
    build_spec(CostParams, cfg.cost, "cost parameters")
    for role, pspec in resolve_policies(cfg).items():
        registry(role).create(pspec.name, pspec.params)
