"""The decode loop: trace -> policies -> cost model -> metrics.

The simulator keeps, incrementally, how many neurons of every (layer, kind) group are active
on every device (``union`` and ``total``, see :mod:`ndpsched.costmodel`). A token changes only
the neurons that toggle (the trace is delta encoded) and a window's moves change only the moved
neurons, so a step costs O(toggles + moves), not O(neurons): this is what makes neuron-level
simulation of llama2-70b (3 million neurons) run far faster than real time.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .costmodel import COMPONENTS, CostModel, CostParams
from .errors import CapacityError, ConfigError, TraceError
from .hardware import HardwareSpec
from .models import ModelSpec
from .policy import (BalancerPolicy, PartitionPolicy,
                     Placement, PredictorPolicy, SchedContext, WindowActivity, check_dimm_capacity,
                     check_gpu_capacity)
from .trace import ActivationTrace, NeuronLayout

log = logging.getLogger(__name__)


@dataclass
class SimResult:
    """Metrics of one simulated generation."""

    tokens_per_s: float
    prefill_s: float
    decode_s: float
    breakdown_s: dict[str, float]
    token_s: np.ndarray                    # (G,) time of each decode step
    dimm_imbalance: float                  # mean over steps of sum(max DIMM) / sum(mean DIMM)
    moves: dict[str, int]
    bytes_moved: dict[str, float]
    hot_fraction: float                    # share of neuron activations computed on the GPU
    #: decode time per pipeline stage: qkv, attention, projection (incl. exposed migration),
    #: ffn (the MLP block), other (LM head); adds up to decode_s
    stage_s: dict[str, float] = field(default_factory=dict)
    #: predictor statistics: recall, precision, table sizes (empty for the oracle)
    predictor: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    #: wall time of the decode loop alone (set-up, i.e. profiles and initial placement, excluded)
    loop_wall_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens_per_s": self.tokens_per_s,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "decode_ms_per_token": 1e3 * self.decode_s / max(len(self.token_s), 1),
            "breakdown_s": self.breakdown_s,
            "dimm_imbalance": self.dimm_imbalance,
            "stage_s": self.stage_s,
            "predictor": self.predictor,
            "hot_fraction": self.hot_fraction,
            "moves": self.moves,
            "bytes_moved": self.bytes_moved,
            "wall_s": self.wall_s,
            "loop_wall_s": self.loop_wall_s,
            "config": self.config,
        }


def memory_budgets(model: ModelSpec, hw: HardwareSpec, params: CostParams, batch: int, max_tokens: int) -> tuple[float, float]:
    """(GPU bytes for hot copies, bytes per DIMM for weights), or CapacityError if it cannot fit.

    The GPU holds the dense W_o of every layer and the LM head; the rest of its usable memory is
    for hot-neuron copies. The DIMMs hold every weight (Hermes keeps all weights in the DIMMs)
    plus the KV cache of ``batch`` sequences of ``max_tokens``.
    """
    dense_gpu = model.n_layers * model.proj_bytes_per_layer + (model.lm_head_bytes if params.lm_head_on_gpu else 0)
    gpu_budget = hw.gpu.usable_bytes - dense_gpu
    if gpu_budget < 0:
        raise CapacityError(
            f"model '{model.name}' does not fit GPU '{hw.gpu.name}': its dense part (W_o + LM head) needs "
            f"{dense_gpu / 1e9:.1f} GB, the GPU has {hw.gpu.usable_bytes / 1e9:.1f} GB usable; choose a larger GPU")
    kv = model.kv_bytes_per_token * batch * max_tokens
    dense_dimm = model.total_bytes - model.n_layers * model.sparse_bytes_per_layer
    need = model.total_bytes + kv
    have = hw.dimm_total_bytes
    if need > have:
        per = hw.dimm.capacity_bytes
        n_min = int(np.ceil(need / per))
        hint = f"use --dimms {n_min} or more" if n_min <= hw.MAX_DIMMS else "reduce batch or sequence length"
        raise CapacityError(
            f"model '{model.name}' does not fit: weights {model.total_bytes / 1e9:.1f} GB + KV cache "
            f"{kv / 1e9:.1f} GB = {need / 1e9:.1f} GB, but {hw.n_dimms} DIMMs x {per / 1e9:.0f} GB hold "
            f"{have / 1e9:.0f} GB; {hint}")
    dimm_budget = hw.dimm.capacity_bytes - (kv + dense_dimm) / hw.n_dimms
    return gpu_budget, dimm_budget


class Simulator:
    """Simulates prefill + ``gen_len`` decode steps of a batch under a set of policies.

    Args:
        model, hw: what is simulated.
        trace: activation trace with at least ``batch`` sequences of ``prompt_len + gen_len`` tokens.
        partition, predictor, balancer: policy instances (the predictor is copied per sequence).
        batch, prompt_len, gen_len: workload (Hermes: prompt 128, 128 generated, batch 1-16).
        window_tokens: online policies decide once per window (Hermes: 5 tokens).
        cost_params: constants of the execution model.
        seed: root seed; policies get spawned children.
    """

    def __init__(self, model: ModelSpec, hw: HardwareSpec, trace: ActivationTrace,
                 partition: PartitionPolicy, predictor: PredictorPolicy, balancer: BalancerPolicy,
                 batch: int = 1, prompt_len: int = 128, gen_len: int = 128, window_tokens: int = 5,
                 cost_params: CostParams | None = None, seed: int = 0,
                 offline_freqs: np.ndarray | None = None) -> None:
        for name, value in (("batch", batch), ("prompt_len", prompt_len), ("gen_len", gen_len),
                            ("window_tokens", window_tokens)):
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        trace.check_model(model)
        if trace.n_seqs < batch:
            raise TraceError(f"trace has {trace.n_seqs} sequences, batch {batch} needs {batch}; "
                             "use a generator (--trace skew) or a trace with more sequences")
        if trace.n_tokens < prompt_len + gen_len:
            raise TraceError(f"trace has {trace.n_tokens} tokens per sequence, prompt {prompt_len} + "
                             f"generated {gen_len} needs {prompt_len + gen_len}")
        self.model, self.hw, self.trace = model, hw, trace
        self.batch, self.prompt_len, self.gen_len, self.window_tokens = batch, prompt_len, gen_len, window_tokens
        self.cost = CostModel(model, hw, cost_params)
        self.partition, self.predictor, self.balancer = partition, predictor, balancer
        self.seed = seed
        self.layout = NeuronLayout.of(model)
        self._offline_freqs = offline_freqs

    # ---- set-up -------------------------------------------------------------------------------
    def _context(self) -> SchedContext:
        trace, P = self.trace, self.prompt_len
        gpu_budget, dimm_budget = memory_budgets(self.model, self.hw, self.cost.params, self.batch,
                                                 self.prompt_len + self.gen_len)
        batch_trace = trace.sequences(range(self.batch)) if trace.n_seqs != self.batch else trace
        prefill = batch_trace.frequencies(0, P)
        offline = self._offline_freqs if self._offline_freqs is not None else trace.offline_freqs
        if offline is None:
            # no separate profile: the prompts of every sequence in the trace stand in for it
            offline = prefill if batch_trace is trace else trace.frequencies(0, P)
        if offline.shape != (self.layout.n_neurons,):
            raise TraceError(f"offline profile has shape {offline.shape}, expected ({self.layout.n_neurons},)")
        policy_rng = np.random.default_rng(np.random.SeedSequence(self.seed).spawn(1)[0])
        return SchedContext(self.model, self.hw, self.cost, self.layout, self.batch, self.window_tokens,
                            offline, prefill, gpu_budget, dimm_budget, policy_rng,
                            layer_parents=getattr(trace, "layer_parents", None))

    # ---- the run --------------------------------------------------------------------------------
    def run(self, progress: bool = False) -> SimResult:
        wall0 = time.perf_counter()
        ctx = self._context()
        L, J, B, P, G, W = self.model.n_layers, self.hw.n_dimms, self.batch, self.prompt_len, self.gen_len, self.window_tokens
        n_dev = J + 1
        K = 2 * L * n_dev
        on_gpu = self.partition.initial_partition(ctx)
        home = self.balancer.initial_mapping(ctx, on_gpu)
        placement = Placement(on_gpu, home)
        self._dimm_bytes = np.bincount(home, weights=ctx.neuron_bytes, minlength=self.hw.n_dimms)
        group = ctx.group_of
        # key of a neuron = its (group, device) cell; int16 keeps the gathers cache friendly
        key_dtype = np.int16 if K < 2**15 else np.int32
        key_of = (group * n_dev + placement.device()).astype(key_dtype)

        # batch activity at the last prompt token; the first decode step applies token P's toggles
        active = np.zeros(self.layout.n_neurons, dtype=np.uint8)
        predictors = [copy.deepcopy(self.predictor) for _ in range(B)]
        for s, pred in enumerate(predictors):
            pred.begin(ctx, self.trace.active(s, P - 1), P - 1)
            active += pred.initial_computed().astype(np.uint8)   # what the first step starts from
        for policy in (self.partition, self.balancer):
            policy.start(active, P - 1)
        observers = [p for p in (self.partition, self.balancer) if p.observes_tokens]
        # The batch's active counts cost a scatter per toggle; keep them only where something reads
        # them: the batch union, online moves (a moved active neuron moves its count), or a policy.
        online = _is_online(self.partition, PartitionPolicy) or _is_online(self.balancer, BalancerPolicy)
        keep_active = B > 1 or online or any(p.uses_neuron_activity for p in (self.partition, self.balancer, self.predictor))

        total = np.bincount(key_of, weights=active, minlength=K).astype(np.int64)
        union = total if B == 1 else np.bincount(key_of, weights=active > 0, minlength=K).astype(np.int64)

        prefill = self.cost.prefill_cost(P, B)
        breakdown = dict.fromkeys(COMPONENTS, 0.0)
        for k, v in prefill.items():
            breakdown[k] += v
        token_s = np.zeros(G)
        imbalance = np.zeros(G)
        stage_s: dict[str, float] = {}
        gpu_work = 0.0
        all_work = 0.0
        moves = {"promoted": 0, "evicted": 0, "remapped": 0}
        moved_bytes = {"pcie": 0.0, "dimm_link": 0.0}
        pending_pcie = np.zeros(L)
        pending_link = np.zeros(L)
        # counts of every step of a window, priced together once the window is complete
        total_buf = np.zeros((W, K))
        union_buf = total_buf if B == 1 else np.zeros((W, K))

        loop0 = time.perf_counter()
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=G, desc=f"decode {self.model.name}", unit="tok", leave=False)
        for w0 in range(0, G, W):
            w1 = min(w0 + W, G)
            window_toggles: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(w1 - w0)]
            for g in range(w0, w1):
                t = P + g
                for s in range(B):
                    on, off = predictors[s].predict(t, self.trace.on(s, t), self.trace.off(s, t))
                    # intp indices: numpy gathers/scatters skip an internal conversion (2x faster)
                    on, off = on.astype(np.intp), off.astype(np.intp)
                    window_toggles[g - w0].append((on, off))
                    k_on, k_off = key_of[on], key_of[off]
                    total += np.bincount(k_on, minlength=K)
                    total -= np.bincount(k_off, minlength=K)
                    if B == 1:
                        if keep_active:
                            active[on] = 1
                            active[off] = 0
                        for obs in observers:
                            obs.observe(t, on, off)
                    else:
                        a_on = active[on] + np.uint8(1)
                        active[on] = a_on
                        a_off = active[off] - np.uint8(1)
                        active[off] = a_off
                        # the union changes where a neuron's batch count crosses zero
                        new_on, new_off = a_on == 1, a_off == 0
                        union += np.bincount(k_on[new_on], minlength=K)
                        union -= np.bincount(k_off[new_off], minlength=K)
                        for obs in observers:
                            obs.observe(t, on[new_on], off[new_off])
                total_buf[g - w0] = total
                if B > 1:
                    union_buf[g - w0] = union
            n = w1 - w0
            cost = self.cost.steps_cost(
                union_buf[:n].reshape(n, 2 * L, n_dev), total_buf[:n].reshape(n, 2 * L, n_dev),
                np.arange(P + w0, P + w1) + 1, B,
                pending_pcie if pending_pcie.any() else None, pending_link if pending_link.any() else None)
            pending_pcie[:] = 0
            pending_link[:] = 0
            token_s[w0:w1] = cost.step_s
            imbalance[w0:w1] = cost.dimm_imbalance
            for k, v in cost.components.items():
                breakdown[k] += v
            for k, v in cost.stage_s.items():
                stage_s[k] = stage_s.get(k, 0.0) + v
            window_load = total_buf[:n].sum(axis=0)
            per_dev = window_load.reshape(2 * L, n_dev).sum(axis=0)
            gpu_work += per_dev[0]
            all_work += per_dev.sum()
            if bar is not None:
                bar.update(n)
            if w1 < G:
                window = WindowActivity(P + w0, P + w1, window_load.reshape(2 * L, n_dev),
                                        active if keep_active else None, window_toggles)
                self._apply_partition(ctx, window, placement, key_of, active, total, union, B, n_dev,
                                      pending_pcie, moves, moved_bytes)
                self._apply_balance(ctx, window, placement, key_of, active, total, union, B, n_dev,
                                    pending_link, moves, moved_bytes)
        if bar is not None:
            bar.close()
        # final incremental state, kept for inspection and for tests that recount it from scratch
        self.final_placement = placement
        self.final_counts = {"total": total.reshape(2 * L, n_dev).copy(), "union": union.reshape(2 * L, n_dev).copy()}

        self.predictor_summary = _merge_summaries([p.summary() for p in predictors])
        decode_s = float(token_s.sum())
        prefill_s = float(sum(prefill.values()))
        return SimResult(
            tokens_per_s=G * B / (prefill_s + decode_s),
            prefill_s=prefill_s, decode_s=decode_s, breakdown_s=breakdown, token_s=token_s,
            dimm_imbalance=float(imbalance.mean()), moves=moves, bytes_moved=moved_bytes,
            hot_fraction=float(gpu_work / all_work) if all_work else 0.0, stage_s=stage_s,
            predictor=self.predictor_summary,
            wall_s=time.perf_counter() - wall0, loop_wall_s=time.perf_counter() - loop0,
        )

    # ---- online moves -----------------------------------------------------------------------------
    @staticmethod
    def _rekey(idx: np.ndarray, new_dev: np.ndarray, group: np.ndarray, key_of: np.ndarray, active: np.ndarray,
               total: np.ndarray, union: np.ndarray, batch: int, n_dev: int) -> None:
        """Move neurons ``idx`` to compute device ``new_dev`` and update the incremental counts."""
        K = len(total)
        old, new = key_of[idx], (group[idx] * n_dev + new_dev).astype(key_of.dtype)
        w = active[idx].astype(np.float64)
        total += (np.bincount(new, weights=w, minlength=K) - np.bincount(old, weights=w, minlength=K)).astype(np.int64)
        if batch > 1:
            u = (w > 0).astype(np.float64)
            union += (np.bincount(new, weights=u, minlength=K) - np.bincount(old, weights=u, minlength=K)).astype(np.int64)
        key_of[idx] = new

    def _apply_partition(self, ctx, window, placement, key_of, active, total, union, B, n_dev,
                         pending_pcie, moves, moved_bytes) -> None:
        change = self.partition.update(window, placement)
        if change is None:
            return
        promote = np.asarray(change.promote, dtype=np.int64)
        evict = np.asarray(change.evict, dtype=np.int64)
        who = f"partition '{self.partition.registered_name}'"
        _check_ids(promote, ctx.n_neurons, who)
        _check_ids(evict, ctx.n_neurons, who)
        if placement.on_gpu[promote].any() or not placement.on_gpu[evict].all():
            raise ConfigError(f"{who} promoted a neuron already on the GPU or evicted one that is not")
        delta = float(ctx.neuron_bytes[promote].sum() - ctx.neuron_bytes[evict].sum())
        placement.on_gpu[evict] = False
        placement.on_gpu[promote] = True
        if delta > 0:   # a swap of equal sizes cannot overflow; only a net growth is checked
            check_gpu_capacity(ctx, placement.on_gpu, who)
        self._rekey(evict, placement.home_dimm[evict].astype(np.int32) + 1, ctx.group_of, key_of, active,
                    total, union, B, n_dev)
        self._rekey(promote, np.zeros(len(promote), dtype=np.int32), ctx.group_of, key_of, active,
                    total, union, B, n_dev)
        copied = np.bincount(ctx.layer_of[promote], weights=ctx.neuron_bytes[promote], minlength=ctx.model.n_layers)
        pending_pcie += copied
        moves["promoted"] += len(promote)
        moves["evicted"] += len(evict)
        moved_bytes["pcie"] += float(copied.sum())

    def _apply_balance(self, ctx, window, placement, key_of, active, total, union, B, n_dev,
                       pending_link, moves, moved_bytes) -> None:
        change = self.balancer.update(window, placement)
        if change is None or len(change.neurons) == 0:
            return
        idx = np.asarray(change.neurons, dtype=np.int64)
        dest = np.asarray(change.dest, dtype=np.int64)
        who = f"balancer '{self.balancer.registered_name}'"
        _check_ids(idx, ctx.n_neurons, who)
        if dest.shape != idx.shape or (dest.size and (dest.min() < 0 or dest.max() >= ctx.n_dimms)):
            raise ConfigError(f"{who} returned destinations outside DIMMs 0..{ctx.n_dimms - 1}")
        src = placement.home_dimm[idx].astype(np.int64)
        real = src != dest
        idx, src, dest = idx[real], src[real], dest[real]
        placement.home_dimm[idx] = dest
        # per-DIMM weight bytes, updated by the moves only (a full recount is O(neurons))
        moved = ctx.neuron_bytes[idx]
        self._dimm_bytes += np.bincount(dest, weights=moved, minlength=ctx.n_dimms)
        self._dimm_bytes -= np.bincount(src, weights=moved, minlength=ctx.n_dimms)
        if self._dimm_bytes.max() > ctx.dimm_budget_bytes * (1 + 1e-9):
            check_dimm_capacity(ctx, placement.home_dimm, who)   # names the DIMM
        cold = ~placement.on_gpu[idx]
        self._rekey(idx[cold], dest[cold].astype(np.int32) + 1, ctx.group_of, key_of, active, total, union, B, n_dev)
        # DIMM-link time per layer: the busiest DIMM port (sent or received bytes) bounds it
        J, L = ctx.n_dimms, ctx.model.n_layers
        nbytes = ctx.neuron_bytes[idx]
        layer = ctx.layer_of[idx]
        sent = np.bincount(layer * J + src, weights=nbytes, minlength=L * J).reshape(L, J)
        recv = np.bincount(layer * J + dest, weights=nbytes, minlength=L * J).reshape(L, J)
        port = np.maximum(sent, recv).max(axis=1)
        pending_link += np.where(port > 0, port / self.cost.link_bw + self.cost.link_lat_s, 0.0)
        moves["remapped"] += len(idx)
        moved_bytes["dimm_link"] += float(nbytes.sum())


def _merge_summaries(summaries: list[dict[str, float]]) -> dict[str, float]:
    """Mean of per-sequence predictor statistics."""
    if not summaries or not summaries[0]:
        return {}
    return {k: float(np.mean([s[k] for s in summaries])) for k in summaries[0]}


def _is_online(policy, base: type) -> bool:
    """True when ``policy`` overrides the base class's online ``_update`` hook."""
    return type(policy)._update is not base._update


def _check_ids(idx: np.ndarray, n: int, who: str) -> None:
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ConfigError(f"{who} returned neuron ids outside 0..{n - 1}")
    if idx.size != np.unique(idx).size:
        raise ConfigError(f"{who} returned the same neuron twice in one decision")
