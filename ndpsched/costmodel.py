"""Execution-time model of one decode token (and of prefill) on a GPU + NDP-DIMMs.

Per transformer layer, in order (Hermes section III-B; see ``docs`` in the README):

1. **QKV** (sparse): hot QKV neurons on the GPU, cold ones on their home DIMM.
   stage = max(GPU time, slowest DIMM) + merge of the partial Q/K/V vectors over DIMM-link.
2. **Attention** on the DIMMs over the KV cache (grows with the sequence), split by KV head.
3. **Projection** W_o (dense) on the GPU; the DIMMs are idle, so hot-neuron copies (PCIe) and
   DIMM-to-DIMM remaps (DIMM-link) run now; what does not fit under it is *exposed*.
4. **FFN** (sparse), like QKV, with the merge of the layer output on the DIMM side.

GPU time of a sparse stage = roofline(bytes, FLOPs) + kernels x kernel overhead + 2 x T_sync
(one sync brings the input from the DIMMs, one sends the partial result back; Hermes' formula),
charged only when the GPU holds an active neuron of that layer and kind.
NDP time = max(weight bytes / internal bandwidth, MACs / MAC rate) + an issue overhead.

Batch: weight bytes come from the *union* of the batch's active neurons (each weight is read
once per step), compute from the *sum* (every sequence multiplies it).

With a measured GPU profile (``GpuSpec.profile``, ``ndpsched calibrate gpu``), the GPU kernels
(sparse QKV and FFN, W_o, LM head, prefill) and the PCIe copies are priced from its interpolated
tables inside their measured range, and by the roofline above outside it (``ndpsched.gpuprofile``).

All functions are vectorized over layers. Inputs are per (layer, kind) *group* counts:
``union, total: (2L, J+1)`` active neurons per group and device (device 0 = GPU, 1+j = DIMM j),
group ``2*layer + kind`` with kind 0 = QKV, 1 = FFN.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import unknown_name
from .gpuprofile import PREFILL_PROMPT_TOKENS, profile_for
from .jit import kernel
from .hardware import GB, HardwareSpec, check_non_negative_fields
from .models import ModelSpec

#: bytes of an activation element (partial sums, layer outputs): fp16 whatever the weights' precision
ACTIVATION_BYTES = 2

#: breakdown components, in report order; they add up to the total time
COMPONENTS = ("gpu_compute", "dimm_compute", "attention", "sync", "merge", "pcie", "dimm_link",
              "exposed_migration", "lm_head")


@dataclass(frozen=True)
class CostParams:
    """Constants of the execution model the papers leave open (Hermes section IX-style gaps).

    Every field is a chosen default, documented here, and overridable (``--cost key=value``).
    """

    #: T_sync: one GPU<->DIMM synchronisation (small transfer over PCIe + stream sync), in us.
    #: Hermes names T_sync but gives no value; ~10 us is a PCIe round trip plus a
    #: cudaStreamSynchronize on current drivers.
    sync_us: float = 10.0
    #: kernels launched per sparse QKV stage on the GPU (one gathered-row GEMV)
    gpu_kernels_qkv: int = 1
    #: kernels per sparse FFN stage (fused up/gate gathered GEMV + down gathered GEMV)
    gpu_kernels_ffn: int = 2
    #: kernels for the dense output projection (one GEMV) plus residual/norm (one)
    gpu_kernels_proj: int = 2
    #: cost for the host to issue one NDP stage's instruction stream to a DIMM, in us (chosen)
    ndp_issue_us: float = 1.0
    #: how attention is split over DIMMs: 'heads' (KV heads round-robin; the busiest DIMM holds
    #: ceil(kv_heads / J) heads, or 1/J of the sequence when heads < DIMMs) or 'even' (ideal split)
    attention_split: str = "heads"
    #: how partial sums are reduced over DIMMs: 'tree' (log2(J) DIMM-link hops) or 'host'
    #: (gathered by the host at PCIe speed). Hermes does not say; 'tree' uses DIMM-link.
    merge: str = "tree"
    #: run the LM head on the GPU (the paper is silent; it is dense and small enough to keep)
    lm_head_on_gpu: bool = True
    #: prefill streams non-resident weights over PCIe overlapped with compute (FlexGen-style)
    prefill_overlap: bool = True

    def __post_init__(self) -> None:
        if self.attention_split not in ("heads", "even"):
            raise unknown_name("attention_split", self.attention_split, ["heads", "even"])
        if self.merge not in ("tree", "host"):
            raise unknown_name("merge", self.merge, ["tree", "host"])
        check_non_negative_fields(self, "cost parameter")


@dataclass
class StepsCost:
    """Time of a run of consecutive decode steps (seconds)."""

    step_s: np.ndarray            # (T,) time of each step
    layer_s: np.ndarray           # (T, L) time of each layer in each step
    components: dict[str, float]  # component -> seconds summed over the steps; adds up to step_s.sum()
    dimm_imbalance: np.ndarray    # (T,) sum over stages of the slowest DIMM / sum of the mean DIMM
    stage_s: dict[str, float]     # per pipeline stage (qkv, attention, projection, ffn, other), summed

    @property
    def total_s(self) -> float:
        return float(self.step_s.sum())


class CostModel:
    """Prices decode steps and prefill for one model on one machine."""

    def __init__(self, model: ModelSpec, hw: HardwareSpec, params: CostParams | None = None) -> None:
        self.model = model
        self.hw = hw
        self.params = params or CostParams()
        p, g, d = self.params, hw.gpu, hw.dimm
        self.n_dimms = hw.n_dimms
        self.n_layers = model.n_layers
        # per-kind constants, shape (2,) indexed by kind
        self.neuron_bytes = np.array(model.neuron_bytes, dtype=np.float64)
        self.neuron_macs = np.array(model.neuron_macs, dtype=np.float64)
        self.out_dim = np.array([model.qkv_out_dim, model.d_model], dtype=np.float64)
        self.gpu_kernels = np.array([p.gpu_kernels_qkv, p.gpu_kernels_ffn], dtype=np.float64)
        # rates in bytes/s and FLOP/s
        self.gpu_sparse_bw = g.memory_bw_gbps * GB * g.sparse_bw_efficiency
        self.gpu_dense_bw = g.memory_bw_gbps * GB * g.dense_bw_efficiency
        self.gpu_flops = g.fp16_tflops * 1e12 * g.compute_efficiency
        self.kernel_s = g.kernel_overhead_us * 1e-6
        self.sync_s = p.sync_us * 1e-6
        self.dimm_bw = d.internal_bw_gbps * GB
        self.ndp_macs = d.ndp_macs_per_s
        self.ndp_issue_s = p.ndp_issue_us * 1e-6
        self.link_bw = hw.dimm_link.bw_gbps * GB
        self.link_lat_s = hw.dimm_link.latency_us * 1e-6
        self.pcie_bw = hw.pcie.bw_gbps * GB
        self._attn_share = self._attention_share()
        # per-neuron roofline of one active neuron (batch 1: bytes and MACs of the same neuron)
        self._gpu_per_neuron_s = np.maximum(self.neuron_bytes / self.gpu_sparse_bw, 2.0 * self.neuron_macs / self.gpu_flops)
        self._dimm_per_neuron_s = np.maximum(self.neuron_bytes / self.dimm_bw, self.neuron_macs / self.ndp_macs)[:, None]
        self._gpu_kernels_s = self.gpu_kernels * self.kernel_s
        self._batch_cache: dict[int, tuple[np.ndarray, float, float, float]] = {}
        # the same per stage 2l + kind, (2L,): for the batch-1 path (see _batch1_window)
        self._b1_gpu_per_neuron_s = np.tile(self._gpu_per_neuron_s, self.n_layers)
        self._b1_gpu_fixed_s = np.tile(self._gpu_kernels_s + 2 * self.sync_s, self.n_layers)   # kernels + 2 syncs
        self._b1_dimm_per_neuron_s = np.tile(self._dimm_per_neuron_s[:, 0], self.n_layers)
        self._attention_cache: dict[int, float] = {}
        self._window_attention: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        #: measured GPU tables (None: roofline only); checked against the GPU preset
        self.profile = profile_for(g)

    # ---- pieces -------------------------------------------------------------------------------
    def _attention_share(self) -> float:
        """Fraction of a layer's attention work on the busiest DIMM."""
        j, h = self.n_dimms, self.model.n_kv_heads
        if self.params.attention_split == "even" or h < j:
            return 1.0 / j
        return float(np.ceil(h / j)) / h

    def merge_s(self, batch: int) -> np.ndarray:
        """(2,) seconds to reduce one stage's partial outputs across DIMMs (QKV, FFN)."""
        out_bytes = self.out_dim * ACTIVATION_BYTES * batch
        if self.n_dimms == 1:
            return np.zeros(2)
        if self.params.merge == "host":
            return out_bytes * self.n_dimms / self.pcie_bw + self.sync_s
        hops = np.ceil(np.log2(self.n_dimms))
        return hops * (out_bytes / self.link_bw + self.link_lat_s)

    def projection_s(self, batch: int) -> float:
        """Dense W_o GEMV/GEMM on the GPU, with its two syncs (input from, output to the DIMMs)."""
        m = self.model
        gemv = self._dense_gemv_s(m.proj_bytes_per_layer, 2.0 * m.d_model * m.d_model * batch, batch)
        return gemv + (self.params.gpu_kernels_proj - 1) * self.kernel_s + 2 * self.sync_s

    def _dense_gemv_s(self, nbytes: float, flops: float, batch: int) -> float:
        """One dense GEMV/GEMM kernel: measured where the profile covers it, else the roofline."""
        t = max(nbytes / self.gpu_dense_bw, flops / self.gpu_flops) + self.kernel_s
        if self.profile is not None:
            t = float(self.profile.lookup_s("dense_gemv", nbytes, batch, t))
        return t

    def pcie_s(self, nbytes):
        """Host->GPU copy time of ``nbytes`` (any shape): measured h2d table, else bytes / PCIe bandwidth."""
        t = np.asarray(nbytes, dtype=np.float64) / self.pcie_bw
        return t if self.profile is None else self.profile.lookup_s("h2d", nbytes, 1.0, t)

    def attention_s(self, kv_len, batch: int):
        """Decode attention of one layer on the busiest DIMM over ``kv_len`` cached tokens.

        ``kv_len`` may be an array (one entry per step); the result has its shape.
        """
        return np.asarray(kv_len, dtype=np.float64) * self._attention_s_per_token(batch) + self.ndp_issue_s

    def window_attention_s(self, first_kv: int, n: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(kv_len, attention_s) of ``n`` consecutive decode steps attending to ``first_kv``,
        ``first_kv + 1``, ... cached tokens: (n,) float arrays, read-only, kept per window (a
        simulator prices the same windows episode after episode)."""
        key = (first_kv, n, batch)
        out = self._window_attention.get(key)
        if out is None:
            kv_len = np.arange(first_kv, first_kv + n, dtype=np.float64)
            out = (kv_len, self.attention_s(kv_len, batch))
            for a in out:
                a.flags.writeable = False
            self._window_attention[key] = out
        return out

    def _attention_s_per_token(self, batch: int) -> float:
        """Seconds per cached token of one layer's decode attention on the busiest DIMM: the slower
        of reading its K/V rows and of their MACs (both linear in the cached tokens, so the
        roofline's max is taken once per batch size instead of per step)."""
        if batch not in self._attention_cache:
            m = self.model
            kv_bytes = m.kv_bytes_per_token_layer * batch * self._attn_share
            # q.K^T and p.V: 2 MACs per cached element per query head sharing it
            macs = 2 * m.n_heads * m.head_dim * batch * self._attn_share
            self._attention_cache[batch] = max(kv_bytes / self.dimm_bw, macs / self.ndp_macs)
        return self._attention_cache[batch]

    def lm_head_s(self, batch: int) -> float:
        m = self.model
        if self.params.lm_head_on_gpu:
            return self._dense_gemv_s(m.lm_head_bytes, 2.0 * m.vocab_size * m.d_model * batch, batch) + self.sync_s
        # on the DIMMs, vocabulary rows split evenly
        return m.lm_head_bytes / (self.dimm_bw * self.n_dimms) + self.ndp_issue_s

    def sparse_stage_times(self, union: np.ndarray, total: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """GPU compute, GPU sync and per-DIMM times of every sparse stage.

        Args:
            union: (..., 2L, J+1) active neurons per group/device, union over the batch.
            total: (..., 2L, J+1) active neurons per group/device, summed over the batch; None
                when it equals ``union`` (batch 1), which halves the work.

        Returns:
            gpu_compute (..., L, 2), gpu_sync (..., L, 2), dimm (..., L, 2, J) in seconds.
        """
        lead = union.shape[:-2]
        u = union.reshape(lead + (self.n_layers, 2, -1))
        s = u if total is None else total.reshape(lead + (self.n_layers, 2, -1))
        u_gpu, s_gpu = u[..., 0], s[..., 0]
        busy = u_gpu > 0
        if self.profile is None and total is None:
            # max(u a, u b) = u max(a, b) exactly (rounding is monotonic), one product instead of two
            gpu_compute = u_gpu * self._gpu_per_neuron_s + self._gpu_kernels_s
        else:
            gpu_compute = np.maximum(u_gpu * (self.neuron_bytes / self.gpu_sparse_bw),
                                     s_gpu * (2.0 * self.neuron_macs / self.gpu_flops)) + self._gpu_kernels_s
        if self.profile is not None:
            # measured gathered-row kernels, keyed by the bytes read and the sequences per active row
            x = u_gpu * self.neuron_bytes
            b = s_gpu / np.maximum(u_gpu, 1.0)
            gpu_compute = np.stack([self.profile.lookup_s("gather_gemv", x[..., 0], b[..., 0], gpu_compute[..., 0]),
                                    self.profile.lookup_s("sparse_ffn", x[..., 1], b[..., 1], gpu_compute[..., 1])], -1)
        gpu_compute = np.where(busy, gpu_compute, 0.0)
        gpu_sync = np.where(busy, 2 * self.sync_s, 0.0)
        u_dimm = u[..., 1:]
        if total is None:
            dimm = u_dimm * self._dimm_per_neuron_s
        else:
            dimm = np.maximum(u_dimm * (self.neuron_bytes / self.dimm_bw)[:, None],
                              s[..., 1:] * (self.neuron_macs / self.ndp_macs)[:, None])
        dimm = np.where(u_dimm > 0, dimm + self.ndp_issue_s, 0.0)
        return gpu_compute, gpu_sync, dimm

    def fixed_times_s(self, batch: int) -> tuple[np.ndarray, float, float, float]:
        """Times that do not depend on the active neurons, for ``batch``: (merge_s per kind, their
        sum, projection_s, lm_head_s), cached."""
        if batch not in self._batch_cache:
            merge = self.merge_s(batch)
            self._batch_cache[batch] = (merge, float(merge.sum()), self.projection_s(batch), self.lm_head_s(batch))
        return self._batch_cache[batch]

    # ---- decode steps -----------------------------------------------------------------------
    def steps_cost(self, union: np.ndarray, total: np.ndarray | None, kv_len: np.ndarray, batch: int,
                   migration_pcie_bytes: np.ndarray | None = None,
                   migration_link_s: np.ndarray | None = None,
                   attention_s: np.ndarray | None = None) -> StepsCost:
        """Price T consecutive decode steps at once (vectorized over steps and layers).

        Args:
            union, total: (T, 2L, J+1) active-neuron counts per step (see :meth:`sparse_stage_times`;
                ``total`` None: equal to ``union``, as in batch 1).
            kv_len: (T,) cached tokens attended to at each step (this token included).
            batch: sequences in the batch.
            migration_pcie_bytes: (L,) hot-neuron copy bytes DIMM->GPU, done in the first step.
            migration_link_s: (L,) DIMM-link time of remaps (busiest port), done in the first step.
            attention_s: (T,) :meth:`attention_s` of ``kv_len`` if the caller has it (see
                :meth:`window_attention_s`).
        """
        union = np.asarray(union)
        if union.ndim == 2:
            union = union[None]
            total = None if total is None else np.asarray(total)[None]
        T, L = union.shape[0], self.n_layers
        kv_len = np.asarray(kv_len, dtype=np.float64)
        if kv_len.shape != (T,):
            kv_len = np.broadcast_to(kv_len, (T,))
        proj_sync = 2 * self.sync_s
        merge_kind, merge, proj, lm = self.fixed_times_s(batch)
        attn = self.attention_s(kv_len, batch) if attention_s is None else attention_s     # (T,)
        if total is None and self.profile is None:
            # batch 1 on the roofline (the envs' and the sweeps' case): one compiled pass over the
            # counts, no array of per-DIMM times (tests check it against the general path)
            pcie_s = _NO_TIMES if migration_pcie_bytes is None else self.pcie_s(migration_pcie_bytes)
            link_s = _NO_TIMES if migration_link_s is None else np.asarray(migration_link_s, dtype=np.float64)
            (layer, step, per_stage, gpu_part, n_sync, dimm_part, imbalance, exposed_s,
             attn_sum) = _batch1_steps(np.ascontiguousarray(union, dtype=np.float64), self._b1_gpu_per_neuron_s,
                                       self._b1_gpu_fixed_s, self._b1_dimm_per_neuron_s, self.ndp_issue_s, self.n_dimms,
                                       np.asarray(attn, dtype=np.float64), merge + proj, lm, proj, pcie_s, link_s)
            sync_part = proj_sync * n_sync
            gpu_part -= sync_part
        else:
            union = np.asarray(union, dtype=np.float64)
            total = None if total is None else np.asarray(total, dtype=np.float64)
            gpu_c, gpu_sync, dimm = self.sparse_stage_times(union, total)     # (T,L,2), (T,L,2), (T,L,2,J)
            dimm_max = dimm.max(axis=-1)
            gpu_side = gpu_c + gpu_sync
            gpu_critical = gpu_side >= dimm_max
            gpu_part = gpu_c[gpu_critical].sum()
            sync_part = gpu_sync[gpu_critical].sum()
            busy_sum = dimm.sum(axis=(1, 2, 3))
            stage = np.maximum(gpu_side, dimm_max)                              # (T, L, 2)
            per_stage = stage.sum(axis=(0, 1))                                  # (2,) qkv, ffn
            dimm_part = dimm_max[~gpu_critical].sum()
            slowest = dimm_max.reshape(T, -1).sum(axis=1)
            # sum over stages of the slowest DIMM / of the mean DIMM (J cancels: sum over DIMMs)
            imbalance = np.where(busy_sum > 0, slowest * self.n_dimms / np.maximum(busy_sum, 1e-300), 1.0)
            layer = stage.sum(axis=-1) + (merge + proj) + attn[:, None]
            exposed_s = 0.0
            if migration_pcie_bytes is not None or migration_link_s is not None:
                pcie_s = np.zeros(L) if migration_pcie_bytes is None else self.pcie_s(migration_pcie_bytes)
                link_s = np.zeros(L) if migration_link_s is None else migration_link_s
                exposed = np.maximum(0.0, np.maximum(pcie_s, link_s) - proj)
                layer[0] += exposed
                exposed_s = float(exposed.sum())
            step = layer.sum(axis=1) + lm
            attn_sum = attn.sum()
        attn_s = float(L * attn_sum)
        comps = {
            "gpu_compute": float(gpu_part + T * L * (proj - proj_sync)),
            "dimm_compute": float(dimm_part),
            "attention": attn_s,
            "sync": float(sync_part + T * L * proj_sync),
            "merge": float(T * L * merge) if self.params.merge == "host" else 0.0,
            "pcie": 0.0,
            "dimm_link": float(T * L * merge) if self.params.merge == "tree" else 0.0,
            "exposed_migration": exposed_s,
            "lm_head": float(T * lm),
        }
        stages = {
            "qkv": float(per_stage[0] + T * L * merge_kind[0]),
            "attention": attn_s,
            "projection": float(T * L * proj + exposed_s),
            "ffn": float(per_stage[1] + T * L * merge_kind[1]),
            "other": float(T * lm),
        }
        return StepsCost(step_s=step, layer_s=layer, components=comps, dimm_imbalance=imbalance, stage_s=stages)

    # ---- prefill --------------------------------------------------------------------------
    def prefill_cost(self, prompt_len: int, batch: int) -> dict[str, float]:
        """Prefill of ``batch`` prompts of ``prompt_len`` tokens on the GPU, weights streamed.

        Sparse (QKV + FFN) weights of every layer cross PCIe once (FlexGen-style, overlapped
        with the previous layer's compute when ``prefill_overlap``); the dense W_o and LM head
        are resident. Hot neurons are kept on the GPU as they pass (Hermes: "after prefill only
        the selected hot neurons are loaded").
        """
        m = self.model
        tokens = prompt_len * batch
        stream = float(self.pcie_s(m.sparse_bytes_per_layer))
        dense_flops = 2.0 * tokens * m.n_params_per_layer
        # causal attention: QK^T and PV over on average prompt_len / 2 keys
        attn_flops = 2.0 * 2 * batch * m.n_heads * m.head_dim * prompt_len * prompt_len / 2
        compute = (dense_flops + attn_flops) / self.gpu_flops + 6 * self.kernel_s
        if self.profile is not None and prompt_len == PREFILL_PROMPT_TOKENS and m.weight_bytes == 2:
            # measured fp16 layer over `batch` prompts of 128 tokens (the table's only prompt length)
            compute = float(self.profile.lookup_s("prefill", m.n_params_per_layer * 2, batch, compute))
        per_layer = max(stream, compute) if self.params.prefill_overlap else stream + compute
        lm = self.lm_head_s(batch)
        return {
            "pcie": self.n_layers * (per_layer - compute if per_layer > compute else 0.0),
            "gpu_compute": self.n_layers * compute + lm,
        }


#: an empty (0,) time array: "none" for the compiled batch-1 pricing
_NO_TIMES = np.zeros(0)


@kernel
def _batch1_steps(union, gpu_per_neuron, gpu_fixed, dimm_per_neuron, issue_s, n_dimms, attn, fixed_s, lm_s, proj_s,
                  pcie_s, link_s):
    """:func:`_batch1_window`, then the whole steps: a layer adds ``fixed_s`` (merges and the
    projection) and its step's attention ``attn[t]``; the first step's layers add the migration
    time the projection does not hide (max of ``pcie_s`` / ``link_s`` (L,) or empty arrays, minus
    ``proj_s``, if positive); a step adds ``lm_s`` to its layers.

    Returns (layer (T, L), step (T,), per-kind stage sums (2,), GPU-critical time, busy GPU
    stages, DIMM-critical time, DIMM imbalance (T,), exposed migration time, attention sum)."""
    layer, per_kind, gpu_part, n_sync, dimm_part, imbalance = _batch1_window(
        union, gpu_per_neuron, gpu_fixed, dimm_per_neuron, issue_s, n_dimms)
    T, L = layer.shape
    for t in range(T):
        for j in range(L):
            layer[t, j] = layer[t, j] + fixed_s + attn[t]
    exposed_s = 0.0
    if len(pcie_s) or len(link_s):
        for j in range(L):
            late = max(pcie_s[j] if len(pcie_s) else 0.0, link_s[j] if len(link_s) else 0.0) - proj_s
            if late > 0.0:
                layer[0, j] += late
                exposed_s += late
    step = np.empty(T)
    attn_sum = 0.0
    for t in range(T):
        total = 0.0
        for j in range(L):
            total += layer[t, j]
        step[t] = total + lm_s
        attn_sum += attn[t]
    return layer, step, per_kind, gpu_part, n_sync, dimm_part, imbalance, exposed_s, attn_sum


@kernel
def _batch1_window(union, gpu_per_neuron, gpu_fixed, dimm_per_neuron, issue_s, n_dimms):
    """Batch-1 roofline pricing of T steps from (T, 2L, J+1) active counts (stage 2l + kind,
    GPU first), in one pass. A stage's GPU side is its compute and two syncs (0 where the GPU
    is idle in it); a DIMM's time ``u c + issue`` where its count ``u`` > 0 grows with ``u``, so
    the slowest DIMM is the one with the largest count. The stage takes the slower side.

    Returns (layer times without the fixed parts (T, L), per-kind sums (2,) qkv / ffn, the
    GPU-side time of the stages where the GPU is critical (syncs included), how many such busy
    stages, the slowest-DIMM time of the other stages, and per step the DIMM imbalance (T,): the
    sum over stages of the slowest DIMM over that of the mean DIMM, 1 if the DIMMs are idle)."""
    T, S, D = union.shape
    layer = np.zeros((T, S // 2))
    per_kind = np.zeros(2)
    slowest = np.zeros(T)
    busy_sum = np.zeros(T)
    gpu_part = dimm_part = 0.0
    n_sync = 0
    for t in range(T):
        for st in range(S):
            g = union[t, st, 0]
            gpu = (g * gpu_per_neuron[st] + gpu_fixed[st]) if g > 0 else 0.0
            u_max = 0.0
            u_sum = 0.0
            busy = 0
            for d in range(1, D):
                u = union[t, st, d]
                u_max = max(u_max, u)
                u_sum += u
                busy += u > 0
            dimm = (u_max * dimm_per_neuron[st] + issue_s) if u_max > 0 else 0.0
            busy_sum[t] += u_sum * dimm_per_neuron[st] + issue_s * busy
            slowest[t] += dimm
            if gpu >= dimm:
                gpu_part += gpu
                n_sync += g > 0
                stage = gpu
            else:
                dimm_part += dimm
                stage = dimm
            layer[t, st // 2] += stage
            per_kind[st % 2] += stage
    imbalance = np.ones(T)
    for t in range(T):
        if busy_sum[t] > 0:
            imbalance[t] = slowest[t] * n_dimms / busy_sum[t]
    return layer, per_kind, gpu_part, n_sync, dimm_part, imbalance
