"""`ndpsched trace stats`: statistics against hand-computed values."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ndpsched.trace import ActivationTrace, NeuronLayout
from ndpsched.tracestats import overlap_curve, skew_figures, trace_stats


def test_skew_figures_by_hand():
    counts = np.array([50, 20, 10, 10, 5, 5, 0, 0, 0, 0])   # top 20 % = 2 neurons = 70 %
    top20, need80 = skew_figures(counts)
    assert top20 == pytest.approx(0.7)
    assert need80 == pytest.approx(0.3)                      # 50 + 20 + 10 = 80 %


def test_overlap_curve_by_hand():
    lay = NeuronLayout(1, 2, 2)
    dense = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=bool)
    trace = ActivationTrace.from_dense(dense, lay)
    ov = overlap_curve(trace, max_distance=2)
    # d=1: (t0: {0,1} -> {0,2}: 1 of 2) + (t1: {0,2} -> {0,2,3}: 2 of 2) = 3/4
    # d=2: t0 {0,1} -> {0,2,3}: 1 of 2
    assert ov == pytest.approx([0.75, 0.5])


def test_stats_of_a_generated_trace(tiny_trace, tiny_model):
    stats = trace_stats(tiny_trace, tiny_model)
    assert len(stats["per_layer"]) == tiny_model.n_layers
    assert 0.85 < stats["overlap"][0] < 0.95
    assert stats["layer_correlation"]["p_fire_given_parent"] > stats["layer_correlation"]["p_fire"]
    assert 0 < stats["predictor"]["recall"] <= 1


def test_trace_cli(tmp_path):
    path = tmp_path / "t.npz"
    run = [sys.executable, "-m", "ndpsched", "trace"]
    subprocess.run(run + ["generate", "--model", "tiny", "--tokens", "60", "--out", str(path)], check=True,
                   capture_output=True)
    out = subprocess.run(run + ["stats", str(path), "--json", "--png", str(tmp_path / "s.png")], check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out)["n_tokens"] == 60
    assert (tmp_path / "s.png").stat().st_size > 1000
    bad = subprocess.run(run + ["stats", str(path), "--model", "relullama-7b"], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not match model 'relullama-7b'" in bad.stderr
