"""Real sweeps on local Ray (2 CPUs): outputs, reproducibility, pruning, worker and driver kills.

All are marked ``slow`` and ``ray`` (CI runs ``-m slow``); one session-scoped Ray instance serves
the in-process sweeps, the subprocess ones start their own.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
pytest.importorskip("optuna")

from ndpsched.sweep import RETRY_ATTR, run_sweep, trial_metrics
from ndpsched.sweep_spec import parse_sweep

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TINY_BASE = {"model": "tiny", "dimms": 4, "prompt_len": 16, "gen_len": 16,
             "hardware": {"gpu": {"memory_bytes": 4.6e5, "reserved_bytes": 0.0}, "dimm": {"capacity_bytes": 4.0e6}}}
TINY_SPACE = {"window_tokens": "int[2, 8]", "predictor.params.lam": "float[1, 10]",
              "balancer.params.tolerance": "float[0.01, 0.2]"}


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def tiny_sweep(**changes):
    data = {"name": "tiny", "base": TINY_BASE, "objective": {"kind": "simulate", "seeds": [0, 1]},
            "space": TINY_SPACE, "metrics": {"tokens_per_s": "max"},
            "sampler": {"name": "tpe", "seed": 3, "n_startup_trials": 3}, "n_trials": 6}
    data.update(changes)
    return parse_sweep(data)


def load(out: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def test_small_sweep_writes_csv_best_yaml_and_plots(ray_session, tmp_path):
    spec = tiny_sweep(holdout={"seeds": [5, 6]})
    res = run_sweep(spec, workers=2, out_dir=tmp_path)
    assert (res.n_complete, res.n_failed) == (6, 0)
    rows = (tmp_path / "trials.csv").read_text().splitlines()
    assert len(rows) == 7 and "param.predictor.params.lam" in rows[0] and "metric.cost_usd" in rows[0]
    for plot in ("history", "importances"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 1000
    # the best configuration runs as it is and reproduces the trial's first seed
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["predictor"]["params"]["lam"] == pytest.approx(res.best_params["predictor.params.lam"])
    proc = subprocess.run([sys.executable, "-m", "ndpsched", "simulate", "--config", str(tmp_path / "best.yaml"),
                           "--json"], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    study = load(tmp_path, "tiny")
    best_trial = study.best_trial
    import json

    seed0 = json.loads(proc.stdout)["tokens_per_s"]
    assert seed0 > 0 and best_trial.value == pytest.approx(trial_metrics(best_trial)["tokens_per_s"])
    holdout = (tmp_path / "holdout.csv").read_text().splitlines()
    assert len(holdout) == 3 and holdout[0].startswith("seed,default_tokens_per_s,tuned_tokens_per_s")


def test_same_seed_same_results_with_one_worker(ray_session, tmp_path):
    runs = []
    for name in ("a", "b"):
        run_sweep(tiny_sweep(n_trials=5), workers=1, out_dir=tmp_path / name)
        study = load(tmp_path / name, "tiny")
        runs.append([(t.params, t.values) for t in study.trials])
    assert runs[0] == runs[1]
    assert len({repr(p) for p, _ in runs[0]}) == 5


def test_pruner_gets_intermediate_values_from_workers(ray_session, tmp_path):
    spec = parse_sweep({"name": "prune", "objective": {"kind": "test", "steps": 4},
                        "space": {"x": "float[-10, 10]", "y": "float[-10, 10]"}, "metrics": {"value": "max"},
                        "sampler": {"name": "random", "seed": 0},
                        "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0}, "n_trials": 12})
    res = run_sweep(spec, workers=2, out_dir=tmp_path)
    study = load(tmp_path, "prune")
    assert res.n_pruned >= 1 and res.n_complete + res.n_pruned == 12
    for t in study.trials:
        assert t.intermediate_values, t.number
        if t.state.name == "COMPLETE":
            assert sorted(t.intermediate_values) == [1, 2, 3, 4]
    assert (tmp_path / "intermediate.png").exists()


def test_killed_worker_is_retried(ray_session, tmp_path):
    spec = tiny_sweep(objective={"kind": "simulate", "seeds": [0], "test_crash_once_dir": str(tmp_path / "marks")},
                      n_trials=4, max_retries=1)
    res = run_sweep(spec, workers=2, out_dir=tmp_path / "out")
    assert (res.n_complete, res.n_failed) == (4, 0)
    # every trial's first attempt died by SIGKILL (its marker exists), the retry completed it
    assert len(list((tmp_path / "marks").iterdir())) == 4


def test_killed_worker_without_retries_fails_the_trial_and_the_sweep_completes(ray_session, tmp_path):
    spec = tiny_sweep(objective={"kind": "simulate", "seeds": [0], "test_crash_once_dir": str(tmp_path / "marks")},
                      n_trials=3, max_retries=0)
    res = run_sweep(spec, workers=2, out_dir=tmp_path / "out")
    assert (res.n_complete, res.n_failed) == (0, 3)
    study = load(tmp_path / "out", "tiny")
    assert all("ndpsched_error" in t.user_attrs for t in study.trials)


def test_trial_that_does_not_fit_fails_alone(ray_session, tmp_path):
    spec = tiny_sweep(space={"hardware.dimm.capacity_bytes": "choice[4.0e6, 1.0e3]"},
                      sampler={"name": "random", "seed": 0}, n_trials=6, objective={"kind": "simulate", "seeds": [0]})
    res = run_sweep(spec, workers=2, out_dir=tmp_path)
    assert res.n_complete + res.n_failed == 6 and res.n_failed >= 1
    rows = (tmp_path / "trials.csv").read_text()
    assert "CapacityError" in rows


def _sweep_cmd(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "ndpsched", "sweep", "--config", str(config), "--workers", "2",
            "--out", str(out), "--no-progress"]


def test_driver_sigkill_then_same_command_resumes(tmp_path):
    """The driver is SIGKILLed mid-sweep; the same command finishes the study without re-running
    completed trials, and retries the trials that were RUNNING."""
    import optuna
    from sqlalchemy.exc import OperationalError

    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "name": "resume", "objective": {"kind": "test", "sleep_s": 0.8},
        "space": {"x": "float[-5, 5]", "y": "float[-5, 5]"}, "metrics": {"value": "max"},
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3}, "n_trials": 8}))
    out = tmp_path / "out"
    storage = f"sqlite:///{out / 'study.db'}"
    driver = subprocess.Popen(_sweep_cmd(config, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 180       # (a guard: Ray's start on a loaded 2-core machine is slow)
    before = {}
    try:
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                trials = optuna.load_study(study_name="resume", storage=storage).trials
            except (KeyError, OperationalError):  # the study or its tables do not exist yet
                trials = []
            done = [t for t in trials if t.state.name == "COMPLETE"]
            running = [t for t in trials if t.state.name == "RUNNING"]
            if len(done) >= 3 and running:
                time.sleep(0.3)   # let the driver finish drawing the new trial's parameters
                trials = optuna.load_study(study_name="resume", storage=storage).trials
                before = {t.number: t.values for t in trials if t.state.name == "COMPLETE"}
                break
        assert before, "the sweep did not get going"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)   # the driver and the Ray processes it started
        driver.wait(timeout=30)
    trials = optuna.load_study(study_name="resume", storage=storage).trials
    stale = [t for t in trials if t.state.name == "RUNNING"]
    assert stale
    proc = subprocess.run(_sweep_cmd(config, out), check=False, capture_output=True, text=True, timeout=120,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "re-run after a driver died" in proc.stdout and "best: value" in proc.stdout
    trials = optuna.load_study(study_name="resume", storage=storage).trials
    by_number = {t.number: t for t in trials}
    for number, values in before.items():            # kept, not re-run
        assert by_number[number].state.name == "COMPLETE" and by_number[number].values == values
    retried = {t.user_attrs[RETRY_ATTR]: t for t in trials if RETRY_ATTR in t.user_attrs}
    for old in stale:                                   # failed, and its parameters ran again
        assert by_number[old.number].state.name == "FAIL"
        # the parameters drawn before the kill run again (a trial killed between ask and its
        # last suggest gets the missing ones from the sampler)
        assert old.params.items() <= retried[old.number].params.items()
        assert retried[old.number].state.name == "COMPLETE"
    counted = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(counted) == 8
    assert (out / "trials.csv").exists() and (out / "best.yaml").exists()


def test_constraints_and_journal_storage(ray_session, tmp_path):
    """Best = best feasible trial; Optuna's journal file works as storage (several machines)."""
    spec = parse_sweep({"name": "cons", "objective": {"kind": "test"},
                        "space": {"x": "float[-5, 5]", "y": "float[-5, 5]"}, "metrics": {"value": "max"},
                        "constraints": {"cost": "<= 4"}, "sampler": {"name": "tpe", "seed": 1, "n_startup_trials": 4},
                        "n_trials": 10})
    journal = tmp_path / "journal.log"
    res = run_sweep(spec, workers=2, out_dir=tmp_path / "out", storage=f"journal:{journal}")
    assert journal.stat().st_size > 0 and not (tmp_path / "out" / "study.db").exists()
    x, y = res.best_params["x"], res.best_params["y"]
    assert x * x + y * y <= 4
    rows = (tmp_path / "out" / "trials.csv").read_text().splitlines()
    assert "feasible" in rows[0] and len(rows) == 11


def test_scaling_script_prints_its_table(tmp_path):
    """scripts/sweep_scaling.py (the README's scaling figures) runs end to end on a small case: one
    row per worker count, with both efficiencies and no failed trial."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "sweep_scaling.py"
    proc = subprocess.run([sys.executable, str(script), "--workers", "1,2", "--trials-per-worker", "2", "--rounds", "2",
                           "--model", "tiny", "--gen-len", "16", "--no-ceiling"],
                          capture_output=True, text=True, check=False, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert [c.strip() for c in header[:3]] == ["workers", "trials", "span (s)"]
    assert [int(r[0]) for r in body] == [1, 2] and [int(r[1]) for r in body] == [2, 4]
    col = [c.strip() for c in header]
    for r in body:
        assert int(r[col.index("failed")]) == 0
        assert float(r[col.index("trials/min")]) > 0
        assert r[col.index("efficiency, median of rounds")].strip().endswith("%")
    assert body[0][col.index("efficiency")].strip() == "100 %"
    assert "round 1, workers 1" in proc.stderr


def test_scaling_script_ceiling_only_probes_the_machine():
    script = Path(__file__).resolve().parents[1] / "scripts" / "sweep_scaling.py"
    proc = subprocess.run([sys.executable, str(script), "--ceiling-only", "--workers", "1,2", "--ceiling-s", "0.05"],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "steal" in lines[0]
    ratios = [float(line.split(":")[1].split("%")[0]) for line in lines[1:]]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)
