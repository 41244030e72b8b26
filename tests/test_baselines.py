"""The systems Hermes compares with: hand-computed oracles, monotonicity, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from ndpsched.baselines import BASELINES, BaselineParams, host_platform, run_baseline
from ndpsched.config import RunConfig
from ndpsched.errors import CapacityError, UnknownNameError
from ndpsched.hardware import GB
from ndpsched.presets import load_hardware, load_model
from ndpsched.run import simulate


@pytest.fixture
def small():
    # a small model on a GPU that holds only part of it
    model = load_model("relullama-7b")
    hw = load_hardware("rtx4090", 8, overrides={"gpu": {"memory_bytes": 8e9, "reserved_bytes": 1e9}})
    return model, hw


def test_zero_inference_by_hand(small):
    model, hw = small
    r = run_baseline("zero-inference", model, hw, 1, 16, 4)
    g = hw.gpu
    stream = model.layer_bytes / (hw.pcie.peak_bw_gbps * GB * 0.82)
    kv = model.kv_bytes_per_token_layer * np.arange(17, 21)
    compute = (model.layer_bytes + kv) / (g.memory_bw_gbps * GB * g.dense_bw_efficiency) + 8 * g.kernel_overhead_us * 1e-6
    lm = model.lm_head_bytes / (g.memory_bw_gbps * GB * g.dense_bw_efficiency) + g.kernel_overhead_us * 1e-6
    want = model.n_layers * np.maximum(stream, compute) + lm
    assert np.allclose(r.token_s, want)
    assert sum(r.breakdown_s.values()) == pytest.approx(r.prefill_s + r.decode_s)


def test_airllm_by_hand(small):
    model, hw = small
    r = run_baseline("airllm", model, hw, 1, 16, 4)
    load = model.layer_bytes / (hw.disk.read_bw_gbps * GB * 0.7)
    assert hw.disk.read_bw_gbps == pytest.approx(7.45)
    assert r.token_s[0] > model.n_layers * load
    assert r.token_s[0] < model.n_layers * load * 1.2     # loading dominates


def test_accelerate_keeps_what_fits(small):
    model, hw = small
    r = run_baseline("accelerate", model, hw, 1, 16, 4)
    info = r.config["info"]
    assert info["gpu_layers"] + info["offloaded_layers"] == model.n_layers
    assert 0 < info["gpu_layers"] < model.n_layers


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_more_pcie_bandwidth_never_slows(name, small):
    model, hw = small
    slow = run_baseline(name, model, load_hardware("rtx4090", 8, pcie_gen=3, overrides={"gpu": {"memory_bytes": 8e9}}), 2, 16, 4)
    fast = run_baseline(name, model, load_hardware("rtx4090", 8, pcie_gen=5, overrides={"gpu": {"memory_bytes": 8e9}}), 2, 16, 4)
    assert fast.tokens_per_s >= slow.tokens_per_s * (1 - 1e-12)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_larger_model_never_faster(name):
    hw = load_hardware("a100-40gb" if name == "gpu-only" else "rtx4090", 16)
    small = run_baseline(name, load_model("opt-13b"), hw, 1, 16, 4)
    large = run_baseline(name, load_model("opt-30b"), hw, 1, 16, 4)
    assert large.tokens_per_s < small.tokens_per_s


def test_more_dimm_bandwidth_never_slows_ndp_baselines():
    model = load_model("opt-30b")
    for name in ("hermes-base", "papi"):
        a = run_baseline(name, model, load_hardware("rtx4090", 8), 1, 16, 4)
        b = run_baseline(name, model, load_hardware("rtx4090", 8, overrides={"dimm": {"data_rate_mtps": 6400}}), 1, 16, 4)
        assert b.tokens_per_s >= a.tokens_per_s


def test_gpu_only_counts_gpus():
    r = run_baseline("gpu-only", load_model("llama2-70b"), load_hardware("a100-40gb"), 1, 128, 128)
    assert r.config["info"]["gpus"] == 4
    with pytest.raises(CapacityError, match="raise gpu_count"):
        run_baseline("gpu-only", load_model("llama2-70b"), load_hardware("a100-40gb"), 1, 128, 128,
                     BaselineParams(gpu_count=2))


def test_bad_inputs():
    with pytest.raises(UnknownNameError, match="baseline system"):
        run_baseline("flexgenn", load_model("tiny"), load_hardware(), 1, 8, 8)
    with pytest.raises(UnknownNameError, match="Did you mean 'accelerate'"):
        simulate(RunConfig(system="accelerat", model="tiny"))
    with pytest.raises(CapacityError, match="host memory"):
        run_baseline("accelerate", load_model("llama2-70b"), load_hardware(n_dimms=2), 1, 128, 128)


def test_host_platform_is_the_cpu():
    hw = host_platform(load_hardware())
    assert hw.n_dimms == 1
    assert hw.dimm.internal_peak_bw_gbps == pytest.approx(89.6)
    assert hw.dimm.ndp_macs_per_s == pytest.approx(500e9)
    r = simulate(RunConfig(system="hermes-host", model="tiny", prompt_len=8, gen_len=8,
                           hardware={"gpu": {"memory_bytes": 4.6e5, "reserved_bytes": 0}}))
    assert r.tokens_per_s > 0 and r.config["partition"]["name"] == "powerinfer.topk"


def test_hermes_beats_offloading_on_a_large_model():
    hw = load_hardware()
    model = load_model("opt-66b")
    acc = run_baseline("accelerate", model, hw, 1, 128, 128)
    zero = run_baseline("zero-inference", model, hw, 1, 128, 128)
    assert zero.tokens_per_s > acc.tokens_per_s       # overlap beats no overlap


def test_flexgen_policy_is_feasible_and_uses_the_gpu_first():
    from ndpsched.baselines import flexgen_policy

    hw = load_hardware()
    fits = flexgen_policy(load_model("opt-30b", weight_bytes=0.5), hw, BaselineParams(), 1, 256, 200)
    assert fits["wg"] == pytest.approx(1.0)            # 4-bit OPT-30B fits the 24 GB GPU
    big = flexgen_policy(load_model("opt-66b"), hw, BaselineParams(), 1, 256, 200)
    assert big["wg"] + big["wc"] + big["wd"] == pytest.approx(1.0)
    W = load_model("opt-66b").layer_bytes * 64
    assert big["wg"] * W <= hw.gpu.usable_bytes        # GPU capacity respected
    assert big["wd"] == pytest.approx(0.0, abs=1e-6)   # host memory has room: no disk
    assert big["hg"] + big["hc"] == pytest.approx(1.0)
    from ndpsched.baselines import flexgen_search
    best = flexgen_search(load_model("opt-66b"), hw, BaselineParams(), 16, 256, 200)
    assert 16 % best["gpu_batches"] == 0
    assert best["layer_s"] <= flexgen_policy(load_model("opt-66b"), hw, BaselineParams(), 16, 256, 200, 1)["layer_s"]
    r4 = run_baseline("flexgen", load_model("opt-66b", weight_bytes=0.5), hw, 1, 128, 128)
    r16 = run_baseline("flexgen", load_model("opt-66b"), hw, 1, 128, 128)
    assert r4.tokens_per_s > r16.tokens_per_s          # compression moves fewer bytes


def test_precision_is_priced_by_bytes_in_every_system():
    from ndpsched.config import RunConfig

    for system in ("zero-inference", "accelerate", "hermes-base", "dejavu"):
        fp16 = simulate(RunConfig(model="opt-30b", system=system))
        int4 = simulate(RunConfig(model="opt-30b", system=system, weight_dtype="int4"))
        assert int4.tokens_per_s > fp16.tokens_per_s, system
    m = load_model("llama2-70b", weight_bytes=0.5, kv_bytes=1)
    assert m.total_bytes == pytest.approx(load_model("llama2-70b").total_bytes / 4)
    assert m.kv_bytes_per_token == load_model("llama2-70b").kv_bytes_per_token / 2
    assert m.n_params == load_model("llama2-70b").n_params
    with pytest.raises(UnknownNameError, match="int4"):
        RunConfig(weight_dtype="int3")


def test_accelerate_by_hand(small):
    model, hw = small
    r = run_baseline("accelerate", model, hw, 1, 16, 4)
    g = hw.gpu
    n_off = r.config["info"]["offloaded_layers"]
    bw = g.memory_bw_gbps * GB * g.dense_bw_efficiency
    kv = model.kv_bytes_per_token_layer * np.arange(17, 21)
    layer = (model.layer_bytes + kv) / bw + 8 * g.kernel_overhead_us * 1e-6
    copy = n_off * (model.layer_bytes / (hw.pcie.peak_bw_gbps * GB * 0.5) + 0.2e-3)
    lm = model.lm_head_bytes / bw + g.kernel_overhead_us * 1e-6
    assert np.allclose(r.token_s, model.n_layers * layer + copy + lm)


def test_gpu_only_single_gpu_is_a_roofline(small):
    model, _ = small
    hw = load_hardware("h100")
    r = run_baseline("gpu-only", model, hw, 1, 16, 4)
    assert r.config["info"]["gpus"] == 1
    bw = hw.gpu.memory_bw_gbps * GB * hw.gpu.dense_bw_efficiency
    floor = model.n_layers * model.layer_bytes / bw
    launches = (model.n_layers * 8 + 1) * hw.gpu.kernel_overhead_us * 1e-6
    kv_and_head = (model.kv_bytes_per_token * 17 + model.lm_head_bytes) / bw
    assert r.token_s[0] == pytest.approx(floor + launches + kv_and_head)   # memory-bound decode


def test_zero_inference_kv_offload_costs_pcie():
    model = load_model("opt-30b")
    hw = load_hardware()
    on_gpu = run_baseline("zero-inference", model, hw, 16, 128, 128)
    offload = run_baseline("zero-inference", model, hw, 16, 128, 128, BaselineParams(zero_kv_offload=True))
    assert offload.tokens_per_s < on_gpu.tokens_per_s


def test_papi_equals_hermes_base_below_its_threshold():
    model, hw = load_model("opt-30b"), load_hardware()
    for batch in (1, 4):
        assert np.allclose(run_baseline("papi", model, hw, batch, 16, 4).token_s,
                           run_baseline("hermes-base", model, hw, batch, 16, 4).token_s)
    assert run_baseline("papi", model, hw, 8, 16, 4).config["info"]["fc_on"] == "gpu"


def test_hermes_base_by_hand_with_nothing_resident():
    from ndpsched.costmodel import CostModel

    model = load_model("opt-13b")
    hw = load_hardware("rtx4090", 8, overrides={"gpu": {"memory_bytes": 2.5e9, "reserved_bytes": 1e9}})
    r = run_baseline("hermes-base", model, hw, 1, 16, 4)
    assert r.config["info"]["gpu_layers"] == 0
    cm = CostModel(model, hw)
    fc = model.sparse_bytes_per_layer
    ndp = max(fc / (cm.dimm_bw * 8), fc / model.weight_bytes / (cm.ndp_macs * 8)) + cm.ndp_issue_s
    per_layer = ndp + cm.projection_s(1) + cm.attention_s(np.arange(17, 21), 1) + 4 * cm.sync_s
    g = hw.gpu
    lm = model.lm_head_bytes / (g.memory_bw_gbps * GB * g.dense_bw_efficiency) + g.kernel_overhead_us * 1e-6
    assert np.allclose(r.token_s, model.n_layers * per_layer + lm)


def test_dejavu_moves_only_the_expected_active_neurons():
    model = load_model("opt-66b")
    hw = load_hardware("rtx4090", 8, overrides={"gpu": {"memory_bytes": 3e9, "reserved_bytes": 1e9}})
    r1 = run_baseline("dejavu", model, hw, 1, 16, 4)
    assert r1.config["info"]["gpu_layers"] == 0
    q, f = model.active_fraction
    active = model.d_model * model.qkv_neuron_bytes * q + model.d_ffn * model.ffn_neuron_bytes * f
    copy = active / (hw.pcie.peak_bw_gbps * GB * 0.82)
    assert r1.breakdown_s["pcie"] - r1.prefill_s == pytest.approx(4 * model.n_layers * copy)
