"""CLI smoke tests through subprocess, as a user runs them."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

TINY = ["--model", "tiny", "--dimms", "4", "--prompt-len", "12", "--gen-len", "20",
        "--set", "hardware.gpu.memory_bytes=4.6e5", "--set", "hardware.gpu.reserved_bytes=0"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ndpsched", *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr}")
    return proc


def test_simulate_json():
    out = json.loads(run("simulate", *TINY, "--json").stdout)
    for key in ("tokens_per_s", "prefill_s", "decode_s", "breakdown_s", "config", "dimm_imbalance"):
        assert key in out
    assert out["tokens_per_s"] > 0
    assert {"gpu_compute", "dimm_compute", "attention", "sync", "pcie", "dimm_link",
            "exposed_migration"} <= set(out["breakdown_s"])
    assert out["config"]["model"] == "tiny" and out["config"]["partition"]["name"] == "hermes.adjust"
    assert 0 <= out["predictor"]["recall"] <= 1


def test_simulate_table_and_policy_flags():
    text = run("simulate", *TINY, "--system", "random", "--balancer", "round-robin").stdout
    assert "tokens/s" in text and "time breakdown" in text and "balancer=round-robin" in text


def test_simulate_with_trace_file_and_config(tmp_path):
    from ndpsched.presets import load_model
    from ndpsched.tracegen import synthetic_trace

    path = tmp_path / "trace.npz"
    synthetic_trace(load_model("tiny"), 40, 1, seed=3).save(path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: tiny\ndimms: 4\nprompt_len: 12\ngen_len: 20\n"
                   "hardware:\n  gpu: {memory_bytes: 4.6e+5, reserved_bytes: 0}\n")
    out = json.loads(run("simulate", "--config", str(cfg), "--trace", str(path), "--json").stdout)
    assert out["config"]["trace"]["source"] == str(path)


def test_bench_json_rows():
    out = json.loads(run("bench", "--models", "tiny", "--batches", "1,2", "--prompt-len", "8",
                         "--gen-len", "16", "--env-preset", "tiny", "--env-episodes", "2", "--json").stdout)
    env_rows = [r for r in out["rows"] if "env" in r]
    rows = [r for r in out["rows"] if "env" not in r]
    assert [r["env"] for r in env_rows] == ["ndpsched/DimmBalance-v0", "ndpsched/HotCold-v0", "ndpsched/Schedule-v0"]
    for r in env_rows:
        assert r["env_steps_per_s"] > 0 and r["sim_windows_per_s"] > 0 and r["model"] == "tiny"
    assert [(r["model"], r["batch"], r["system"]) for r in rows] == [
        ("tiny", 1, "hermes-offline"), ("tiny", 1, "hermes"), ("tiny", 2, "hermes-offline"), ("tiny", 2, "hermes")]
    for r in rows:
        assert r["sim_tokens_per_s"] > 0 and r["modelled_tokens_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["sim_tokens_per_s"] / r["modelled_tokens_per_s"])


def test_list():
    text = run("list").stdout
    assert "llama2-70b" in text and "rtx4090" in text and "round-robin" in text and "hermes" in text


@pytest.mark.parametrize("args,message", [
    (["simulate", "--model", "llama-70b"], "unknown model 'llama-70b'. Did you mean 'llama2-70b'?"),
    (["simulate", "--gpu", "rtx5090"], "unknown GPU 'rtx5090'"),
    (["simulate", "--balancer", "hermes.windw"], "unknown balancer policy 'hermes.windw'"),
    (["simulate", "--system", "hermez"], "unknown system 'hermez'"),
    (["simulate", "--set", "balancer.params.windw=3"], "unknown parameter of balancer policy 'hermes.window' 'windw'"),
    (["simulate", "--balancer", "round-robin", "--set", "balancer.params.x=3"], "takes no parameters"),
    (["simulate", "--set", "dimm=3"], "unknown config key 'dimm'"),
    (["simulate", "--model", "falcon-40b", "--dimms", "2"], "does not fit"),
    (["simulate", "--dimms", "0"], "dimms must be a positive integer"),
    (["simulate", "--dimms", "17"], "n_dimms must be an integer in 1..16"),
    (["simulate", "--batch", "-2"], "batch must be a positive integer"),
    (["simulate", "--trace", "nosuchfile.npz"], "does not exist"),
    (["simulate", "--trace", "zipf"], "unknown trace generator"),
    (["simulate", "--config", "nosuch.yaml"], "does not exist"),
])
def test_bad_input_one_line_exit_2(args, message):
    proc = run(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert message in lines[0]


def test_corrupt_and_mismatched_trace_files(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    proc = run("simulate", *TINY, "--trace", str(bad), check=False)
    assert proc.returncode == 2 and "not a readable .npz" in proc.stderr
    from ndpsched.presets import load_model
    from ndpsched.tracegen import synthetic_trace

    other = tmp_path / "other.npz"
    synthetic_trace(load_model("tiny"), 40, 1, seed=3).save(other)
    proc = run("simulate", "--model", "relullama-7b", "--trace", str(other), check=False)
    assert proc.returncode == 2 and "does not match model 'relullama-7b'" in proc.stderr


def test_compare_writes_csv_and_plot(tmp_path):
    proc = run("compare", "--model", "tiny", "--batch", "1,2", "--systems", "hermes-offline,accelerate,airllm",
               "--prompt-len", "8", "--gen-len", "8", "--out", str(tmp_path))
    assert "hermes-offline" in proc.stdout and "x)" in proc.stdout
    csv_text = (tmp_path / "compare_tiny.csv").read_text()
    assert "speedup_vs_accelerate" in csv_text.splitlines()[0]
    assert (tmp_path / "compare_tiny.png").stat().st_size > 1000


def test_fidelity_points_are_valid_configs():
    from ndpsched.config import RunConfig
    from ndpsched.fidelity import CALIBRATION_POINTS

    for p in CALIBRATION_POINTS:
        RunConfig(**{k: p[k] for k in ("system", "model", "gpu", "dimms", "batch", "prompt_len", "gen_len")})
        assert p["published_tokens_per_s"] > 0 and p["source"]


@pytest.mark.slow
def test_fidelity_command():
    out = json.loads(run("fidelity", "--trace", "skew", "--json").stdout)
    assert len(out["rows"]) == 2
    for r in out["rows"]:
        assert abs(r["error_pct"]) < 30
