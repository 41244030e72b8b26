"""Oracle cases for the execution model, computed by hand."""
from __future__ import annotations

import numpy as np
import pytest

from ndpsched.costmodel import COMPONENTS, CostModel, CostParams
from ndpsched.presets import load_hardware, load_model


def _counts(model, n_dimms, rng, gpu_share=0.5):
    L = model.n_layers
    c = np.zeros((2 * L, n_dimms + 1))
    c[:, 0] = rng.integers(0, 200, 2 * L) * gpu_share
    c[:, 1:] = rng.integers(0, 400, (2 * L, n_dimms))
    return c


@pytest.fixture
def cm():
    return CostModel(load_model("llama2-70b"), load_hardware("rtx4090", 8))


def test_all_on_gpu_gives_zero_dimm_time(cm):
    c = np.zeros((2 * cm.n_layers, 9))
    c[:, 0] = 1000
    cost = cm.steps_cost(c, c, kv_len=200, batch=1)
    assert cost.components["dimm_compute"] == 0.0
    _, _, dimm = cm.sparse_stage_times(c, c)
    assert np.all(dimm == 0)


def test_even_split_gives_equal_dimm_times(cm):
    c = np.zeros((2 * cm.n_layers, 9))
    c[:, 1:] = 123
    _, _, dimm = cm.sparse_stage_times(c, c)
    assert np.allclose(dimm, dimm[..., :1])
    assert cm.steps_cost(c, c, 200, 1).dimm_imbalance[0] == pytest.approx(1.0)


def test_hand_computed_stage(cm):
    m, hw = cm.model, cm.hw
    c = np.zeros((2 * cm.n_layers, 9))
    c[0, 0] = 100   # layer 0 QKV: 100 active neurons on the GPU
    c[0, 3] = 50    # and 50 on DIMM 2
    gpu, sync, dimm = cm.sparse_stage_times(c, c)
    nb = m.qkv_neuron_bytes
    bw_gpu = hw.gpu.memory_bw_gbps * 1e9 * hw.gpu.sparse_bw_efficiency
    want_gpu = max(100 * nb / bw_gpu, 2 * 100 * m.qkv_out_dim / (hw.gpu.fp16_tflops * 1e12 * hw.gpu.compute_efficiency))
    assert gpu[0, 0] == pytest.approx(want_gpu + hw.gpu.kernel_overhead_us * 1e-6)
    assert sync[0, 0] == pytest.approx(2 * cm.params.sync_us * 1e-6)
    want_dimm = max(50 * nb / (hw.dimm.internal_bw_gbps * 1e9), 50 * m.qkv_out_dim / 128e9) + 1e-6
    assert dimm[0, 0, 2] == pytest.approx(want_dimm)
    assert dimm[0, 0, [0, 1, 3, 4, 5, 6, 7]].sum() == 0
    assert gpu[1:].sum() == 0 and gpu[0, 1] == 0   # idle stages cost nothing


def test_breakdown_adds_up(cm):
    rng = np.random.default_rng(0)
    c = np.stack([_counts(cm.model, 8, rng) for _ in range(4)])
    mig = np.full(cm.n_layers, 5e7)
    cost = cm.steps_cost(c, c, np.arange(4) + 100, 1, migration_pcie_bytes=mig)
    assert set(cost.components) == set(COMPONENTS)
    assert sum(cost.components.values()) == pytest.approx(cost.step_s.sum())
    assert cost.components["exposed_migration"] > 0


def test_moving_to_least_loaded_dimm_never_raises_max(cm):
    rng = np.random.default_rng(1)
    for _ in range(50):
        c = _counts(cm.model, 8, rng)
        _, _, before = cm.sparse_stage_times(c, c)
        g = rng.integers(0, 2 * cm.n_layers)
        loads = c[g, 1:]
        src, dst = int(np.argmax(loads)), int(np.argmin(loads))
        if loads[src] == 0:
            continue
        c2 = c.copy()
        c2[g, 1 + src] -= 1
        c2[g, 1 + dst] += 1
        _, _, after = cm.sparse_stage_times(c2, c2)
        layer, kind = divmod(int(g), 2)
        assert after[layer, kind].max() <= before[layer, kind].max() + 1e-15


def test_doubling_dimm_bandwidth_never_slows(cm):
    rng = np.random.default_rng(2)
    fast = CostModel(cm.model, load_hardware("rtx4090", 8, overrides={"dimm": {"data_rate_mtps": 6400}}))
    assert fast.dimm_bw == pytest.approx(2 * cm.dimm_bw)
    for batch in (1, 4, 16):
        c = _counts(cm.model, 8, rng)
        slow_t = cm.steps_cost(c, c * batch, 300, batch).step_s[0]
        fast_t = fast.steps_cost(c, c * batch, 300, batch).step_s[0]
        assert fast_t <= slow_t


def test_batch_reads_union_computes_sum(cm):
    c = np.zeros((2 * cm.n_layers, 9))
    c[:, 1] = 1000
    _, _, one = cm.sparse_stage_times(c, c)
    _, _, batch = cm.sparse_stage_times(c, 16 * c)   # same weights, 16x the MACs
    assert np.all(batch[..., 0] > one[..., 0])              # 16 sequences of GEMV: compute bound on the NDP core


def test_attention_grows_with_kv(cm):
    assert cm.attention_s(1000, 1) > cm.attention_s(100, 1)
    assert cm.attention_s(100, 16) > cm.attention_s(100, 1)


def test_attention_split_by_heads():
    m = load_model("llama2-70b")     # 8 KV heads
    assert CostModel(m, load_hardware(n_dimms=8))._attn_share == pytest.approx(1 / 8)
    assert CostModel(m, load_hardware(n_dimms=3))._attn_share == pytest.approx(3 / 8)   # ceil(8/3) heads
    assert CostModel(m, load_hardware(n_dimms=16))._attn_share == pytest.approx(1 / 16)
    even = CostModel(m, load_hardware(n_dimms=3), CostParams(attention_split="even"))
    assert even._attn_share == pytest.approx(1 / 3)


def test_prefill_is_pcie_bound_for_large_models():
    cm = CostModel(load_model("llama2-70b"), load_hardware())
    p = cm.prefill_cost(128, 1)
    stream = cm.model.n_layers * cm.model.sparse_bytes_per_layer / cm.pcie_bw
    assert sum(p.values()) == pytest.approx(stream + cm.lm_head_s(1), rel=1e-9)


def test_bad_cost_params():
    with pytest.raises(Exception, match="attention_split"):
        CostParams(attention_split="diagonal")
    with pytest.raises(Exception, match="sync_us"):
        CostParams(sync_us=-1)


def test_hand_computed_window_batch1(cm):
    """The batch-1 path (``total`` None): one busy QKV stage shared by the GPU and a DIMM, one FFN
    stage on two DIMMs, every other stage idle; the step time and DIMM imbalance by hand."""
    m, hw, p = cm.model, cm.hw, cm.params
    c = np.zeros((1, 2 * cm.n_layers, 9))
    c[0, 0, 0], c[0, 0, 3] = 100, 50          # layer 0 QKV: 100 on the GPU, 50 on DIMM 2
    c[0, 1, 1], c[0, 1, 2] = 30, 10           # layer 0 FFN: 30 on DIMM 0, 10 on DIMM 1
    dimm_bw, ndp_macs = hw.dimm.internal_bw_gbps * 1e9, hw.dimm.ndp_macs_per_s
    issue = p.ndp_issue_us * 1e-6

    def dimm_s(n, kind):
        return max(n * m.neuron_bytes[kind] / dimm_bw, n * m.neuron_macs[kind] / ndp_macs) + issue

    bw_gpu = hw.gpu.memory_bw_gbps * 1e9 * hw.gpu.sparse_bw_efficiency
    flops = hw.gpu.fp16_tflops * 1e12 * hw.gpu.compute_efficiency
    gpu_qkv = (max(100 * m.qkv_neuron_bytes / bw_gpu, 2 * 100 * m.neuron_macs[0] / flops)
               + p.gpu_kernels_qkv * hw.gpu.kernel_overhead_us * 1e-6 + 2 * p.sync_us * 1e-6)
    stage_qkv, stage_ffn = max(gpu_qkv, dimm_s(50, 0)), dimm_s(30, 1)
    _, merge, proj, lm = cm.fixed_times_s(1)
    attn = float(cm.attention_s(200, 1))
    want_step = stage_qkv + stage_ffn + cm.n_layers * (merge + proj + attn) + lm
    cost = cm.steps_cost(c, None, np.array([200]), 1)
    assert cost.step_s[0] == pytest.approx(want_step, rel=1e-12)
    busy = dimm_s(50, 0) + dimm_s(30, 1) + dimm_s(10, 1)
    assert cost.dimm_imbalance[0] == pytest.approx((dimm_s(50, 0) + dimm_s(30, 1)) * 8 / busy, rel=1e-12)
    critical_gpu = gpu_qkv >= dimm_s(50, 0)
    assert cost.components["dimm_compute"] == pytest.approx(stage_ffn + (0 if critical_gpu else stage_qkv), rel=1e-12)


@pytest.mark.parametrize("n_steps", [1, 5])
@pytest.mark.parametrize("migration", [False, True])
def test_batch1_path_matches_general_path(cm, n_steps, migration):
    """Batch 1 prices through its own path (``total`` None); with ``total`` equal to ``union`` the
    general path must give the same numbers (up to summation order)."""
    rng = np.random.default_rng(n_steps + 10 * migration)
    c = np.stack([_counts(cm.model, 8, rng) for _ in range(n_steps)])
    c[rng.random(c.shape) < 0.3] = 0                      # idle stages and DIMMs
    kv = np.arange(100, 100 + n_steps) + 1
    L = cm.n_layers
    mig = (rng.random(L) * 2e6, rng.random(L) * 1e-4) if migration else (None, None)
    fast, general = cm.steps_cost(c, None, kv, 1, *mig), cm.steps_cost(c, c.copy(), kv, 1, *mig)
    for a, b in ((fast.step_s, general.step_s), (fast.layer_s, general.layer_s),
                 (fast.dimm_imbalance, general.dimm_imbalance)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    for k in general.components:
        assert fast.components[k] == pytest.approx(general.components[k], rel=1e-12, abs=1e-18), k
    for k in general.stage_s:
        assert fast.stage_s[k] == pytest.approx(general.stage_s[k], rel=1e-12), k
