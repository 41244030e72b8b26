"""`ndpsched trace fit`: the two-time-scale generator, fitting it to a trace, scaling the fit to
another model's shape, the paper-ReLU preset, and fitted params as a trace source.

Fast tests fit a trace drawn from the generator with known, different parameters (a real
recording is 3-14 MB, too large to ship); a slow test records the real SmolLM2 and checks the
issue's quality bar on it.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ndpsched.config import RunConfig
from ndpsched.errors import ConfigError, TraceError
from ndpsched.presets import load_model
from ndpsched.run import load_trace
from ndpsched.trace import ActivationTrace, NeuronLayout, overlap_counts
from ndpsched.tracefit import (
    TraceFit,
    compare_stats,
    fit_dynamics,
    fit_trace,
    trace_from_fit_file,
    fitted_trace,
)
from ndpsched.tracegen import synthetic_trace, two_scale_overlap, two_scale_trace
from ndpsched.tracestats import overlap_curve

SOURCE = NeuronLayout(6, 64, 256)


@pytest.fixture(scope="module")
def known_trace():
    """A trace with per-layer dynamics the fitter does not know: a fast drop, then a plateau."""
    lay = SOURCE
    rng = np.random.default_rng(5)
    shape = rng.pareto(1.5, lay.n_neurons) + 0.05
    f = shape.reshape(lay.n_layers, lay.per_layer)
    f = f / f.mean(axis=1, keepdims=True) * np.linspace(0.08, 0.15, lay.n_layers)[:, None]
    freqs = np.minimum(f.ravel(), 0.9)
    g = lay.n_groups
    c = np.linspace(0.02, 0.1, g)
    w = np.linspace(0.1, 0.4, g)
    rho = np.linspace(0.5, 0.8, g)
    return two_scale_trace(freqs, lay, c, w, rho, 120, 8, seed=3, meta={"model": "known"}), (c, w, rho)


def test_overlap_counts_match_a_direct_count():
    rng = np.random.default_rng(0)
    active = rng.random((40, 30)) < 0.3
    hits, base = overlap_counts(active, 12, np.array([0, 10, 25]))
    for g, (a, b) in enumerate(((0, 10), (10, 25), (25, 30))):
        for d in range(1, 13):
            x = active[:, a:b]
            assert hits[g, d - 1] == (x[:-d] & x[d:]).sum()
            assert base[g, d - 1] == x[:-d].sum()


def test_token_overlap_and_overlap_curve_agree(tiny_trace):
    curve = overlap_curve(tiny_trace.sequences([0]), max_distance=5, max_layers=None)
    for d in (1, 3, 5):
        assert tiny_trace.token_overlap(0, d, max_tokens=tiny_trace.n_tokens) == pytest.approx(curve[d - 1])


def test_fit_dynamics_recovers_an_exact_curve():
    a = np.array([0.2, 0.3, 0.1])
    c, w, rho = np.array([0.05, 0.0, 0.3]), np.array([0.3, 0.8, 0.0]), np.array([0.7, 0.9, 0.0])
    d = np.arange(1, 51)
    curve = a[:, None] + (1 - a[:, None]) * (c[:, None] + w[:, None] * (1 - c[:, None]) * rho[:, None] ** d)
    fc, fw, frho = fit_dynamics(curve, np.ones_like(curve), a)
    model = a[:, None] + (1 - a[:, None]) * (fc[:, None] + fw[:, None] * (1 - fc[:, None]) * frho[:, None] ** d)
    assert np.abs(model - curve).max() < 2e-3
    assert fc == pytest.approx(c, abs=0.01)


def test_two_scale_generator_follows_its_formula():
    lay = NeuronLayout(2, 500, 1500)
    freqs = np.random.default_rng(1).uniform(0.01, 0.3, lay.n_neurons)
    c, w, rho = np.array([0.1, 0.0, 0.2, 0.05]), np.array([0.5, 1.0, 0.2, 0.0]), np.array([0.8, 0.6, 0.9, 0.0])
    trace = two_scale_trace(freqs, lay, c, w, rho, 300, 6, seed=2)
    trace.validate()
    want = two_scale_overlap(freqs, lay, c, w, rho, 30)
    curve = overlap_curve(trace, 30, max_layers=None)
    weights = np.array([f.sum() for f in np.split(freqs, np.cumsum([500, 1500, 500])[:3])])
    assert np.abs(curve - (want * weights[:, None]).sum(0) / weights.sum()).max() < 0.02
    assert trace.frequencies().mean() == pytest.approx(freqs.mean(), rel=0.03)
    with pytest.raises(ConfigError, match="persistence"):
        two_scale_trace(freqs, lay, c, w, np.ones(4), 10)


def test_fitted_trace_reproduces_curve_and_skew(known_trace):
    real, _ = known_trace
    fit = fit_trace(real)
    synth = fitted_trace(fit, real.layout, real.n_tokens, real.n_seqs, seed=11)
    cmp = compare_stats(real, synth, max_layers=None)
    assert cmp["overlap_max_abs_error"] < 0.03, cmp
    assert cmp["skew_max_abs_error"] < 0.03, cmp
    # the curve really has two time scales: a fast drop, then (almost) flat
    ov = np.array(cmp["real"]["overlap"])
    assert ov[0] - ov[4] > 3 * abs(ov[9] - ov[-1])


def test_fit_scales_to_a_larger_model(known_trace):
    real, _ = known_trace
    fit = fit_trace(real)
    wider = NeuronLayout(15, 160, 704)            # 2.5x deeper, 2.5-2.75x wider
    synth = fitted_trace(fit, wider, real.n_tokens, real.n_seqs, seed=4)
    assert synth.layout == wider
    cmp = compare_stats(real, synth, max_layers=None)
    assert cmp["overlap_max_abs_error"] < 0.03, cmp
    assert cmp["skew_max_abs_error"] < 0.03, cmp
    assert cmp["fitted"]["ffn_density"] == pytest.approx(cmp["real"]["ffn_density"], abs=0.005)


def test_fit_yaml_round_trip_and_trace_source(tmp_path, known_trace):
    real, _ = known_trace
    fit = fit_trace(real)
    path = tmp_path / "fit.yaml"
    fit.save(path)
    back = TraceFit.load(path)
    assert np.allclose(back.quantiles, fit.quantiles, atol=1e-6)
    assert np.allclose(back.persistence, fit.persistence, atol=1e-6)
    model = load_model("tiny")
    a = trace_from_fit_file(path, model, 40, 2, seed=1)
    b = load_trace(RunConfig(model="tiny", prompt_len=20, gen_len=20, batch=2, seed=1,
                             trace={"source": f"fitted:{path}"}), model)
    a.check_model(model)
    assert np.array_equal(a.on_idx, b.on_idx) and a.meta["generator"] == "fitted"
    a.validate()
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: something-else\n")
    for p, msg in ((tmp_path / "none.yaml", "does not exist"), (bad, "not an ndpsched trace fit")):
        with pytest.raises(TraceError, match=msg):
            load_trace(RunConfig(model="tiny", prompt_len=5, gen_len=5, trace={"source": f"fitted:{p}"}), model)
    with pytest.raises(ConfigError, match="trace_from_fit_file"):
        synthetic_trace(model, 10, source=f"fitted:{path}")


def test_paper_relu_preset_follows_hermes_curve():
    model = load_model("tiny")
    trace = synthetic_trace(model, 400, 2, source="paper-relu", seed=0)
    ov = overlap_curve(trace, 50, max_layers=None)
    assert ov[0] == pytest.approx(0.91, abs=0.02)          # Hermes: > 90 % at d = 1
    assert ov[9] == pytest.approx(0.70, abs=0.03)          # ~70 % at d = 10
    assert np.abs(ov[24:] - 0.65).max() < 0.03             # flat beyond ~25
    assert trace.layer_parents is not None


def test_mismatched_trace_points_to_trace_fit(tiny_trace):
    with pytest.raises(TraceError, match="trace fit"):
        tiny_trace.check_model(load_model("relullama-7b"))


def test_trace_fit_cli(tmp_path, known_trace):
    real, _ = known_trace
    path = tmp_path / "real.npz"
    real.save(path)
    run = [sys.executable, "-m", "ndpsched", "trace", "fit", str(path)]
    out = subprocess.run(run + ["--out", str(tmp_path / "f.yaml"), "--generate", str(tmp_path / "g.npz"),
                                "--model", "tiny", "--tokens", "60", "--json"],
                         check=True, capture_output=True, text=True).stdout
    cmp = json.loads(out)
    assert cmp["target"]["model"] == "tiny" and len(cmp["fitted"]["overlap"]) == 50
    ActivationTrace.load(tmp_path / "g.npz").check_model(load_model("tiny"))
    TraceFit.load(tmp_path / "f.yaml")
    text = subprocess.run(run, check=True, capture_output=True, text=True).stdout
    assert "max |error| of the overlap curve" in text
    bad = subprocess.run(run + ["--generate", str(tmp_path / "x.npz")], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--model" in bad.stderr


@pytest.mark.slow
def test_fit_real_smollm2_recording(smollm2_recording):
    """The quality bar on a real recording: 8 x 128-token chunks of SmolLM2-135M over README.md."""
    out = smollm2_recording.path
    real = ActivationTrace.load(out)
    fit = fit_trace(real)
    same = compare_stats(real, fitted_trace(fit, real.layout, real.n_tokens, real.n_seqs, seed=1), max_layers=None)
    assert same["overlap_max_abs_error"] < 0.03 and same["skew_max_abs_error"] < 0.03, same
    # scaled to twice the depth and width, at the recording's length
    big = NeuronLayout(2 * real.layout.n_layers, 2 * real.layout.d_qkv, 2 * real.layout.d_ffn)
    scaled = compare_stats(real, fitted_trace(fit, big, real.n_tokens, real.n_seqs, seed=2), max_layers=None)
    assert scaled["overlap_max_abs_error"] < 0.03 and scaled["skew_max_abs_error"] < 0.03, scaled
