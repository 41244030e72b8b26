"""Sweep specification, prices and CLI errors: fast, no Ray started."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ndpsched.config import RunConfig
from ndpsched.errors import ConfigError, NdpschedError, UnknownNameError
from ndpsched.sweep_spec import load_sweep, parse_param, parse_sweep

TINY_BASE = {"model": "tiny", "dimms": 4, "prompt_len": 16, "gen_len": 16,
             "hardware": {"gpu": {"memory_bytes": 4.6e5, "reserved_bytes": 0.0}, "dimm": {"capacity_bytes": 4.0e6}}}


def sweep(**changes):
    data = {"name": "t", "base": TINY_BASE, "space": {"balancer.params.tolerance": "float[0.01, 0.2]"},
            "metrics": {"tokens_per_s": "max"}, "n_trials": 3}
    data.update(changes)
    return data


def test_valid_sweep_parses_every_range_kind():
    spec = parse_sweep(sweep(space={
        "window_tokens": "int[2, 16]", "predictor.params.lam": "float[1, 10]",
        "hardware.dimm.ndp_multipliers": "int[32, 512, log]", "cost.sync_us": "float[5, 20, step=2.5]",
        "gpu": "choice[rtx4090, rtx3090]", "dimms": [4, 8]}))
    kinds = {p.name: (p.kind, p.log, p.step) for p in spec.space}
    assert kinds["window_tokens"] == ("int", False, None)
    assert kinds["hardware.dimm.ndp_multipliers"] == ("int", True, None)
    assert kinds["cost.sync_us"] == ("float", False, 2.5)
    assert spec.space[4].choices == ("rtx4090", "rtx3090") and spec.space[5].choices == (4, 8)
    assert spec.directions == ["maximize"] and spec.sampler["name"] == "tpe"
    two = parse_sweep(sweep(metrics={"tokens_per_s": "max", "cost_usd": "min"}))
    assert two.directions == ["maximize", "minimize"] and two.sampler["name"] == "nsga2"


@pytest.mark.parametrize("changes, message", [
    ({"n_trails": 4}, "unknown sweep key 'n_trails'. Did you mean 'n_trials'?"),
    ({"space": {"balancer.params.tolerance": "float(0, 1)"}}, "bad range syntax"),
    ({"space": {"balancer.params.tolerance": "float[0.3, 0.1]"}}, "low 0.3 must be below high 0.1"),
    ({"space": {"balancer.params.tolerance": "float[0, 1, log]"}}, "log range needs a positive low bound"),
    ({"space": {"window_tokens": "int[2.5, 8]"}}, "int bounds must be integers"),
    ({"space": {"balancer.params.tolerance": "float[a, 1]"}}, "'a' is not a number"),
    ({"space": {"balancer.params.tolerence": "float[0, 1]"}}, "Did you mean 'tolerance'?"),
    ({"space": {"predictor.params.lamda": "float[1, 10]"}}, "Did you mean 'lam'?"),
    ({"space": {"windw_tokens": "int[2, 8]"}}, "Did you mean 'window_tokens'?"),
    ({"metrics": {"tokens_per_sec": "max"}}, "Did you mean 'tokens_per_s'?"),
    ({"metrics": {"tokens_per_s": "up"}}, "unknown direction of metric 'tokens_per_s' 'up'"),
    ({"sampler": {"name": "tpee"}}, "Did you mean 'tpe'?"),
    ({"sampler": {"name": "tpe", "sed": 1}}, "Did you mean 'seed'?"),
    ({"pruner": {"name": "medain"}}, "Did you mean 'median'?"),
    ({"objective": {"kind": "simulat"}}, "Did you mean 'simulate'?"),
    ({"objective": {"kind": "simulate", "seed": [0]}}, "Did you mean 'seeds'?"),
    ({"objective": {"kind": "simulate", "seeds": []}}, "non-empty list"),
    ({"n_trials": 0}, "n_trials must be an integer >= 1"),
    ({"base": {"modell": "tiny"}}, "Did you mean 'model'?"),
    ({"metrics": {}}, "'metrics' is required"),
    ({"space": {"gpu": "choice[rtx4090, rtx9090]"}}, "unknown GPU 'rtx9090'"),
])
def test_bad_sweeps_fail_with_one_line(changes, message):
    with pytest.raises(NdpschedError) as err:
        parse_sweep(sweep(**changes))
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_constraints_parse_and_evaluate():
    from ndpsched.sweep_spec import constraint_violations

    spec = parse_sweep(sweep(constraints={"predictor_recall": ">= 0.7", "cost_usd": "<= 3000"}))
    assert spec.constraints == [("predictor_recall", ">=", 0.7), ("cost_usd", "<=", 3000.0)]
    assert constraint_violations(spec.constraints, {"predictor_recall": 0.8, "cost_usd": 2500}) == pytest.approx([-0.1, -500])
    assert constraint_violations(spec.constraints, {"predictor_recall": 0.5})[0] == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="must look like"):
        parse_sweep(sweep(constraints={"predictor_recall": "> 0.7"}))
    with pytest.raises(UnknownNameError, match="Did you mean 'predictor_recall'"):
        parse_sweep(sweep(constraints={"predictor_recal": ">= 0.7"}))


def test_pruner_with_two_metrics_is_refused():
    with pytest.raises(ConfigError, match="pruning works with one metric"):
        parse_sweep(sweep(metrics={"tokens_per_s": "max", "cost_usd": "min"}, pruner={"name": "median"}))


def test_train_objective_space_keys():
    data = {"objective": {"kind": "train", "env_id": "ndpsched/DimmBalance-v0", "algo": "ppo", "timesteps": 1000},
            "space": {"hyperparams.learning_rate": "float[1e-5, 1e-3, log]"}, "metrics": {"score": "max"}}
    spec = parse_sweep(data)
    assert spec.space[0].log and spec.kind == "train"
    data["space"] = {"learning_rate": "float[1e-5, 1e-3]"}
    with pytest.raises(ConfigError, match="hyperparams"):
        parse_sweep(data)


def test_parse_param_list_is_categorical():
    p = parse_param("gpu", ["t4", "rtx4090"])
    assert p.kind == "categorical" and p.example() == "t4"


def test_trial_config_applies_dotted_params():
    spec = parse_sweep(sweep())
    cfg = spec.run_config({"balancer.params.tolerance": 0.1, "window_tokens": 7})
    assert cfg.balancer.params == {"tolerance": 0.1} and cfg.window_tokens == 7


def test_shipped_example_sweeps_validate():
    root = Path(__file__).resolve().parents[1] / "examples" / "sweeps"
    files = sorted(root.glob("*.yaml"))
    assert len(files) >= 4
    for path in files:
        spec = load_sweep(path)
        assert spec.space and spec.metrics, path


def test_hardware_cost_default_machine():
    from ndpsched.sweep_prices import hardware_cost_usd

    cost = hardware_cost_usd(RunConfig())
    # 1599 (RTX 4090) + 8 x (80 module + 20 buffer chip + 256 x 0.04 multipliers + 25 GB/s x 0.4 link)
    assert cost["cost_usd"] == pytest.approx(1599 + 8 * (80 + 20 + 10.24 + 10))
    more = hardware_cost_usd(RunConfig(dimms=16, hardware={"dimm": {"data_rate_mtps": 4800, "ndp_multipliers": 512}}))
    assert more["dimm_usd"] == pytest.approx(80 * 1.25 + 20 + 512 * 0.04 + 10)
    with pytest.raises(UnknownNameError):
        hardware_cost_usd(RunConfig(gpu="nope"))


def test_every_price_names_its_source():
    from ndpsched.sweep_prices import load_prices

    def walk(node):
        if isinstance(node, dict) and "price_usd" in node:
            yield node
        elif isinstance(node, dict):
            for v in node.values():
                yield from walk(v)
    prices = load_prices()
    entries = list(walk(prices))
    assert len(entries) >= 10
    assert all(e.get("source") for e in entries)
    assert set(prices["gpu"]) >= {"rtx4090", "rtx3090", "t4", "a100-40gb", "h100", "h200"}


def test_cli_bad_sweep_exits_2_with_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(sweep(metrics={"tokens_per_sec": "max"})))
    proc = subprocess.run([sys.executable, "-m", "ndpsched", "sweep", "--config", str(path)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Did you mean 'tokens_per_s'?" in lines[0]


def test_storage_url_must_be_a_url():
    from ndpsched.sweep import make_storage

    with pytest.raises(ConfigError, match="journal:PATH"):
        make_storage("study.db")


def test_sqlite_storage_runs_in_wal_mode(tmp_path):
    """The default storage commits through a write-ahead log (faster ask/tell, safe against a
    killed driver); the journal mode is a property of the database file."""
    import sqlite3

    import optuna

    from ndpsched.sweep import make_storage

    storage = make_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage, study_name="wal")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with sqlite3.connect(tmp_path / "study.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert len(optuna.load_study(study_name="wal", storage=f"sqlite:///{tmp_path / 'study.db'}").trials) == 2


def test_worker_malloc_settings(monkeypatch):
    """Workers' malloc settings apply on glibc and can be switched off."""
    import platform

    from ndpsched.ray_session import MALLOC_ENV, WORKER_ENV, tune_malloc

    assert set(MALLOC_ENV) <= set(WORKER_ENV) and WORKER_ENV["OMP_NUM_THREADS"] == "1"
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert tune_malloc() is True
    monkeypatch.setenv("NDPSCHED_MALLOC", "default")
    assert tune_malloc() is False


def test_trial_metrics_read_packed_and_per_attribute_layouts():
    """Metrics are written as one user attribute (one storage write a trial); studies written
    with one attribute per metric (earlier ndpsched) still read the same."""
    optuna = pytest.importorskip("optuna")
    from ndpsched.sweep import DRIVER_ATTR, METRICS_ATTR, trial_metrics

    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    packed = optuna.trial.create_trial(params={"x": 0.5}, distributions=dist, value=1.0,
                                       user_attrs={DRIVER_ATTR: "h:1", METRICS_ATTR: {"tokens_per_s": 3.0, "wall_s": 0.2}})
    legacy = optuna.trial.create_trial(params={"x": 0.5}, distributions=dist, value=1.0,
                                       user_attrs={DRIVER_ATTR: "h:1", "tokens_per_s": 3.0, "wall_s": 0.2})
    assert trial_metrics(packed) == trial_metrics(legacy) == {"tokens_per_s": 3.0, "wall_s": 0.2}
