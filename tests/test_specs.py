"""Hardware and model specs: derived numbers against hand computation, and validation."""
from __future__ import annotations

import pytest

from ndpsched.errors import ConfigError, UnknownNameError
from ndpsched.presets import gpu_names, load_gpu, load_hardware, load_model, model_names


def test_dimm_bandwidth_derivation():
    d = load_hardware().dimm
    assert d.pin_bw_gbps == pytest.approx(25.6)              # 3200 MT/s x 8 B
    assert d.internal_peak_bw_gbps == pytest.approx(204.8)   # 4 ranks x 2 bank groups x 25.6
    assert d.internal_bw_gbps == pytest.approx(204.8 * d.bw_efficiency)
    assert 8 * d.internal_peak_bw_gbps == pytest.approx(1638.4)  # Hermes Fig. 1: ~1.6 TB/s for 8 DIMMs
    assert d.ndp_macs_per_s == pytest.approx(128e9)          # 256 x 8 lanes / 16 cycles x 1 GHz


def test_pcie_generations():
    assert load_hardware(pcie_gen=3).pcie.peak_bw_gbps == pytest.approx(15.754, rel=1e-3)
    assert load_hardware(pcie_gen=4).pcie.peak_bw_gbps == pytest.approx(31.508, rel=1e-3)
    assert load_hardware(pcie_gen=5).pcie.peak_bw_gbps == pytest.approx(63.015, rel=1e-3)
    assert load_hardware("t4").pcie.gen == 3


def test_all_presets_load():
    assert {"rtx4090", "rtx3090", "t4", "a100-40gb", "h100", "h200"} <= set(gpu_names())
    assert {"opt-13b", "opt-30b", "opt-66b", "relullama-7b", "llama2-13b", "llama2-70b", "falcon-40b"} <= set(model_names())
    for name in gpu_names():
        assert load_gpu(name).source
    for name in model_names():
        assert load_model(name).source


def test_model_sizes_by_hand():
    m = load_model("llama2-70b")
    assert m.head_dim == 128
    assert m.qkv_out_dim == 8192 + 2 * 8 * 128
    assert m.qkv_neuron_bytes == 10240 * 2
    assert m.ffn_neuron_bytes == 3 * 8192 * 2
    assert m.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2
    assert m.n_neurons == 80 * (8192 + 28672)
    assert 68e9 < m.n_params < 70e9                 # Llama-2-70B: 69B parameters
    opt = load_model("opt-66b")
    assert opt.ffn_neuron_bytes == 2 * 9216 * 2     # not gated: fc1 row + fc2 column
    assert 64e9 < opt.n_params < 67e9


def test_bad_names_and_values():
    with pytest.raises(UnknownNameError, match="Did you mean 'rtx4090'"):
        load_gpu("rtx4900")
    with pytest.raises(ConfigError, match="n_dimms"):
        load_hardware(n_dimms=17)
    with pytest.raises(ConfigError, match="n_dimms"):
        load_hardware(n_dimms=0)
    with pytest.raises(ConfigError, match="memory_bw_gbps"):
        load_gpu("t4", memory_bw_gbps=-1.0)
    with pytest.raises(UnknownNameError, match="memory_bw_gbs"):
        load_gpu("t4", memory_bw_gbs=1.0)
    with pytest.raises(ConfigError, match="d_model"):
        load_model("tiny", d_model=0)
    with pytest.raises(UnknownNameError, match="hardware part"):
        load_hardware(overrides={"gpuu": {}})
