"""The calibration itself (``ndpsched calibrate gpu``): runs only where torch sees a CUDA GPU."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ndpsched.calibrate import cuda_unavailable_reason, guess_preset, run_calibration
from ndpsched.gpuprofile import parse_profile

REASON = cuda_unavailable_reason()
needs_cuda = pytest.mark.skipif(REASON is not None, reason=f"calibration needs CUDA: {REASON}")


def test_guess_preset_from_device_names():
    assert guess_preset("NVIDIA H100 80GB HBM3") == "h100"
    assert guess_preset("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert guess_preset("Tesla T4") == "t4"
    assert guess_preset("NVIDIA H200") == "h200"
    assert guess_preset("Some Other GPU") == ""


def test_without_cuda_the_reason_is_one_clear_line():
    if REASON is None:
        pytest.skip("CUDA is available here: the no-CUDA message is not produced")
    assert "CUDA" in REASON or "torch" in REASON
    assert "\n" not in REASON


@needs_cuda
def test_quick_calibration_writes_a_valid_profile():
    prof = run_calibration(quick=True, reps=5, families=("launch", "h2d", "dense_gemv", "gather_gemv"),
                           strict=True)
    parsed = parse_profile(json.loads(json.dumps(prof)), "test")
    assert set(parsed.tables) == {"h2d", "dense_gemv", "gather_gemv"}
    assert parsed.launch["device_us"] > 0
    dense = parsed.tables["dense_gemv"]
    # memory bound: the largest matrix takes longer than the smallest at every batch
    assert np.all(dense.time_us[:, -1] > dense.time_us[:, 0])
    # a bigger copy is slower than a small one
    h2d = parsed.tables["h2d"].time_us[0]
    assert h2d[-1] > h2d[0]
    assert prof["provenance"]["cuda"] and prof["provenance"]["torch"]


@needs_cuda
def test_calibrate_cli_writes_file(tmp_path):
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, "-m", "ndpsched.cli", "calibrate", "gpu", "--out", str(out), "--quick",
                        "--reps", "5", "--families", "launch,h2d"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    parse_profile(json.loads(out.read_text()), str(out))
    assert "wrote" in r.stdout
