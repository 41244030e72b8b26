"""``ndpsched sweep``: an Optuna search whose trials run as Ray tasks.

Design (see docs/sweeps.md):

- **Driver-only ask/tell.** Only this process talks to the Optuna storage: it asks for a trial,
  draws its parameters, submits the trial as a Ray task, and tells the result when the task
  returns. Workers never open the storage, so a SQLite file (the default) never sees two writers.
  ``sqlite:///``, any SQLAlchemy URL, or ``journal:PATH`` (Optuna's journal file storage) work.
- **Resume.** The study is created with ``load_if_exists=True``: the same command continues it.
  Trials already finished are kept and not re-run; the budget ``n_trials`` counts them. Optuna's
  heartbeats do not apply to driver-side ask/tell (no worker holds the trial open), so a trial left
  RUNNING by a killed driver is recovered explicitly: on start, every RUNNING trial whose driver
  (host, pid) is not alive is told FAIL and its parameters are enqueued again (the new trial's
  user attribute ``ndpsched_retry_of`` names the old one, which then no longer counts).
- **Worker death.** Trials are submitted with ``max_retries``: Ray re-runs a task whose worker
  process died. When retries run out the trial is told FAIL and the sweep goes on. An exception
  raised by the objective (e.g. a configuration that does not fit memory) fails that trial only.
- **Pruning.** A trial reports intermediate values to a small Ray actor; the driver drains it,
  calls ``trial.report`` / ``trial.should_prune`` and answers; the worker waits for the answer, so
  pruning decisions are the same as in a sequential Optuna loop.
- **Reproducibility.** With ``--workers 1`` trials run one after another and a seeded sampler gives
  the same parameters and results on every run. With several workers the sampler sees results in
  completion order, which is not deterministic (parallel TPE is not reproducible).
"""
from __future__ import annotations

import csv
import logging
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .ray_session import init_ray
from .sweep_spec import SweepSpec

log = logging.getLogger(__name__)

RETRY_ATTR = "ndpsched_retry_of"
DRIVER_ATTR = "ndpsched_driver"
ERROR_ATTR = "ndpsched_error"
#: user attribute holding a finished trial's metrics (and its ``wall_s``) as one dict: one storage
#: write instead of one per metric (12 a trial: 37 -> 23 ms of the driver's SQLite time a trial)
METRICS_ATTR = "ndpsched_metrics"


def trial_metrics(trial) -> dict[str, float]:
    """A trial's metrics (and ``wall_s``): from :data:`METRICS_ATTR`, or, for trials of a study
    written by an earlier ndpsched, from one user attribute per metric."""
    attrs = trial.user_attrs
    if METRICS_ATTR in attrs:
        return dict(attrs[METRICS_ATTR])
    return {k: v for k, v in attrs.items() if k not in (DRIVER_ATTR, ERROR_ATTR, RETRY_ATTR)}
#: seconds a worker waits for the driver's pruning decision before it goes on
PRUNE_ANSWER_TIMEOUT_S = 120.0


@dataclass
class SweepOutcome:
    """What a finished (or resumed) sweep produced."""

    out_dir: Path
    study_name: str
    storage: str
    n_complete: int
    n_pruned: int
    n_failed: int
    n_recovered: int
    best_params: dict[str, Any] | None
    best_values: list[float] | None
    files: dict[str, str] = field(default_factory=dict)
    holdout: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0


# ---- storage, sampler, pruner -------------------------------------------------------------------
def make_storage(url: str):
    """An Optuna storage from a URL: ``sqlite:///file.db``, another SQLAlchemy URL, or ``journal:PATH``."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise ConfigError(f"storage '{url}' must be a database URL (sqlite:///file.db, postgresql://...) "
                          "or journal:PATH")
    if not url.startswith("sqlite:///"):
        return optuna.storages.RDBStorage(url)
    Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    import sqlalchemy

    storage = optuna.storages.RDBStorage(url)
    # write-ahead log, synced at checkpoints: a killed driver loses nothing (only a power cut can
    # lose the last commits), and every ask / tell commits about 1.5x faster, which is the
    # driver's limit on trials per second when many workers run short trials
    sqlalchemy.event.listen(storage.engine, "connect", _sqlite_wal)
    storage.engine.dispose()          # connections opened before the listener are not reused
    return storage


def _sqlite_wal(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _has_set_constraint() -> bool:
    """Optuna >= 5 takes constraint values per trial (``Trial.set_constraint``)."""
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def _constraints_func(constraints, trial) -> list[float]:
    from .sweep_spec import constraint_violations

    return constraint_violations(constraints, trial_metrics(trial))


def make_sampler(spec: SweepSpec):
    import functools

    import optuna

    s = dict(spec.sampler)
    name = s.pop("name")
    if spec.constraints and not _has_set_constraint():   # Optuna < 5: the sampler computes them
        s["constraints_func"] = functools.partial(_constraints_func, spec.constraints)
    if name == "tpe":
        return optuna.samplers.TPESampler(**s)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(**s)
    return optuna.samplers.RandomSampler(**s)


def make_pruner(spec: SweepSpec):
    import optuna

    p = dict(spec.pruner)
    name = p.pop("name")
    if name == "median":
        return optuna.pruners.MedianPruner(**p)
    if name == "percentile":
        return optuna.pruners.PercentilePruner(**p)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(**p)
    return optuna.pruners.NopPruner()


# ---- Ray side -------------------------------------------------------------------------------------
_remote_fns: dict[str, Any] = {}


def _remotes():
    """The Ray task and actor, defined once per process (Ray must be importable only when used)."""
    if _remote_fns:
        return _remote_fns["task"], _remote_fns["broker"]
    import ray

    @ray.remote(num_cpus=0)
    class PruneBroker:
        """Mailbox between workers (reports) and the driver (pruning decisions)."""

        def __init__(self) -> None:
            self.reports: list[tuple[int, int, float]] = []
            self.decisions: dict[tuple[int, int], bool] = {}

        def report(self, number: int, step: int, value: float) -> None:
            self.reports.append((number, step, value))

        def drain(self) -> list[tuple[int, int, float]]:
            out, self.reports = self.reports, []
            return out

        def decide(self, number: int, step: int, prune: bool) -> None:
            self.decisions[(number, step)] = prune

        def decision(self, number: int, step: int):
            return self.decisions.pop((number, step), None)

    @ray.remote(num_cpus=1)
    def run_trial(payload: dict[str, Any], params: dict[str, Any], number: int, broker) -> dict[str, Any]:
        from .sweep_objectives import Pruned, limit_threads, run_objective

        limit_threads()
        report = None
        if broker is not None:
            def report(step: int, value: float) -> bool:
                ray.get(broker.report.remote(number, step, value))
                deadline = time.monotonic() + PRUNE_ANSWER_TIMEOUT_S
                while time.monotonic() < deadline:
                    answer = ray.get(broker.decision.remote(number, step))
                    if answer is not None:
                        return bool(answer)
                    time.sleep(0.02)
                return False
        t0 = time.perf_counter()
        try:
            metrics = run_objective(payload, params, number, report)
        except Pruned as exc:
            return {"pruned": True, "step": exc.step, "wall_s": time.perf_counter() - t0}
        return {"pruned": False, "metrics": metrics, "wall_s": time.perf_counter() - t0}

    _remote_fns.update(task=run_trial, broker=PruneBroker)
    return run_trial, PruneBroker


# ---- resume ---------------------------------------------------------------------------------------
def _driver_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _driver_alive(driver: str | None) -> bool:
    """Whether the driver that asked a trial still runs (only checkable on this host)."""
    if not driver:
        return False
    host, _, pid = driver.rpartition(":")
    if host != socket.gethostname():
        return True      # another machine's driver: leave its trials alone
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale_trials(study) -> int:
    """Fail trials left RUNNING by a dead driver and enqueue their parameters again; returns how many."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _driver_alive(t.user_attrs.get(DRIVER_ATTR)):
            continue
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={RETRY_ATTR: t.number})
        log.info("trial %d was RUNNING under a driver that died: marked FAIL, parameters enqueued again", t.number)
        n += 1
    return n


def counted_trials(study) -> list:
    """Finished trials that count towards ``n_trials`` (a FAIL that was re-enqueued does not)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    superseded = {t.user_attrs[RETRY_ATTR] for t in trials if RETRY_ATTR in t.user_attrs}
    return [t for t in trials if t.state.is_finished() and not (t.state == TrialState.FAIL and t.number in superseded)]


# ---- the sweep ----------------------------------------------------------------------------------
def run_sweep(spec: SweepSpec, *, workers: int | None = None, address: str | None = None, storage: str | None = None,
              study_name: str | None = None, n_trials: int | None = None, out_dir: str | Path | None = None,
              progress: bool = False) -> SweepOutcome:
    """Run (or resume) a sweep; writes trials.csv, best.yaml and plots into ``out_dir``."""
    import optuna

    wall0 = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(out_dir or spec.output or Path("runs") / "sweeps" / spec.name)
    out.mkdir(parents=True, exist_ok=True)
    storage_url = storage or f"sqlite:///{out / 'study.db'}"
    name = study_name or spec.name
    budget = n_trials if n_trials is not None else spec.n_trials
    study = optuna.create_study(storage=make_storage(storage_url), sampler=make_sampler(spec),
                                pruner=make_pruner(spec), study_name=name, directions=spec.directions,
                                load_if_exists=True)
    n_recovered = recover_stale_trials(study)
    done = len(counted_trials(study))
    if done < budget:         # else nothing is left to run: only the outputs are rewritten
        _run_trials(study, spec, out, budget, done, workers, address, progress, name)
    outcome = write_outputs(study, spec, out)
    outcome.storage = storage_url
    outcome.n_recovered = n_recovered
    if spec.holdout and (done < budget or not (out / "holdout.csv").exists()):
        outcome.holdout = evaluate_holdout(spec, outcome.best_params or {}, workers, address)
        outcome.files["holdout"] = str(_write_rows(out / "holdout.csv", outcome.holdout))
    elif spec.holdout:
        outcome.files["holdout"] = str(out / "holdout.csv")
    outcome.wall_s = time.perf_counter() - wall0
    return outcome


def _run_trials(study, spec: SweepSpec, out: Path, budget: int, done: int, workers: int | None,
                address: str | None, progress: bool, name: str) -> None:
    """The ask / submit / wait / tell loop until ``budget`` trials count (see module doc)."""
    import ray

    started_ray = init_ray(workers, address)
    n_slots = workers or max(int(ray.available_resources().get("CPU", 1)), 1)
    # with many workers, a few trials wait queued in Ray so that a worker that finishes starts the
    # next trial at once instead of waiting for the driver's tell + ask (tens of ms of SQLite
    # writes); below 8 workers every trial is asked only when a worker is free
    n_queued = n_slots + n_slots // 8
    run_trial, PruneBroker = _remotes()
    use_pruner = spec.pruner.get("name", "none") != "none"
    broker = PruneBroker.remote() if use_pruner else None
    payload_ref = ray.put({**spec.to_payload(), "out_dir": str(out.resolve())})
    pending: dict[Any, Any] = {}        # ObjectRef -> optuna Trial
    by_number: dict[int, Any] = {}
    reported: dict[int, set] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=budget, initial=min(done, budget), desc=f"sweep {name}", unit="trial", file=sys.stderr)
    try:
        while done < budget or pending:
            while len(pending) < n_queued and done + len(pending) < budget:
                trial = study.ask()
                params = {p.name: p.suggest(trial) for p in spec.space}
                ref = run_trial.options(max_retries=spec.max_retries, retry_exceptions=False).remote(
                    payload_ref, params, trial.number, broker)
                # after the submission (one SQLite write less before a free worker starts): a
                # trial that a killed driver left without it counts as stale all the same
                trial.set_user_attr(DRIVER_ATTR, _driver_id())
                pending[ref] = trial
                by_number[trial.number] = trial
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.05 if use_pruner else 1.0)
            if broker is not None:
                _answer_reports(study, broker, by_number, reported)
            for ref in ready:
                trial = pending.pop(ref)
                by_number.pop(trial.number, None)
                _tell(study, trial, ref, spec)
                done += 1
                if bar is not None:
                    bar.update(1)
                    _postfix(bar, study, spec)
    finally:
        if bar is not None:
            bar.close()
        if pending:   # interrupted (Ctrl-C, SIGTERM): fail the running trials, enqueue them again
            from optuna.trial import TrialState

            for ref, trial in pending.items():
                ray.cancel(ref, force=True)
                study.tell(trial, state=TrialState.FAIL)
                study.enqueue_trial(trial.params, user_attrs={RETRY_ATTR: trial.number})
        if started_ray:
            ray.shutdown()


def _answer_reports(study, broker, by_number: dict[int, Any], reported: dict[int, set]) -> None:
    import ray

    for number, step, value in ray.get(broker.drain.remote()):
        trial = by_number.get(number)
        if trial is None:
            ray.get(broker.decide.remote(number, step, False))
            continue
        steps = reported.setdefault(number, set())
        if step not in steps:      # a retried task reports its steps again
            trial.report(value, step)
            steps.add(step)
        ray.get(broker.decide.remote(number, step, bool(trial.should_prune())))


def _tell(study, trial, ref, spec: SweepSpec) -> None:
    import ray
    from optuna.trial import TrialState

    try:
        result = ray.get(ref)
    except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError, ray.exceptions.RayError) as exc:
        cause = getattr(exc, "cause", None) or exc
        message = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        trial.set_user_attr(ERROR_ATTR, f"{type(cause).__name__}: {message}"[:500])
        log.warning("trial %d failed: %s", trial.number, message)
        study.tell(trial, state=TrialState.FAIL)
        return
    if result["pruned"]:
        trial.set_user_attr(METRICS_ATTR, {"wall_s": float(result["wall_s"])})
        study.tell(trial, state=TrialState.PRUNED)
        return
    metrics = result["metrics"]
    trial.set_user_attr(METRICS_ATTR, {**{k: float(v) for k, v in metrics.items()}, "wall_s": float(result["wall_s"])})
    if spec.constraints and _has_set_constraint():
        from .sweep_spec import constraint_violations

        for (metric, op, bound), v in zip(spec.constraints, constraint_violations(spec.constraints, metrics)):
            trial.set_constraint(f"{metric} {op} {bound:g}", float(min(v, 1e300)))
    values = [float(metrics[m]) for m, _ in spec.metrics]
    if not all(math.isfinite(v) for v in values):
        trial.set_user_attr(ERROR_ATTR, f"non-finite objective values {values}")
        study.tell(trial, state=TrialState.FAIL)
        return
    study.tell(trial, values)


def _postfix(bar, study, spec: SweepSpec) -> None:
    try:
        best = best_trials(study, spec)
        if len(spec.metrics) == 1 and best:
            bar.set_postfix_str(f"best {spec.metrics[0][0]}={best[0].values[0]:.4g}")
        elif best:
            bar.set_postfix_str(f"pareto {len(best)}")
    except ValueError:   # no completed trial yet
        pass


# ---- outputs --------------------------------------------------------------------------------------
def trial_rows(study, spec: SweepSpec | None = None) -> list[dict[str, Any]]:
    """One flat row per trial: number, state, objective values, params, metrics, error."""
    rows = []
    trials = study.get_trials(deepcopy=False)
    rerun_as = {t.user_attrs[RETRY_ATTR]: t.number for t in trials if RETRY_ATTR in t.user_attrs}
    for t in trials:
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        for i, v in enumerate(t.values or []):
            row[f"value_{i}"] = v
        row.update({f"param.{k}": v for k, v in t.params.items()})
        row.update({f"metric.{k}": v for k, v in trial_metrics(t).items()})
        if spec is not None and spec.constraints:
            row["feasible"] = t.state.name == "COMPLETE" and feasible(t, spec)
        row["retry_of"] = t.user_attrs.get(RETRY_ATTR, "")
        row["error"] = t.user_attrs.get(ERROR_ATTR, "")
        if not row["error"] and t.number in rerun_as:
            row["error"] = f"stopped while running (driver died or was interrupted); re-run as trial {rerun_as[t.number]}"
        row["duration_s"] = t.duration.total_seconds() if t.duration else ""
        rows.append(row)
    return rows


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def feasible(trial, spec: SweepSpec) -> bool:
    """Whether a trial meets the sweep's constraints (always, without constraints)."""
    from .sweep_spec import constraint_violations

    return all(v <= 0 for v in constraint_violations(spec.constraints, trial_metrics(trial)))


def best_trials(study, spec: SweepSpec) -> list:
    """Single objective: [best]; several: the Pareto front, best first metric first.
    Only trials that meet the constraints count."""
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if feasible(t, spec)]
    if not complete:
        return []
    signs = [1.0 if d == "maximize" else -1.0 for _, d in spec.metrics]
    if len(spec.metrics) == 1:
        return [max(complete, key=lambda t: signs[0] * t.values[0])]

    def dominated(a, b) -> bool:      # b dominates a
        ge = all(sb * vb >= sa * va for sa, va, sb, vb in zip(signs, a.values, signs, b.values))
        return ge and any(s * vb > s * va for s, va, vb in zip(signs, a.values, b.values))
    front, seen = [], set()
    for t in complete:
        key = (tuple(t.values), tuple(sorted((k, repr(v)) for k, v in t.params.items())))
        if key not in seen and not any(dominated(t, o) for o in complete):   # NSGA-II may repeat a point
            seen.add(key)
            front.append(t)
    return sorted(front, key=lambda t: -signs[0] * t.values[0])


def best_config(spec: SweepSpec, params: dict[str, Any]) -> dict[str, Any]:
    """The runnable configuration of a trial's parameters (simulate: a RunConfig mapping)."""
    if spec.kind == "simulate":
        return spec.run_config(params).to_dict()
    if spec.kind == "train":
        obj = {k: v for k, v in spec.objective.items() if not k.startswith("test_")}
        from .sweep_objectives import _nested

        obj["hyperparams"] = {**(obj.get("hyperparams") or {}), **_nested(params, "hyperparams")}
        obj["env_kwargs"] = {**(obj.get("env_kwargs") or {}), **_nested(params, "env_kwargs")}
        return obj
    return dict(params)


def write_outputs(study, spec: SweepSpec, out: Path) -> SweepOutcome:
    """trials.csv, best.yaml (+ pareto/ for several metrics) and plots; returns the outcome."""
    from optuna.trial import TrialState

    files = {"trials_csv": str(_write_rows(out / "trials.csv", trial_rows(study, spec)))}
    best = best_trials(study, spec)
    if best:
        header = (f"# best trial {best[0].number} of sweep '{spec.name}': "
                  + ", ".join(f"{m} = {v:.6g}" for (m, _), v in zip(spec.metrics, best[0].values)) + "\n")
        if spec.kind == "simulate":
            header += "# run it: ndpsched simulate --config best.yaml\n"
        (out / "best.yaml").write_text(header + yaml.safe_dump(best_config(spec, best[0].params), sort_keys=False))
        files["best_yaml"] = str(out / "best.yaml")
        if len(spec.metrics) > 1:
            front = out / "pareto"
            front.mkdir(exist_ok=True)
            for old in front.glob("trial-*.yaml"):   # a resumed sweep's front replaces the last one
                old.unlink()
            rows = []
            for t in best:
                (front / f"trial-{t.number}.yaml").write_text(yaml.safe_dump(best_config(spec, t.params), sort_keys=False))
                rows.append({"number": t.number, **{m: v for (m, _), v in zip(spec.metrics, t.values)},
                             **{f"param.{k}": v for k, v in t.params.items()}})
            files["pareto_csv"] = str(_write_rows(out / "pareto.csv", rows))
    files.update(write_plots(study, spec, out))
    trials = study.get_trials(deepcopy=False)
    counted = counted_trials(study)
    return SweepOutcome(
        out_dir=out, study_name=study.study_name, storage="",
        n_complete=sum(t.state == TrialState.COMPLETE for t in counted),
        n_pruned=sum(t.state == TrialState.PRUNED for t in counted),
        n_failed=sum(t.state == TrialState.FAIL for t in counted),
        n_recovered=sum(RETRY_ATTR in t.user_attrs for t in trials),
        best_params=dict(best[0].params) if best else None, best_values=list(best[0].values) if best else None,
        files=files)


def write_plots(study, spec: SweepSpec, out: Path) -> dict[str, str]:
    """Optimisation history, parameter importances and (two metrics) the Pareto front, as PNGs."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    files: dict[str, str] = {}
    if not complete:
        return files
    plots = []
    for i, (metric, _) in enumerate(spec.metrics):
        target = None if len(spec.metrics) == 1 else (lambda t, i=i: t.values[i])
        suffix = "" if len(spec.metrics) == 1 else f"_{metric}"
        plots.append((f"history{suffix}", lambda target=target, metric=metric:
                      ovm.plot_optimization_history(study, target=target, target_name=metric)))
        if len(complete) >= 2 and spec.space:
            plots.append((f"importances{suffix}", lambda target=target, metric=metric:
                          ovm.plot_param_importances(study, target=target, target_name=metric)))
    if len(spec.metrics) == 2:
        plots.append(("pareto", lambda: ovm.plot_pareto_front(study, target_names=[m for m, _ in spec.metrics])))
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        plots.append(("intermediate", lambda: ovm.plot_intermediate_values(study)))
    for name, draw in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(7, 4.5)
            fig.tight_layout()
            path = out / f"{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files[name] = str(path)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. importances of a constant space
            log.warning("plot %s skipped: %s", name, exc)
    return files


# ---- held-out evaluation ------------------------------------------------------------------------
def evaluate_holdout(spec: SweepSpec, best_params: dict[str, Any], workers: int | None,
                     address: str | None) -> list[dict[str, Any]]:
    """Base (paper defaults) and tuned configurations on the held-out seeds, one Ray task each."""
    import ray

    started = init_ray(workers, address)

    @ray.remote(num_cpus=1)
    def one(payload, params, seed):
        from .sweep_objectives import limit_threads, simulate_objective

        limit_threads()
        return simulate_objective(payload, params, None, seeds=[seed])

    try:
        payload = spec.to_payload()
        seeds = list(spec.holdout["seeds"])
        refs = {(which, s): one.remote(payload, params, s)
                for which, params in (("default", {}), ("tuned", best_params)) for s in seeds}
        results = {k: ray.get(r) for k, r in refs.items()}
    finally:
        if started:
            ray.shutdown()
    first = spec.metrics[0][0]
    rows = []
    for s in seeds:
        d, t = results[("default", s)][first], results[("tuned", s)][first]
        row = {"seed": s, f"default_{first}": d, f"tuned_{first}": t, "gain_pct": 100.0 * (t / d - 1.0)}
        for metric, _, _ in spec.constraints:     # show that the tuned configuration still meets them
            row[f"default_{metric}"] = results[("default", s)][metric]
            row[f"tuned_{metric}"] = results[("tuned", s)][metric]
        rows.append(row)
    return rows


# ---- command line -------------------------------------------------------------------------------
def sweep_command(args) -> int:
    """``ndpsched sweep``: run or resume a sweep and print where its results are."""
    from .sweep_spec import load_sweep

    config = args.config
    if config is None:
        config = Path(__file__).parent / "presets" / "sweep_default.yaml"
        print(f"no --config: running the embedded default sweep ({config.name}); "
              "examples/sweeps/ holds the full ones", file=sys.stderr)
    spec = load_sweep(config)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.trials is not None and args.trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {args.trials}")
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    import signal

    def _terminate(signum, frame):   # SIGTERM (batch systems, kill): stop like Ctrl-C, Ray shut down
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _terminate)
    res = run_sweep(spec, workers=args.workers, address=args.address, storage=args.storage, study_name=args.study,
                    n_trials=args.trials, out_dir=args.out, progress=progress)
    print(f"sweep '{res.study_name}': {res.n_complete} complete, {res.n_pruned} pruned, {res.n_failed} failed"
          + (f", {res.n_recovered} re-run after a driver died" if res.n_recovered else "")
          + f" ({res.wall_s:.1f} s)")
    if res.best_params is not None:
        values = ", ".join(f"{m} = {v:.6g}" for (m, _), v in zip(spec.metrics, res.best_values))
        print(f"best: {values}  params: {res.best_params}")
    for row in res.holdout:
        print("holdout " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    print(f"storage: {res.storage}  (inspect: optuna-dashboard {res.storage})")
    for key, path in res.files.items():
        print(f"{key}: {path}")
    return 0
