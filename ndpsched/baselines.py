"""The systems Hermes is compared with, priced on the same machine and model (Hermes section VI).

Dense offloading systems are priced analytically, layer by layer, vectorized over decode steps
(the KV cache grows each step); the sparsity-aware host system (PowerInfer, "hermes-host") runs
the neuron-level simulator with the host CPU in place of the NDP-DIMMs (:mod:`ndpsched.run`).

Every number below is a named parameter of :class:`BaselineParams` with its source or the word
"chosen". Real data paths are slower than nominal link rates: each system's copies carry an
efficiency of its own (pageable vs pinned, overlap or not, per-layer framework overhead).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .costmodel import ACTIVATION_BYTES, COMPONENTS, CostModel
from .errors import CapacityError, unknown_name
from .hardware import GB, HardwareSpec, check_non_negative_fields
from .models import ModelSpec
from .simulator import SimResult


@dataclass(frozen=True)
class BaselineParams:
    """Constants of the baseline systems' data paths (see module doc)."""

    #: Accelerate moves offloaded layers with plain tensor copies from pageable host memory;
    #: pageable host-to-device copies reach about half the pinned rate (chosen)
    accelerate_copy_efficiency: float = 0.5
    #: per offloaded layer and step: Accelerate's hooks, allocation and synchronisation, in ms (chosen)
    accelerate_layer_overhead_ms: float = 0.2
    #: ZeRO-Inference streams from pinned host memory, prefetching the next layer; FlexGen's
    #: profiler measured 12.89 GB/s host-to-GPU on its PCIe 3.0 T4 machine = 0.82 of 15.75 GB/s
    pinned_copy_efficiency: float = 0.82
    #: fraction of the disk preset's sequential read bandwidth that sustained safetensors layer
    #: loads reach (chosen)
    disk_efficiency: float = 0.7
    #: ZeRO-Inference option: keep the KV cache in host memory; each step reads and writes it
    #: back over PCIe
    zero_kv_offload: bool = False
    #: AirLLM loads each layer from disk ('disk') or from host memory ('host')
    airllm_source: str = "disk"
    #: per layer and step cost of a framework that launches a layer's kernels one by one, in us
    #: (norm, QKV, attention, projection, up/gate, down, residuals: ~8 kernels; chosen)
    layer_kernels: int = 8
    #: GPUs of the gpu-only reference (0: the fewest that hold the model and KV cache)
    gpu_count: int = 0
    #: per-direction GPU-to-GPU bandwidth for tensor parallelism: A100 NVLink3 600 GB/s total
    nvlink_gbps: float = 300.0
    #: latency of one all-reduce of a decode activation, in us (chosen)
    allreduce_us: float = 10.0
    #: Deja Vu: predictor cost as a fraction of the layer's compute (Deja Vu reports ~18 %)
    dejavu_predictor_fraction: float = 0.18
    #: PAPI: an FC kernel runs on the GPU when batch x tokens per step reaches this intensity
    #: (FLOPs per weight byte ~ batch), on the NDP side otherwise (chosen)
    papi_intensity_threshold: int = 8

    def __post_init__(self) -> None:
        check_non_negative_fields(self, "baseline parameter")
        if self.airllm_source not in ("disk", "host"):
            raise unknown_name("airllm_source", self.airllm_source, ["disk", "host"])


class _Dense:
    """Per-layer dense costs of one model on one machine (seconds), vectorized over steps."""

    def __init__(self, model: ModelSpec, hw: HardwareSpec, params: BaselineParams, batch: int) -> None:
        self.m, self.hw, self.p, self.B = model, hw, params, batch
        g = hw.gpu
        self.gpu_bw = g.memory_bw_gbps * GB * g.dense_bw_efficiency
        self.gpu_flops = g.fp16_tflops * 1e12 * g.compute_efficiency
        self.kernel_s = g.kernel_overhead_us * 1e-6
        self.pcie_peak = hw.pcie.peak_bw_gbps * GB
        self.layer_bytes = float(model.layer_bytes)
        self.layer_params = model.n_params_per_layer
        self.fc_bytes = float(model.sparse_bytes_per_layer)

    def gpu_layer_s(self, kv_len: np.ndarray, weight_bytes: float | None = None) -> np.ndarray:
        """One layer on the GPU: weights read from GPU memory, KV cache read, kernels launched."""
        w = self.layer_bytes if weight_bytes is None else weight_bytes
        kv = self.m.kv_bytes_per_token_layer * kv_len * self.B
        t_mem = (w + kv) / self.gpu_bw
        t_flop = 2.0 * self.layer_params * self.B / self.gpu_flops
        return np.maximum(t_mem, t_flop) + self.p.layer_kernels * self.kernel_s

    def transfer_s(self, nbytes: float, efficiency: float) -> float:
        return nbytes / (self.pcie_peak * efficiency)

    def lm_head_s(self) -> float:
        return self.m.lm_head_bytes / self.gpu_bw + self.kernel_s

    def gpu_layers_that_fit(self, kv_bytes: float) -> int:
        """Layers whose weights stay on the GPU beside the KV cache, LM head and embeddings."""
        free = self.hw.gpu.usable_bytes - kv_bytes - self.m.lm_head_bytes - self.m.embedding_bytes
        return int(np.clip(free // self.layer_bytes, 0, self.m.n_layers))


def host_platform(hw: HardwareSpec, bw_efficiency: float = 0.6) -> HardwareSpec:
    """The machine with the host CPU in place of the NDP-DIMMs, for PowerInfer-style systems.

    One "device" stands for the CPU and its DRAM: internal bandwidth = the host's memory
    bandwidth (i9-13900K: 2 channels x DDR5-5600 x 8 B = 89.6 GB/s, expressed as 2 ranks x
    1 bank group x 44.8 GB/s in the DIMM formula) times ``bw_efficiency`` (chosen: CPU GEMV
    kernels such as llama.cpp's reach ~60 % of DRAM bandwidth), MAC rate = the CPU's FP16
    throughput / 2, capacity = the same DIMMs as plain memory.
    """
    host = hw.host
    dimm = dataclasses.replace(
        hw.dimm, name=f"host-{host.name}", capacity_bytes=hw.dimm_total_bytes, data_rate_mtps=5600,
        channels=2, dimms_per_channel=1, ranks=int(round(host.memory_bw_gbps / 44.8)), bank_groups=1,
        bw_efficiency=bw_efficiency, ndp_multipliers=int(host.fp16_gflops / 2), ndp_fp16_lanes=1,
        ndp_cycles_per_multiply=1, ndp_clock_ghz=1.0)
    return hw.replace(dimm=dimm, n_dimms=1)


def _result(name: str, per_step: np.ndarray, parts: dict[str, np.ndarray | float], prefill_s: float,
            batch: int, gen_len: int, config: dict[str, Any]) -> SimResult:
    breakdown = dict.fromkeys(COMPONENTS, 0.0)
    for k, v in parts.items():
        breakdown[k] += float(np.sum(v))
    breakdown["pcie"] += prefill_s
    decode_s = float(per_step.sum())
    return SimResult(tokens_per_s=gen_len * batch / (prefill_s + decode_s), prefill_s=prefill_s, decode_s=decode_s,
                     breakdown_s=breakdown, token_s=per_step, dimm_imbalance=1.0,
                     moves={"promoted": 0, "evicted": 0, "remapped": 0}, bytes_moved={"pcie": 0.0, "dimm_link": 0.0},
                     hot_fraction=0.0, config={"system": name, **config})


def _kv(model: ModelSpec, batch: int, tokens: int) -> float:
    return float(model.kv_bytes_per_token * batch * tokens)


def _stream_prefill(d: _Dense, prompt_len: int, efficiency: float) -> float:
    """Prefill with every layer's weights crossing PCIe once, overlapped with its compute."""
    compute = 2.0 * d.layer_params * prompt_len * d.B / d.gpu_flops
    stream = d.transfer_s(d.layer_bytes, efficiency)
    return d.m.n_layers * max(compute, stream)


def accelerate(model, hw, p, batch, prompt_len, gen_len, steps_kv):
    """Hugging Face Accelerate ``device_map="auto"``: the layers that fit stay on the GPU, the rest
    live in host memory and are copied to the GPU when used, with no overlap."""
    d = _Dense(model, hw, p, batch)
    n_gpu = d.gpu_layers_that_fit(_kv(model, batch, prompt_len + gen_len))
    n_off = model.n_layers - n_gpu
    gpu = model.n_layers * d.gpu_layer_s(steps_kv)
    copy = n_off * (d.transfer_s(d.layer_bytes, p.accelerate_copy_efficiency) + p.accelerate_layer_overhead_ms * 1e-3)
    per_step = gpu + copy + d.lm_head_s()
    prefill = n_off * d.transfer_s(d.layer_bytes, p.accelerate_copy_efficiency) + \
        model.n_layers * 2.0 * d.layer_params * prompt_len * batch / d.gpu_flops
    return per_step, {"gpu_compute": gpu, "pcie": np.full_like(gpu, copy), "lm_head": d.lm_head_s() * np.ones_like(gpu)}, \
        prefill, {"gpu_layers": n_gpu, "offloaded_layers": n_off}


def zero_inference(model, hw, p, batch, prompt_len, gen_len, steps_kv):
    """DeepSpeed ZeRO-Inference: every layer streamed from pinned host memory each step, the next
    layer prefetched while the current one computes; quantized weights (``--weight-dtype int4``, its
    4-bit option) move fewer bytes."""
    d = _Dense(model, hw, p, batch)
    stream = d.transfer_s(d.layer_bytes, p.pinned_copy_efficiency)
    if p.zero_kv_offload:   # the layer's KV cache comes in and the new entry goes back each step
        kv = model.kv_bytes_per_token_layer * batch * steps_kv
        stream = stream + kv / (d.pcie_peak * p.pinned_copy_efficiency)
    compute = d.gpu_layer_s(steps_kv, d.layer_bytes)
    layer = np.maximum(stream, compute)
    per_step = model.n_layers * layer + d.lm_head_s()
    parts = {"gpu_compute": model.n_layers * compute, "pcie": model.n_layers * (layer - compute),
             "lm_head": d.lm_head_s() * np.ones_like(layer)}
    return per_step, parts, _stream_prefill(d, prompt_len, p.pinned_copy_efficiency), \
        {"weight_bytes": model.weight_bytes, "kv_offload": p.zero_kv_offload}


def airllm(model, hw, p, batch, prompt_len, gen_len, steps_kv):
    """AirLLM layered inference: one layer at a time is loaded (from disk or host memory) and run;
    nothing overlaps and nothing stays on the GPU between steps."""
    d = _Dense(model, hw, p, batch)
    if p.airllm_source == "disk":
        load = d.layer_bytes / (hw.disk.read_bw_gbps * GB * p.disk_efficiency) + hw.disk.latency_us * 1e-6
    else:
        load = d.transfer_s(d.layer_bytes, p.accelerate_copy_efficiency)
    compute = d.gpu_layer_s(steps_kv)
    per_step = model.n_layers * (load + compute) + d.lm_head_s()
    prefill = model.n_layers * (load + 2.0 * d.layer_params * prompt_len * batch / d.gpu_flops)
    return per_step, {"gpu_compute": model.n_layers * compute, "pcie": np.full_like(compute, model.n_layers * load),
                      "lm_head": d.lm_head_s() * np.ones_like(compute)}, prefill, {"source": p.airllm_source}


def gpu_only(model, hw, p, batch, prompt_len, gen_len, steps_kv):
    """Everything on k GPUs with tensor parallelism (the 5 x A100-40GB reference): each GPU reads
    1/k of every layer; two all-reduces per layer over NVLink."""
    d = _Dense(model, hw, p, batch)
    need = model.total_bytes + _kv(model, batch, prompt_len + gen_len)
    k = p.gpu_count or int(np.ceil(need / hw.gpu.usable_bytes))
    if need > k * hw.gpu.usable_bytes:
        raise CapacityError(f"gpu-only: {model.name} needs {need / 1e9:.1f} GB, {k} x {hw.gpu.name} hold "
                            f"{k * hw.gpu.usable_bytes / 1e9:.1f} GB; raise gpu_count")
    per_layer = d.gpu_layer_s(steps_kv / k, d.layer_bytes / k) if k > 1 else d.gpu_layer_s(steps_kv)
    act_bytes = model.d_model * ACTIVATION_BYTES * batch
    allreduce = 0.0 if k == 1 else 2 * (2 * (k - 1) / k * act_bytes / (p.nvlink_gbps * GB) + p.allreduce_us * 1e-6)
    per_step = model.n_layers * (per_layer + allreduce) + d.lm_head_s()
    prefill = model.n_layers * 2.0 * d.layer_params * prompt_len * batch / (d.gpu_flops * k)
    return per_step, {"gpu_compute": model.n_layers * per_layer, "sync": np.full_like(per_layer, model.n_layers * allreduce),
                      "lm_head": d.lm_head_s() * np.ones_like(per_layer)}, prefill, {"gpus": k}


def _ndp_dense_s(model, hw, batch, nbytes: float) -> float:
    """Dense FC work on the NDP-DIMMs, spread evenly: max(bandwidth, MAC rate)."""
    cm = CostModel(model, hw)
    macs = nbytes / model.weight_bytes * batch
    return max(nbytes / (cm.dimm_bw * hw.n_dimms), macs / (cm.ndp_macs * hw.n_dimms)) + cm.ndp_issue_s


def hermes_base(model, hw, p, batch, prompt_len, gen_len, steps_kv):
    """Hermes-base: NDP-DIMMs without sparsity. FC layers run on the GPU where their weights are
    resident and on the NDP-DIMMs otherwise; attention always on the NDP-DIMMs."""
    d = _Dense(model, hw, p, batch)
    cm = CostModel(model, hw)
    n_gpu = d.gpu_layers_that_fit(0.0)             # the KV cache lives in the DIMMs
    fc_gpu = d.gpu_layer_s(np.zeros_like(steps_kv), d.layer_bytes)
    fc_ndp = _ndp_dense_s(model, hw, batch, d.fc_bytes) + cm.projection_s(batch)
    attn = cm.attention_s(steps_kv, batch)
    sync = 4 * cm.sync_s                            # attention in, out; FC in, out
    per_step = n_gpu * fc_gpu + (model.n_layers - n_gpu) * fc_ndp + model.n_layers * (attn + sync) + d.lm_head_s()
    return per_step, {"gpu_compute": n_gpu * fc_gpu + (model.n_layers - n_gpu) * cm.projection_s(batch),
                      "dimm_compute": np.full_like(attn, (model.n_layers - n_gpu) * (fc_ndp - cm.projection_s(batch))),
                      "attention": model.n_layers * attn, "sync": np.full_like(attn, model.n_layers * sync),
                      "lm_head": d.lm_head_s() * np.ones_like(attn)}, \
        _stream_prefill(d, prompt_len, hw.pcie.efficiency), {"gpu_layers": n_gpu}


def papi(model, hw, p, batch, prompt_len, gen_len, steps_kv):
    """PAPI-style dispatch: per FC kernel and step, the GPU when its arithmetic intensity (batch x
    tokens per step) reaches ``papi_intensity_threshold`` (weights streamed over PCIe unless
    resident), the NDP-DIMMs otherwise; attention on the NDP side."""
    d = _Dense(model, hw, p, batch)
    cm = CostModel(model, hw)
    n_gpu = d.gpu_layers_that_fit(0.0)
    on_gpu = batch >= p.papi_intensity_threshold
    if on_gpu:
        stream = d.transfer_s(d.fc_bytes, hw.pcie.efficiency)
        fc_off = max(stream, float(d.gpu_layer_s(np.zeros(1), d.fc_bytes)[0])) + cm.projection_s(batch)
    else:
        fc_off = _ndp_dense_s(model, hw, batch, d.fc_bytes) + cm.projection_s(batch)
    fc_res = d.gpu_layer_s(np.zeros_like(steps_kv), d.layer_bytes)
    attn = cm.attention_s(steps_kv, batch)
    sync = 4 * cm.sync_s
    per_step = n_gpu * fc_res + (model.n_layers - n_gpu) * fc_off + model.n_layers * (attn + sync) + d.lm_head_s()
    return per_step, {"gpu_compute" if on_gpu else "dimm_compute": per_step - model.n_layers * (attn + sync) - d.lm_head_s(),
                      "attention": model.n_layers * attn, "sync": np.full_like(attn, model.n_layers * sync),
                      "lm_head": d.lm_head_s() * np.ones_like(attn)}, \
        _stream_prefill(d, prompt_len, hw.pcie.efficiency), {"fc_on": "gpu" if on_gpu else "ndp", "gpu_layers": n_gpu}


def dejavu(model, hw, p, batch, prompt_len, gen_len, steps_kv):
    """Deja Vu adapted to offloading: the layers that fit stay on the GPU; for the others only the
    predicted-active neurons (the batch's expected union) are copied over PCIe each step; the
    predictor costs ``dejavu_predictor_fraction`` of the layer's compute."""
    d = _Dense(model, hw, p, batch)
    n_gpu = d.gpu_layers_that_fit(_kv(model, batch, prompt_len + gen_len))
    qkv_f, ffn_f = model.active_fraction
    union = [1 - (1 - f) ** batch for f in (qkv_f, ffn_f)]
    sparse = model.d_model * model.qkv_neuron_bytes * union[0] + model.d_ffn * model.ffn_neuron_bytes * union[1]
    copy = d.transfer_s(sparse, p.pinned_copy_efficiency)
    compute = d.gpu_layer_s(steps_kv, sparse + model.proj_bytes_per_layer) * (1 + p.dejavu_predictor_fraction)
    full = d.gpu_layer_s(steps_kv) * (1 + p.dejavu_predictor_fraction)
    n_off = model.n_layers - n_gpu
    per_step = n_gpu * full + n_off * (compute + copy) + d.lm_head_s()
    return per_step, {"gpu_compute": n_gpu * full + n_off * compute, "pcie": np.full_like(full, n_off * copy),
                      "lm_head": d.lm_head_s() * np.ones_like(full)}, \
        _stream_prefill(d, prompt_len, p.pinned_copy_efficiency), {"gpu_layers": n_gpu}


def flexgen_policy(model: ModelSpec, hw: HardwareSpec, p: BaselineParams, batch: int, max_tokens: int,
                   kv_len: float, gpu_batches: int = 1) -> dict[str, float]:
    """FlexGen's linear-programming policy search (FlexGen section 4.3) for one block size.

    The block of ``batch`` sequences is computed as ``gpu_batches`` GPU batches that share each
    loaded layer (zig-zag order). Variables: the fractions of weights on GPU / CPU / disk
    (wg, wc, wd), of the KV cache on GPU / CPU (cg, cc) and of the activations on GPU / CPU
    (hg, hc); the LP minimises the time T of one layer for the block,
    T >= compute of all GPU batches, T >= PCIe traffic (CPU and disk weights once per block, CPU
    KV read and written back, CPU activations in and out), T >= disk reads, under the GPU and
    host capacities (the GPU also holds one GPU batch's working set). HiGHS via linprog.
    """
    from scipy.optimize import linprog

    d = _Dense(model, hw, p, batch)
    W = d.layer_bytes                                 # bytes of one layer as stored (compressed if quantized)
    kv_layer = model.kv_bytes_per_token_layer * batch * kv_len
    kv_total = model.kv_bytes_per_token * batch * max_tokens
    act_layer = ACTIVATION_BYTES * batch * (model.d_model + model.d_ffn)        # hidden + MLP activations
    act_total = act_layer * model.n_layers
    working = ACTIVATION_BYTES * (batch / gpu_batches) * (model.qkv_out_dim + model.d_ffn * 2) + W
    pcie = d.pcie_peak * p.pinned_copy_efficiency
    disk = hw.disk.read_bw_gbps * GB * p.disk_efficiency
    sub = _Dense(model, hw, p, max(batch // gpu_batches, 1))
    compute = gpu_batches * float(sub.gpu_layer_s(np.array([kv_len]))[0])
    gpu_free = hw.gpu.usable_bytes - model.lm_head_bytes - model.embedding_bytes - working
    host = hw.dimm_total_bytes
    if gpu_free <= 0:
        raise CapacityError(f"flexgen: one GPU batch of {batch // gpu_batches} does not fit {hw.gpu.name}")
    # x = [wg, wc, wd, cg, cc, hg, hc, T]; minimise T (tiny costs on slower tiers break ties)
    eps = 1e-5 * W / pcie           # ~1e-5 of a layer's copy time: above HiGHS' tolerances
    c = np.array([0, eps, 2 * eps, 0, eps, 0, eps, 1.0])
    A_ub = [
        [0, W / pcie, W / pcie, 0, 2 * kv_layer / pcie, 0, 2 * act_layer / pcie, -1],   # PCIe
        [0, 0, W / disk, 0, 0, 0, 0, -1],                                               # disk reads
        [W * model.n_layers, 0, 0, kv_total, 0, act_total, 0, 0],                        # GPU capacity
        [0, W * model.n_layers, 0, 0, kv_total, 0, act_total, 0],                        # host capacity
    ]
    A_eq = [[1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1, 0]]
    res = linprog(c, A_ub=A_ub, b_ub=[0, 0, gpu_free, host], A_eq=A_eq, b_eq=[1, 1, 1],
                  bounds=[(0, 1)] * 7 + [(compute, None)], method="highs")
    if res.status != 0:
        raise CapacityError(f"flexgen: no placement of {model.name} fits GPU, host memory and disk ({res.message})")
    wg, wc, wd, cg, cc, hg, hc, T = res.x
    return {"wg": wg, "wc": wc, "wd": wd, "cg": cg, "cc": cc, "hg": hg, "hc": hc, "layer_s": T,
            "gpu_batches": gpu_batches}


def flexgen_search(model, hw, p, batch, max_tokens, kv_len) -> dict[str, float]:
    """FlexGen's outer search: the number of GPU batches per block (a divisor of the batch) is
    chosen outside the LP, as in FlexGen, by the fastest feasible LP solution."""
    best = None
    for n in [k for k in range(1, batch + 1) if batch % k == 0]:
        try:
            pol = flexgen_policy(model, hw, p, batch, max_tokens, kv_len, n)
        except CapacityError:
            continue
        if best is None or pol["layer_s"] < best["layer_s"] * (1 - 1e-9):
            best = pol
    if best is None:
        raise CapacityError(f"flexgen: no block size of batch {batch} fits {model.name} on this machine")
    return best


def flexgen(model, hw, p, batch, prompt_len, gen_len, steps_kv):
    """FlexGen: per layer, weights not on the GPU are loaded once for the whole block of
    sequences (zig-zag schedule) and overlapped with compute and KV traffic; the placement of
    weights, KV cache and activations comes from its LP policy search (:func:`flexgen_policy`)
    at the mean KV length, the block's number of GPU batches from the outer search; ``--weight-dtype int4`` gives its group-wise 4-bit compression."""
    d = _Dense(model, hw, p, batch)
    pol = flexgen_search(model, hw, p, batch, prompt_len + gen_len, float(np.mean(steps_kv)))
    W = d.layer_bytes
    pcie = d.pcie_peak * p.pinned_copy_efficiency
    disk = hw.disk.read_bw_gbps * GB * p.disk_efficiency
    kv_layer = model.kv_bytes_per_token_layer * batch * steps_kv
    act_layer = ACTIVATION_BYTES * batch * (model.d_model + model.d_ffn)
    n = int(pol["gpu_batches"])
    compute = n * _Dense(model, hw, p, max(batch // n, 1)).gpu_layer_s(steps_kv)
    io = np.maximum((pol["wc"] + pol["wd"]) * W / pcie + 2 * pol["cc"] * kv_layer / pcie
                    + 2 * pol["hc"] * act_layer / pcie, pol["wd"] * W / disk)
    layer = np.maximum(compute, io)
    per_step = model.n_layers * layer + d.lm_head_s()
    return per_step, {"gpu_compute": model.n_layers * compute, "pcie": model.n_layers * (layer - compute),
                      "lm_head": d.lm_head_s() * np.ones_like(layer)},         _stream_prefill(d, prompt_len, p.pinned_copy_efficiency),         {k: round(float(v), 4) for k, v in pol.items()}


#: analytic baseline systems: name -> (description, pricing function)
BASELINES: dict[str, tuple[str, Callable]] = {
    "accelerate": ("Hugging Face Accelerate device_map=auto: offloaded layers copied when used, no overlap", accelerate),
    "zero-inference": ("DeepSpeed ZeRO-Inference: every layer streamed, next layer prefetched", zero_inference),
    "flexgen": ("FlexGen: zig-zag block schedule, LP-searched placement of weights and KV cache", flexgen),
    "airllm": ("AirLLM layered inference: one layer at a time from disk (or host)", airllm),
    "gpu-only": ("all weights on k GPUs with tensor parallelism (high-end reference)", gpu_only),
    "hermes-base": ("NDP-DIMMs without sparsity: FC on the GPU where resident, else on the DIMMs", hermes_base),
    "papi": ("PAPI-style dispatch by arithmetic intensity between GPU and NDP-DIMMs", papi),
    "dejavu": ("Deja Vu adapted to offloading: predicted-active neurons copied each step", dejavu),
}


def run_baseline(name: str, model: ModelSpec, hw: HardwareSpec, batch: int, prompt_len: int, gen_len: int,
                 params: BaselineParams | None = None) -> SimResult:
    """Price one baseline system; raises CapacityError when it cannot run the configuration."""
    if name not in BASELINES:
        raise unknown_name("baseline system", name, BASELINES)
    p = params or BaselineParams()
    host = hw.dimm_total_bytes     # the same DIMMs, used as plain host memory by these systems
    kv = _kv(model, batch, prompt_len + gen_len)
    if name not in ("gpu-only", "airllm", "flexgen") and model.total_bytes + kv > host + hw.gpu.usable_bytes:
        raise CapacityError(f"{name}: {model.name} needs {(model.total_bytes + kv) / 1e9:.1f} GB, host memory "
                            f"({host / 1e9:.0f} GB) + GPU hold {(host + hw.gpu.usable_bytes) / 1e9:.0f} GB")
    steps_kv = np.arange(prompt_len, prompt_len + gen_len, dtype=np.float64) + 1
    per_step, parts, prefill, info = BASELINES[name][1](model, hw, p, batch, prompt_len, gen_len, steps_kv)
    per_step = np.broadcast_to(np.asarray(per_step, dtype=np.float64), steps_kv.shape).copy()
    return _result(name, per_step, parts, float(prefill), batch, gen_len, {"info": info, "params": dataclasses.asdict(p)})
