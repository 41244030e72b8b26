"""What one sweep trial computes, in a Ray worker: the objective kinds of ``ndpsched sweep``.

Everything here receives plain data (the sweep payload, the trial's parameters) and returns a
dict of metrics, so it pickles cheaply and runs the same in a local worker or on a cluster.

- ``simulate``: the run configuration ``base + params`` simulated once per seed of
  ``objective.seeds`` (training traces); metrics are the means over the seeds. Traces are cached per
  worker process, so a worker draws each seed's trace once for the whole sweep.
- ``train``: RL training through ``ndpsched.train.train_policy`` with the trial's hyperparameters;
  intermediate evaluation rewards go back to the driver (``report``), which decides pruning.
- ``test``: a cheap analytic function with knobs for the tests and the scaling bench.

Test hooks (any kind): ``test_crash_once_dir`` kills the worker process with SIGKILL on a trial's
first attempt (a marker file per trial records the attempt), ``test_sleep_s`` sleeps first.
"""
from __future__ import annotations

import os
import signal
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: report(step, value) -> True when the driver pruned the trial
Reporter = Callable[[int, float], bool]

_TRACE_CACHE: OrderedDict = OrderedDict()
_TRACE_CACHE_SIZE = 4


class Pruned(Exception):
    """Raised inside an objective when the driver pruned the trial."""

    def __init__(self, step: int) -> None:
        super().__init__(f"pruned at step {step}")
        self.step = step


def limit_threads() -> None:
    """One BLAS/OpenMP thread per worker: the parallelism is across trials. Also applies the
    workers' malloc settings (see :func:`ndpsched.ray_session.tune_malloc`)."""
    from .ray_session import tune_malloc

    tune_malloc()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(1)


def run_objective(payload: dict[str, Any], params: dict[str, Any], trial_number: int,
                  report: Reporter | None = None) -> dict[str, float]:
    """Evaluate one trial; returns its metrics. Raises :class:`Pruned` when pruned."""
    obj = payload["objective"]
    _test_hooks(obj, trial_number)
    kind = obj["kind"]
    if kind == "simulate":
        return simulate_objective(payload, params, report)
    if kind == "train":
        out = payload.get("out_dir")
        return train_objective(obj, params, report, out_dir=f"{out}/trials/trial-{trial_number}" if out else None)
    return quadratic_objective(obj, params, report)


def _test_hooks(obj: dict[str, Any], trial_number: int) -> None:
    if obj.get("test_sleep_s"):
        time.sleep(float(obj["test_sleep_s"]))
    crash_dir = obj.get("test_crash_once_dir")
    if crash_dir:
        marker = Path(crash_dir) / f"trial-{trial_number}.attempted"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


# ---- simulate ---------------------------------------------------------------------------------
def _cached_trace(cfg):
    """The trace ``cfg`` names, cached per process (keyed by everything that draws it)."""
    from .content_cache import lru_lookup
    from .run import load_trace

    key = (cfg.model, cfg.weight_dtype, cfg.prompt_len + cfg.gen_len, cfg.batch, cfg.seed,
           tuple(sorted(vars(cfg.trace).items())))
    return lru_lookup(_TRACE_CACHE, key, lambda: load_trace(cfg, cfg.load_model()), _TRACE_CACHE_SIZE)


def simulate_metrics(cfg) -> dict[str, float]:
    """Metrics of one simulated configuration (one seed)."""
    from .baselines import BASELINES
    from .run import simulate
    from .sweep_prices import hardware_cost_usd

    t0 = time.perf_counter()
    trace = None if cfg.mode == "analytic" or cfg.system in BASELINES else _cached_trace(cfg)
    res = simulate(cfg, trace)
    cost = hardware_cost_usd(cfg)["cost_usd"]
    return {
        "tokens_per_s": res.tokens_per_s,
        "decode_ms_per_token": 1e3 * res.decode_s / max(len(res.token_s), 1),
        "decode_s": res.decode_s,
        "prefill_s": res.prefill_s,
        "dimm_imbalance": res.dimm_imbalance,
        "hot_fraction": res.hot_fraction,
        "cost_usd": cost,
        "tokens_per_s_per_kusd": 1e3 * res.tokens_per_s / cost,
        "predictor_recall": float(res.predictor.get("recall", 1.0)),
        "pcie_gb": res.bytes_moved.get("pcie", 0.0) / 1e9,
        "sim_wall_s": time.perf_counter() - t0,
    }


def simulate_objective(payload: dict[str, Any], params: dict[str, Any], report: Reporter | None = None,
                       seeds: list[int] | None = None) -> dict[str, float]:
    """Mean metrics of ``base + params`` over ``seeds`` (default: the objective's training seeds).

    With ``report``, the running mean of the first metric is reported after every seed (step =
    seeds done), so a pruner can stop a poor configuration before all seeds ran.
    """
    from .config import RunConfig

    obj = payload["objective"]
    seeds = list(seeds if seeds is not None else obj.get("seeds", [0]))
    base = RunConfig.from_dict(payload["base"]).with_overrides(params)
    first = payload["metrics"][0]
    rows = []
    for i, seed in enumerate(seeds):
        rows.append(simulate_metrics(base.with_overrides({"seed": seed})))
        more = i + 1 < len(seeds)
        if (report is not None and obj.get("report_seeds", True) and more
                and report(i + 1, float(np.mean([r[first] for r in rows])))):
            raise Pruned(i + 1)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


# ---- train ------------------------------------------------------------------------------------
def _nested(params: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        head, _, rest = key.partition(".")
        if head == prefix:
            out[rest] = value
    return out


def train_objective(obj: dict[str, Any], params: dict[str, Any], report: Reporter | None = None,
                    out_dir: str | None = None) -> dict[str, float]:
    """Train with ``ndpsched.train.train_policy``; ``score`` is its final mean evaluation reward.

    The trial's model goes to ``out_dir`` (the sweep's ``trials/trial-N``)."""
    try:
        from .train import train_policy
    except ImportError as exc:
        from .errors import ConfigError

        raise ConfigError(f"the train objective needs ndpsched.train.train_policy ({exc})") from None
    try:
        import torch

        torch.set_num_threads(1)      # small MLPs: one thread per trial, trials in parallel
    except ImportError:
        pass
    hyper = {**(obj.get("hyperparams") or {}), **_nested(params, "hyperparams")}
    env_kwargs = {**(obj.get("env_kwargs") or {}), **_nested(params, "env_kwargs")}
    pruned_at: list[int] = []

    def on_eval(timesteps_done: int, mean_reward: float) -> bool:
        if report is not None and report(int(timesteps_done), float(mean_reward)):
            pruned_at.append(int(timesteps_done))
            return True
        return False

    result = train_policy(obj["env_id"], obj["algo"], timesteps=int(obj["timesteps"]), seed=int(obj.get("seed", 0)),
                          hyperparams=hyper, env_kwargs=env_kwargs, out_dir=out_dir,
                          eval_every=int(obj.get("eval_every", 0)), on_eval=on_eval)
    if pruned_at:
        raise Pruned(pruned_at[0])
    return {"score": float(result.score)}


# ---- test -------------------------------------------------------------------------------------
def quadratic_objective(obj: dict[str, Any], params: dict[str, Any], report: Reporter | None = None) -> dict[str, float]:
    """``value = -(x - 3)^2 - (y + 1)^2``, ``cost = x^2 + y^2`` over numeric params x, y (0 if absent).

    ``steps`` > 0 reports ``value * (1 - 0.5 / step)`` at steps 1..steps (a learning curve for
    the pruner); ``busy_s`` spins the CPU in numpy for that long (the scaling bench's stand-in);
    ``sleep_s`` sleeps.
    """
    x = float(params.get("x", 0.0))
    y = float(params.get("y", 0.0))
    value = -(x - 3.0) ** 2 - (y + 1.0) ** 2
    if obj.get("sleep_s"):
        time.sleep(float(obj["sleep_s"]))
    if obj.get("busy_s"):
        end = time.perf_counter() + float(obj["busy_s"])
        a = np.random.default_rng(0).random((64, 64))
        while time.perf_counter() < end:
            a = np.tanh(a @ a.T / 64.0)
    for step in range(1, int(obj.get("steps", 0)) + 1):
        if report is not None and report(step, value * (1.0 - 0.5 / step)):
            raise Pruned(step)
    return {"value": value, "cost": x * x + y * y}
