"""Measured GPU profiles: schema validation, interpolation, cost-model hook, compare and fit."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from ndpsched.config import RunConfig
from ndpsched.costmodel import CostModel, CostParams
from ndpsched.errors import NdpschedError, ProfileError
from ndpsched.gpuprofile import (SCHEMA, SCHEMA_VERSION, compare_profile, fit_roofline, load_profile,
                                 parse_profile, roofline_s, shipped_profiles)
from ndpsched.presets import load_gpu, load_hardware, load_model

SHIPPED = "h100-sxm5-80gb.gpuprofile.json"


def small_profile(preset: str = "h100") -> dict:
    """A hand-made profile: 2 x 2 grids whose interpolated values are easy to compute by hand."""
    grid = {"x": [1e6, 4e6], "batch": [1, 4], "time_us": [[10.0, 40.0], [20.0, 80.0]]}
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "gpu": {"name": "Test GPU", "preset": preset},
        "provenance": {"date": "2026-01-01"},
        "launch": {"device_us": 2.0, "host_us": 5.0, "launch_sync_us": 20.0},
        "families": {
            "dense_gemv": {"x_name": "weight_bytes", **grid},
            "gather_gemv": {"x_name": "gathered_bytes", **grid},
            "sparse_ffn": {"x_name": "gathered_bytes", **grid},
            "h2d": {"x_name": "bytes", "x": [1e3, 1e5], "batch": [1], "time_us": [[5.0, 50.0]]},
        },
    }


def write(tmp_path, data, name="p.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


# ---- interpolation -------------------------------------------------------------------------------
def test_interpolation_matches_hand_computed_values():
    prof = parse_profile(small_profile())
    t = prof.tables["dense_gemv"]
    # grid points are returned exactly (us -> s)
    assert t.lookup_s(1e6, 1) == pytest.approx(10e-6)
    assert t.lookup_s(4e6, 4) == pytest.approx(80e-6)
    # log-log: the geometric mid-point in x at batch 1 is the geometric mean, sqrt(10 x 40) = 20 us
    assert t.lookup_s(2e6, 1) == pytest.approx(20e-6)
    # bilinear in (log b, log x): batch 2 mid-way between rows 20 us (b=1) and sqrt(20 x 80) = 40 us (b=4)
    assert t.lookup_s(2e6, 2) == pytest.approx(math.sqrt(20 * 40) * 1e-6)
    # a power law between points: x = 1e6 * 4**0.25 at batch 1 -> 10 * 4**0.25 us
    assert t.lookup_s(1e6 * 4 ** 0.25, 1) == pytest.approx(10 * 4 ** 0.25 * 1e-6)


def test_interpolation_is_vectorised_and_nan_outside():
    prof = parse_profile(small_profile())
    x = np.array([[5e5, 1e6], [4e6, 5e6]])
    b = np.array([[1, 1], [4, 4]])
    got = prof.tables["dense_gemv"].lookup_s(x, b)
    assert got.shape == (2, 2)
    assert np.isnan(got[0, 0]) and np.isnan(got[1, 1])
    assert got[0, 1] == pytest.approx(10e-6) and got[1, 0] == pytest.approx(80e-6)
    assert np.isnan(prof.tables["dense_gemv"].lookup_s(2e6, 8))          # batch beyond the grid
    assert np.isnan(prof.tables["dense_gemv"].lookup_s(2e6, 0.5))


def test_one_batch_family_ignores_batch_and_fallback_fills_outside():
    prof = parse_profile(small_profile())
    assert prof.lookup_s("h2d", 1e4, 16) == pytest.approx(math.sqrt(5 * 50) * 1e-6)
    got = prof.lookup_s("h2d", np.array([10.0, 1e4, 1e9]), 1, fallback=np.array([1.0, 2.0, 3.0]))
    assert got[0] == 1.0 and got[2] == 3.0 and got[1] == pytest.approx(math.sqrt(5 * 50) * 1e-6)
    # a family absent from the profile is all fallback
    assert prof.lookup_s("attention", 1e6, 1, fallback=7.0) == 7.0


# ---- schema validation: one clear line ---------------------------------------------------------------
def _broken(mutate):
    data = small_profile()
    mutate(data)
    return data


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.update(schema="something.else"), "not an ndpsched GPU profile"),
    (lambda d: d.update(schema_version=99), "schema_version 99"),
    (lambda d: d.pop("families"), "lacks the 'families' object"),
    (lambda d: d["gpu"].update(name=""), "gpu.name"),
    (lambda d: d["families"]["dense_gemv"].pop("time_us"), "lacks 'time_us'"),
    (lambda d: d["families"]["dense_gemv"].update(time_us=[[1.0, 2.0]]), "time_us has shape (1, 2)"),
    (lambda d: d["families"]["dense_gemv"].update(x=[4e6, 1e6]), "strictly increasing"),
    (lambda d: d["families"]["dense_gemv"].update(batch=[0, 4]), "batch must be >= 1"),
    (lambda d: d["families"]["dense_gemv"].update(time_us=[[10.0, -1.0], [20.0, 80.0]]), "positive"),
    (lambda d: d["families"]["dense_gemv"].update(time_us=[[10.0, "x"], [20.0, 80.0]]), "list of numbers"),
    (lambda d: d["families"]["dense_gemv"].update(x_name="bytes"), "expected 'weight_bytes'"),
    (lambda d: d["launch"].update(device_us=-2), "launch.device_us"),
    (lambda d: d["families"].update(prefill={"x_name": "layer_weight_bytes", "x": [1e8], "batch": [1],
                                             "time_us": [[100.0]], "prompt_tokens": 64}), "prompt_tokens must be 128"),
])
def test_bad_profiles_raise_one_line(mutate, needle):
    with pytest.raises(ProfileError) as info:
        parse_profile(_broken(mutate), "'bad.json'")
    msg = str(info.value)
    assert needle in msg and "\n" not in msg and "'bad.json'" in msg


def test_unknown_family_names_the_valid_ones():
    data = _broken(lambda d: d["families"].update(dense_gemvv=d["families"]["dense_gemv"]))
    with pytest.raises(NdpschedError, match="Did you mean 'dense_gemv'"):
        parse_profile(data)


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "corrupt.json"
    bad.write_text('{"schema": "ndpsched.gpu_profile", ')
    with pytest.raises(ProfileError, match="is not valid JSON"):
        load_profile(str(bad))
    with pytest.raises(ProfileError, match="is not a file nor a shipped profile"):
        load_profile(str(tmp_path / "absent.json"))


# ---- the cost model with a profile -------------------------------------------------------------------
def _hw(profile_path: str, gpu: str = "h100"):
    return load_hardware(gpu, 8, overrides={"gpu": {"profile": profile_path}})


def test_mismatched_gpu_is_refused(tmp_path):
    path = write(tmp_path, small_profile("h100"))
    with pytest.raises(ProfileError, match="measured on 'Test GPU'.*'rtx4090'"):
        CostModel(load_model("relullama-7b"), _hw(path, "rtx4090"))


def test_profile_without_preset_fits_any_gpu(tmp_path):
    path = write(tmp_path, small_profile(""))
    assert CostModel(load_model("relullama-7b"), _hw(path, "rtx4090")).profile is not None


def _dense_profile(model, tmp_path, x_lo, x_hi):
    data = small_profile()
    data["families"]["dense_gemv"].update(x=[x_lo, x_hi], time_us=[[100.0, 200.0], [300.0, 400.0]])
    return write(tmp_path, data, f"dense_{x_lo:.0f}.json")


def test_projection_and_lm_head_use_the_table_inside_its_range(tmp_path):
    model = load_model("relullama-7b")
    proj = model.proj_bytes_per_layer                      # 4096 x 4096 x 2 B = 32 MiB
    roof = CostModel(model, _hw(""))
    cm = CostModel(model, _hw(_dense_profile(model, tmp_path, proj, 4 * proj)))
    p, k = cm.params, cm.kernel_s
    # at the grid's first point: exactly the measured 100 us (batch 1) / 300 us (batch 4)
    assert cm.projection_s(1) == pytest.approx(100e-6 + (p.gpu_kernels_proj - 1) * k + 2 * cm.sync_s)
    assert cm.projection_s(4) == pytest.approx(300e-6 + (p.gpu_kernels_proj - 1) * k + 2 * cm.sync_s)
    # batch 16 lies outside the grid (batch 1-4): the roofline
    assert cm.projection_s(16) == pytest.approx(roof.projection_s(16))
    # the LM head (32000 x 4096 x 2 B = 262 MB) is beyond 4 x 32 MiB: the roofline
    assert cm.lm_head_s(1) == pytest.approx(roof.lm_head_s(1))


def test_sparse_stages_use_the_tables_inside_and_the_roofline_outside(tmp_path):
    model = load_model("relullama-7b")
    qkv_b, ffn_b = model.neuron_bytes
    data = small_profile()
    # FFN table covers 100..1000 active neurons; QKV table covers nothing the test asks for
    data["families"]["sparse_ffn"].update(x=[100 * ffn_b, 1000 * ffn_b])
    data["families"]["gather_gemv"].update(x=[1e12, 2e12])
    cm = CostModel(model, _hw(write(tmp_path, data)))
    roof = CostModel(model, _hw(""))
    L, J = model.n_layers, 8
    union = np.zeros((2 * L, J + 1))
    union[:, 0] = 100                                     # 100 active neurons on the GPU per group
    union[1::2, 0] = [100, 1000, 200, 50] * (L // 4)      # FFN groups: two inside, 200 inside, 50 below
    total = union * 2                                     # 2 sequences per active neuron
    got, _, _ = cm.sparse_stage_times(union, total)
    ref, _, _ = roof.sparse_stage_times(union, total)
    np.testing.assert_allclose(got[:, 0], ref[:, 0])      # QKV: outside its table
    # FFN at 100 and 1000 neurons, 2 sequences: log-interpolation between batch rows 1 and 4 (mid-way)
    assert got[0, 1] == pytest.approx(math.sqrt(10 * 20) * 1e-6)
    assert got[1, 1] == pytest.approx(math.sqrt(40 * 80) * 1e-6)
    assert got[3, 1] == pytest.approx(ref[3, 1])           # 50 neurons: below the table, roofline
    # idle groups stay free
    union[:, 0] = 0
    got, _, _ = cm.sparse_stage_times(union, union)
    assert np.all(got == 0)


def test_prefill_and_pcie_use_the_tables(tmp_path):
    model = load_model("relullama-7b")
    layer_fp16 = model.n_params_per_layer * 2
    data = small_profile()
    data["families"]["prefill"] = {"x_name": "layer_weight_bytes", "x": [layer_fp16 / 2, layer_fp16 * 2],
                                   "batch": [1, 16], "time_us": [[500.0, 2000.0], [4000.0, 16000.0]],
                                   "prompt_tokens": 128}
    data["families"]["h2d"].update(x=[1e3, 1e10], time_us=[[5.0, 5e5]])
    cm = CostModel(model, _hw(write(tmp_path, data)))
    roof = CostModel(model, _hw(""))
    # geometric mid-point of the prefill grid at batch 1: sqrt(500 x 2000) = 1000 us per layer
    pre = cm.prefill_cost(128, 1)
    lm = cm.lm_head_s(1)
    assert (pre["gpu_compute"] - lm) / model.n_layers == pytest.approx(1000e-6)
    # another prompt length: the roofline
    assert cm.prefill_cost(64, 1)["gpu_compute"] == pytest.approx(roof.prefill_cost(64, 1)["gpu_compute"])
    # h2d: 5 us at 1 kB .. 500 ms at 10 GB, log-linear, so 1e6 B -> 5 us x (1e3)^(log 1e5 / log 1e7)
    want = 5e-6 * 10 ** (5 * 3 / 7)
    assert float(cm.pcie_s(1e6)) == pytest.approx(want)
    assert float(cm.pcie_s(10.0)) == pytest.approx(10.0 / roof.pcie_bw)


def test_roofline_s_is_the_cost_models_formula():
    """gpuprofile.roofline_s (used by `calibrate compare`) must price exactly as the cost model does."""
    model = load_model("llama2-70b")
    hw = load_hardware("h100", 8, overrides={"gpu": {"profile": ""}})
    cm = CostModel(model, hw)
    p = CostParams()
    for b in (1, 4, 16):
        gemv = roofline_s("dense_gemv", hw.gpu, hw.pcie, model.proj_bytes_per_layer, b)
        assert cm.projection_s(b) == pytest.approx(gemv + (p.gpu_kernels_proj - 1) * cm.kernel_s + 2 * cm.sync_s)
    union = np.full((2 * model.n_layers, 9), 500.0)
    total = union * 3
    gpu, _, _ = cm.sparse_stage_times(union, total)
    for kind, fam in ((0, "gather_gemv"), (1, "sparse_ffn")):
        want = roofline_s(fam, hw.gpu, hw.pcie, 500 * model.neuron_bytes[kind], 3.0)
        assert gpu[0, kind] == pytest.approx(want)
    assert float(cm.pcie_s(1e8)) == pytest.approx(roofline_s("h2d", hw.gpu, hw.pcie, 1e8))


# ---- shipped profile, preset, compare, fit -------------------------------------------------------------
def test_shipped_h100_profile_is_valid_and_named_by_the_preset():
    assert SHIPPED in shipped_profiles()
    prof = load_profile(SHIPPED)
    assert prof.preset == "h100" and "H100" in prof.gpu_name
    for key in ("date", "driver", "cuda", "torch"):
        assert prof.provenance[key]
    assert {"dense_gemv", "gather_gemv", "sparse_ffn", "attention", "prefill", "h2d"} <= set(prof.tables)
    assert load_gpu("h100").profile == SHIPPED
    assert CostModel(load_model("llama2-70b"), load_hardware("h100")).profile is prof
    # the default GPU is untouched: roofline only
    assert load_gpu("rtx4090").profile == ""


def test_compare_reports_every_family_with_finite_errors():
    prof = load_profile(SHIPPED)
    hw = load_hardware("h100", overrides={"gpu": {"profile": ""}})
    rows = compare_profile(prof, hw.gpu, hw.pcie)
    assert {r["family"] for r in rows} == set(prof.tables) | {"launch"}
    for r in rows:
        assert np.isfinite(r["median_abs_err"]) and np.isfinite(r["worst_err"])
        assert abs(r["worst_err"]) >= r["median_abs_err"] - 1e-12


def test_fit_recovers_the_parameters_a_roofline_profile_was_made_from():
    gpu = load_gpu("h100", profile="", kernel_overhead_us=7.0, dense_bw_efficiency=0.8, sparse_bw_efficiency=0.6)
    hw = load_hardware("h100", overrides={"gpu": {"profile": ""}})
    x = np.geomspace(1e5, 1e9, 9)
    fams = {}
    for fam in ("dense_gemv", "gather_gemv"):
        t = roofline_s(fam, gpu, hw.pcie, x, 1.0) * 1e6
        fams[fam] = {"x_name": "weight_bytes" if fam == "dense_gemv" else "gathered_bytes", "x": list(x),
                     "batch": [1], "time_us": [list(t)]}
    prof = parse_profile({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "gpu": {"name": "synthetic"},
                          "provenance": {}, "families": fams})
    fit = fit_roofline(prof, hw.gpu, hw.pcie)
    assert fit["kernel_overhead_us"] == pytest.approx(7.0, rel=1e-3)
    assert fit["dense_bw_efficiency"] == pytest.approx(0.8, rel=1e-3)
    assert fit["sparse_bw_efficiency"] == pytest.approx(0.6, rel=1e-3)


# ---- run configuration ------------------------------------------------------------------------------
def test_run_config_gpu_profile_key():
    cfg = RunConfig(gpu="h100", gpu_profile="x.json")
    assert cfg.hardware["gpu"]["profile"] == "x.json"
    again = cfg.with_overrides(["gpu_profile=y.json"])
    assert again.hardware["gpu"]["profile"] == "y.json"
    with pytest.raises(NdpschedError, match="disagree"):
        again.with_overrides(["hardware.gpu.profile=z.json"])


# ---- CLI -------------------------------------------------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ndpsched", *args], capture_output=True, text=True, timeout=300)


SMALL_RUN = ["--model", "relullama-7b", "--prompt-len", "128", "--gen-len", "8", "--json"]


def test_cli_simulate_with_the_shipped_profile():
    with_prof = cli("simulate", "--gpu", "h100", "--gpu-profile", SHIPPED, *SMALL_RUN)
    assert with_prof.returncode == 0, with_prof.stderr
    roof = cli("simulate", "--gpu", "h100", "--gpu-profile", "", *SMALL_RUN)
    assert roof.returncode == 0, roof.stderr
    a, b = json.loads(with_prof.stdout), json.loads(roof.stdout)
    assert a["tokens_per_s"] > 0 and b["tokens_per_s"] > 0
    assert a["tokens_per_s"] != b["tokens_per_s"]           # the measured tables changed the prices
    assert a["config"]["gpu_profile"] == SHIPPED


@pytest.mark.parametrize("args, needle", [
    (["--gpu-profile", SHIPPED], "but the run uses GPU preset 'rtx4090'"),     # default GPU: mismatch
    (["--gpu", "h100", "--gpu-profile", "no/such/file.json"], "is not a file"),
])
def test_cli_bad_profile_is_one_line_exit_2(args, needle):
    r = cli("simulate", *args, *SMALL_RUN)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]


def test_cli_corrupt_profile_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_broken(lambda d: d.update(schema_version=0))))
    r = cli("calibrate", "compare", str(bad))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "schema_version 0" in r.stderr


def test_cli_calibrate_compare_shipped():
    r = cli("calibrate", "compare", SHIPPED, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["gpu_preset"] == "h100"
    assert {row["family"] for row in out["rows"]} >= {"dense_gemv", "sparse_ffn", "h2d", "launch"}
    assert 0 < out["fit"]["dense_bw_efficiency"] <= 1.0
