"""The decode loop: trace -> policies -> cost model -> metrics.

The simulator keeps, incrementally, how many neurons of every (layer, kind) group are active
on every device (``union`` and ``total``, see :mod:`ndpsched.costmodel`). A token changes only
the neurons that toggle (the trace is delta encoded) and a window's moves change only the moved
neurons, so a step costs O(toggles + moves), not O(neurons): this is what makes neuron-level
simulation of llama2-70b (3 million neurons) run far faster than real time.
"""
from __future__ import annotations

import copy
import functools
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .costmodel import COMPONENTS, CostModel, CostParams, StepsCost
from .errors import CapacityError, ConfigError, TraceError
from .hardware import HardwareSpec
from .jit import kernel, trailing_zeros
from .models import ModelSpec
from .policy import (BalanceMoves, BalancerPolicy, PartitionMoves, PartitionPolicy,
                     Placement, PredictorPolicy, SchedContext, WindowActivity, check_dimm_capacity,
                     check_gpu_capacity)
from .replay import REPLAY_CACHE_BYTES, SequenceReplay, WindowMemo
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
                 offline_freqs: np.ndarray | None = None, seqs: list[int] | tuple[int, ...] | None = None) -> None:
        for name, value in (("batch", batch), ("prompt_len", prompt_len), ("gen_len", gen_len),
                            ("window_tokens", window_tokens)):
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        trace.check_model(model)
        self.seqs = self._check_seqs(seqs, batch, trace)
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
        self._delta_cache: dict[tuple[int, str], np.ndarray] = {}
        # sequence -> its schedule-independent decode state (batch 1, perfect predictor)
        self._replays: dict[int, SequenceReplay] = {}
        # batch -> prompt frequencies; (batch, initial placement) -> active counts at the start
        self._prefill_freqs: dict[tuple[int, ...], np.ndarray] = {}
        self._start_counts: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        # batch -> (N,) uint8 active counts at the last prompt token (true active sets), read-only
        self._start_active: dict[tuple[int, ...], np.ndarray] = {}
        self._replay_bytes = 0

    @staticmethod
    def _check_seqs(seqs, batch: int, trace: ActivationTrace) -> tuple[int, ...]:
        if seqs is None:
            return tuple(range(batch))
        seqs = tuple(int(s) for s in seqs)
        if len(seqs) != batch or len(set(seqs)) != batch:
            raise ConfigError(f"seqs must name {batch} distinct trace sequences (the batch), got {list(seqs)}")
        if min(seqs) < 0 or max(seqs) >= trace.n_seqs:
            raise TraceError(f"trace has sequences 0..{trace.n_seqs - 1}; seqs {list(seqs)} is outside")
        return seqs

    def prompt_state(self, seq: int) -> tuple[np.ndarray, np.ndarray]:
        """(active-token counts over the prompt, (N,) bool active set at the last prompt token) of
        trace sequence ``seq``; cached, so that repeated episodes on a sequence pool start fast."""
        return self.trace.prompt_state(seq, self.prompt_len)

    def replay(self, seq: int) -> SequenceReplay | None:
        """The replay state of sequence ``seq`` (see :mod:`ndpsched.replay`), created on first use;
        None once :data:`~ndpsched.replay.REPLAY_CACHE_BYTES` is reserved by other sequences."""
        if seq not in self._replays:
            n_rows = self.gen_len + 1
            need = SequenceReplay.nbytes_for(self.layout.n_neurons, n_rows, self.window_tokens)
            if not self._reserve_replay_bytes(need):
                return None
            self._replays[seq] = SequenceReplay(self.prompt_state(seq)[1], self.prompt_len - 1, n_rows)
        return self._replays[seq]

    def _reserve_replay_bytes(self, nbytes: int) -> bool:
        """Count ``nbytes`` more of replay state if the budget allows; whether it did."""
        if self._replay_bytes + nbytes > REPLAY_CACHE_BYTES:
            return False
        self._replay_bytes += nbytes
        return True

    def base_deltas(self, seq: int, key_of: np.ndarray, tag: str | None = None) -> np.ndarray:
        """(gen_len, K) int32: change of the per-(group, device) active counts at every decode
        token of sequence ``seq`` when neurons sit in the cells ``key_of``; cached per sequence
        and placement (``tag`` names the placement when the caller knows it; else its hash), so
        that episodes replaying a sequence from the same start skip it."""
        import hashlib

        tag = (seq, tag or hashlib.blake2b(key_of.tobytes(), digest_size=16).hexdigest())
        if tag not in self._delta_cache:
            trace, P, G = self.trace, self.prompt_len, self.gen_len
            K = 2 * self.model.n_layers * (self.hw.n_dimms + 1)
            lo, hi = trace._slot(seq, P), trace._slot(seq, P + G - 1) + 1
            out = np.zeros(G * K, dtype=np.int64)
            for ptr, ids, sign in ((trace.on_ptr, trace.on_idx, 1), (trace.off_ptr, trace.off_idx, -1)):
                step = np.repeat(np.arange(G) * K, np.diff(ptr[lo: hi + 1]))
                out += sign * np.bincount(step + np.take(key_of, ids[ptr[lo]: ptr[hi]]), minlength=G * K)
            if len(self._delta_cache) >= 16:               # bounded: a pool of sequences, not a history
                self._delta_cache.pop(next(iter(self._delta_cache)))
            self._delta_cache[tag] = out.reshape(G, K).astype(np.int32)
        return self._delta_cache[tag]

    # ---- set-up -------------------------------------------------------------------------------
    def _context(self, seqs: tuple[int, ...]) -> SchedContext:
        trace, P = self.trace, self.prompt_len
        gpu_budget, dimm_budget = memory_budgets(self.model, self.hw, self.cost.params, self.batch,
                                                 self.prompt_len + self.gen_len)
        if seqs not in self._prefill_freqs:             # the batch's prompt frequencies (cached)
            freqs = sum(self.prompt_state(s)[0] for s in seqs) / (self.batch * P)
            freqs.flags.writeable = False
            self._prefill_freqs[seqs] = freqs
        prefill = self._prefill_freqs[seqs]
        offline = self._offline_freqs if self._offline_freqs is not None else trace.offline_freqs
        if offline is None:
            # no separate profile: the prompts of every sequence in the trace stand in for it
            if len(seqs) == trace.n_seqs:
                offline = prefill
            else:
                offline = trace.prompt_frequencies(P)
        if offline.shape != (self.layout.n_neurons,):
            raise TraceError(f"offline profile has shape {offline.shape}, expected ({self.layout.n_neurons},)")
        if getattr(self, "_policy_seed", None) is None:       # (spawning costs more than the rest)
            self._policy_seed = np.random.SeedSequence(self.seed).spawn(1)[0]
        policy_rng = np.random.default_rng(self._policy_seed)
        return SchedContext(self.model, self.hw, self.cost, self.layout, self.batch, self.window_tokens,
                            offline, prefill, gpu_budget, dimm_budget, policy_rng,
                            layer_parents=getattr(trace, "layer_parents", None))

    # ---- the run --------------------------------------------------------------------------------
    def start(self, progress: bool = False, seqs: list[int] | tuple[int, ...] | None = None,
              initial: Placement | None = None) -> "DecodeRun":
        """Set up a generation (profiles, initial placement, prefill) and return it, ready to be
        advanced one window at a time (what the Gymnasium environments do).

        Args:
            seqs: trace sequences forming the batch (default: those given at construction; the
                simulator itself is not changed).
            initial: start from this placement (copied) instead of asking the partition and
                balancer for their initial decisions; they are still reset with the run's context.
        """
        seqs = self.seqs if seqs is None else self._check_seqs(seqs, self.batch, self.trace)
        return DecodeRun(self, seqs, progress=progress, initial=initial)

    def run(self, progress: bool = False, seqs: list[int] | tuple[int, ...] | None = None,
            initial: Placement | None = None) -> SimResult:
        """Simulate the whole generation, the policies deciding at every window boundary
        (``seqs`` and ``initial`` as in :meth:`start`)."""
        run = self.start(progress=progress, seqs=seqs, initial=initial)
        while not run.done:
            run.next_window()
            if not run.done:
                run.apply_policies()
        return run.result()


@dataclass
class WindowOutcome:
    """One priced window of decode steps (see :meth:`DecodeRun.next_window`)."""

    t0: int                         # first token of the window (absolute position)
    t1: int                         # one past the last token
    cost: StepsCost                 # per-step latency, components, stage times, DIMM imbalance
    activity: WindowActivity        # what online policies see at the window's end
    gpu_activations: float          # neuron activations computed on the GPU in the window
    all_activations: float          # all neuron activations in the window
    #: (J+1,) neuron activations per device (GPU first) in the window
    device_activations: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.window_s = float(self.cost.step_s.sum())     # seconds of the window's tokens

    @property
    def n_tokens(self) -> int:
        return self.t1 - self.t0


class DecodeRun:
    """One generation in progress: :meth:`next_window` simulates and prices the next window of
    tokens, :meth:`apply_partition` / :meth:`apply_balance` (or :meth:`apply_policies`) apply
    moves between windows, :meth:`result` summarises. ``Simulator.run`` is exactly that loop.

    The counts ``total`` / ``union`` of active neurons per (group, device) cell are kept
    incrementally: a token costs O(toggles), a move O(moved neurons).
    """

    def __init__(self, sim: Simulator, seqs: tuple[int, ...], progress: bool = False,
                 initial: Placement | None = None) -> None:
        self.wall0 = time.perf_counter()
        self.sim = sim
        self.seqs = seqs
        self.ctx = ctx = sim._context(seqs)
        L, J, B, P = sim.model.n_layers, sim.hw.n_dimms, sim.batch, sim.prompt_len
        self.n_dev = n_dev = J + 1
        self.K = K = 2 * L * n_dev
        if initial is None:
            on_gpu = sim.partition.initial_partition(ctx)
            home = sim.balancer.initial_mapping(ctx, on_gpu)
            self.placement = Placement(on_gpu, home)
        else:
            if initial.on_gpu.shape != (ctx.n_neurons,) or initial.home_dimm.shape != (ctx.n_neurons,):
                raise ConfigError(f"initial placement is for {initial.on_gpu.shape[0]} neurons, the model has "
                                  f"{ctx.n_neurons}")
            sim.partition.reset(ctx)
            sim.balancer.reset(ctx)
            self.placement = initial.copy()
        # a frozen start state (the envs' offline placement) is shared by every episode: what is
        # derived from it is computed once and kept on it
        shared = initial is not None and initial.frozen
        self.initial_placement = initial if shared else self.placement.copy()
        # key of a neuron = its (group, device) cell; int16 keeps the gathers cache friendly
        key_dtype = np.int16 if K < 2**15 else np.int32
        derived = self.initial_placement.derived.get((n_dev, key_dtype)) if shared else None
        if derived is None:
            derived = (np.bincount(self.placement.home_dimm, weights=ctx.neuron_bytes, minlength=J),
                       (ctx.group_of * n_dev + self.placement.device()).astype(key_dtype), None)
            if shared:
                import hashlib

                tag = hashlib.blake2b(derived[1].tobytes(), digest_size=16).hexdigest()
                derived = (*derived[:2], tag)
                self.initial_placement.derived[(n_dev, key_dtype)] = derived
        self.dimm_bytes = derived[0].copy()
        derived[1].flags.writeable = False                 # the start's keys; the run's are a copy
        self.key_of = derived[1].copy()
        self._placement_tag = derived[2]

        # batch activity at the last prompt token; the first decode step applies token P's toggles
        self._active_packed: np.ndarray | None = None      # see the ``active`` property
        self.predictors = [copy.deepcopy(sim.predictor) for _ in range(B)]
        for s, pred in zip(self.seqs, self.predictors):
            pred.begin(ctx, sim.prompt_state(s)[1], P - 1)
        # what the first step starts from; with true active sets it depends on the batch alone, so
        # the runs on it share one read-only array (a run copies it before changing it: _own_active)
        shared = all(p.passthrough for p in self.predictors)
        active = sim._start_active.get(seqs) if shared else None
        if active is None:
            active = self.predictors[0].initial_computed().astype(np.uint8)
            for pred in self.predictors[1:]:
                active += pred.initial_computed()
            if shared and len(sim._start_active) < 64:
                active.flags.writeable = False
                sim._start_active[seqs] = active
        self._active = active
        for policy in (sim.partition, sim.balancer):
            policy.start(active, P - 1)
        self.observers = [p for p in (sim.partition, sim.balancer) if p.observes_tokens]
        # The batch's active counts cost a scatter per toggle; keep them only where something reads
        # them: the batch union, online moves (a moved active neuron moves its count), or a policy.
        self.online = _is_online(sim.partition, PartitionPolicy) or _is_online(sim.balancer, BalancerPolicy)
        self.keep_active = (B > 1 or self.online
                            or any(p.uses_neuron_activity for p in (sim.partition, sim.balancer, sim.predictor)))
        # one sequence whose computed set is the trace's: a window's toggles come from the trace in
        # one slice and are counted with one bincount per window instead of one per token
        # (observers get the window's tokens one by one after it: with one sequence the batch-union
        # toggles are the sequence's, and nothing else changes between its tokens)
        self.whole_window = B == 1 and self.predictors[0].passthrough
        if self.whole_window:
            # per-token count deltas under the initial keys (cached per sequence and placement);
            # each window then only corrects the toggles of neurons moved since the start
            self.base_key = derived[1]
            # the neurons away from their start key now: packed bits (big-endian in each byte, as
            # np.packbits; whole 64-bit words, so that a window's moved togglers are one AND of
            # two bitmaps), and how many
            self.moved_bits = np.zeros(_padded_bits_bytes(sim.layout.n_neurons), dtype=np.uint8)
            self.n_moved = 0
            self.base_deltas = sim.base_deltas(self.seqs[0], self.base_key, self._placement_tag)
        # replayed sequences read their active sets instead of scattering every toggle
        self.replay = sim.replay(self.seqs[0]) if self.whole_window and self.keep_active else None
        # the start's counts depend on the batch and the initial placement only when the computed
        # set is the true one (a predictor's own start set may depend on its parameters)
        start_key = None
        if self._placement_tag is not None and all(p.passthrough for p in self.predictors):
            start_key = (self.seqs, self._placement_tag)
        if start_key in sim._start_counts:
            self.union, self.total = (c.copy() for c in sim._start_counts[start_key])
        else:
            firing = np.flatnonzero(active > 0)           # a fraction of the neurons: count only those
            self.union = np.bincount(self.key_of[firing], minlength=K).astype(np.int64)
            self.total = self.union if B == 1 else np.bincount(
                self.key_of[firing], weights=active[firing], minlength=K).astype(np.int64)
            if start_key is not None and len(sim._start_counts) < 64:
                sim._start_counts[start_key] = (self.union.copy(), self.total.copy())
        if B == 1:
            self.total = self.union                       # one array: union = total
        # scratch for WindowActivity.neuron_counts (all zeros between calls; int32 halves its cache
        # footprint, and |sum of k over a window| stays far below 2**31); a replayed sequence reads
        # its window counts instead
        self.scratch = (np.zeros(sim.layout.n_neurons, dtype=np.int32), np.zeros(sim.layout.n_neurons, dtype=bool)) \
            if self.keep_active and self.replay is None else None

        self._id_bits = np.zeros((sim.layout.n_neurons + 7) // 8, dtype=np.uint8)   # see _mark_ids
        self.prefill = sim.cost.prefill_cost(P, B)
        self.breakdown = dict.fromkeys(COMPONENTS, 0.0)
        for k, v in self.prefill.items():
            self.breakdown[k] += v
        G, W = sim.gen_len, sim.window_tokens
        self.token_s = np.zeros(G)
        self.imbalance = np.zeros(G)
        self.stage_s: dict[str, float] = {}
        self.gpu_work = 0.0
        self.all_work = 0.0
        self.moves = {"promoted": 0, "evicted": 0, "remapped": 0}
        self.moved_bytes = {"pcie": 0.0, "dimm_link": 0.0}
        self.pending_pcie = np.zeros(L)
        self.pending_link = np.zeros(L)
        # counts of every step of a window, priced together once the window is complete
        self.total_buf = np.zeros((W, K))
        self.union_buf = self.total_buf if B == 1 else np.zeros((W, K))
        self.next_step = 0                  # decode step (0..G-1) the next window starts at
        #: moves of the decision being made now / of the one made before the last window
        self.decision = {"promoted": 0.0, "evicted": 0.0, "remapped": 0.0, "pcie_bytes": 0.0, "dimm_link_bytes": 0.0}
        self.prior_decision = dict(self.decision)
        self.last: WindowOutcome | None = None
        self.bar = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=G, desc=f"decode {sim.model.name}", unit="tok", leave=False)
        self.loop0 = time.perf_counter()

    @property
    def active(self) -> np.ndarray:
        """(N,) uint8: in how many sequences of the batch each neuron is active at the last
        simulated token (a replayed window keeps it packed until something reads it)."""
        if self._active_packed is not None:
            self._active = np.unpackbits(self._active_packed, count=len(self._active))
            self._active_packed = None
        return self._active

    def _own_active(self) -> np.ndarray:
        """:attr:`active`, to be changed: the run's own copy where it still is the shared start."""
        active = self.active
        if not active.flags.writeable:
            active = self._active = active.copy()
        return active

    def _active_source(self) -> np.ndarray | Callable[[], np.ndarray]:
        """The active set now, for a WindowActivity: the array, or a function unpacking it."""
        packed = self._active_packed
        if packed is None:
            return self._active
        run, n = weakref.ref(self), len(self._active)     # (weak: the activity must not keep the run alive)

        def unpack() -> np.ndarray:
            live = run()
            return live.active if live is not None and live._active_packed is packed else np.unpackbits(packed, count=n)
        return unpack

    @property
    def done(self) -> bool:
        """True once every generated token has been simulated."""
        return self.next_step >= self.sim.gen_len

    # ---- advancing ---------------------------------------------------------------------------------
    def next_window(self) -> WindowOutcome:
        """Simulate the next window's tokens under the current placement and price them."""
        if self.done:
            raise ConfigError("the generation is complete; start a new run")
        sim, B = self.sim, self.sim.batch
        P, w0 = sim.prompt_len, self.next_step
        w1 = min(w0 + sim.window_tokens, sim.gen_len)
        n = w1 - w0
        L, n_dev = sim.model.n_layers, self.n_dev
        if self.whole_window:
            toggles, window_load, per_dev, all_work = self._advance_whole_window(P + w0, P + w1)
        else:
            toggles = [self._advance_token(P + g, g - w0) for g in range(w0, w1)]
            window_load = self.total_buf[:n].sum(axis=0)
            per_dev = window_load.reshape(2 * L, n_dev).sum(axis=0)
            all_work = float(per_dev.sum())
        window_load = window_load.reshape(2 * L, n_dev)
        pcie, link = self.pending_pcie, self.pending_link
        kv_len, attention = sim.cost.window_attention_s(P + w0 + 1, n, B)     # (token t attends to t + 1)
        cost = sim.cost.steps_cost(
            self.union_buf[:n].reshape(n, 2 * L, n_dev), None if B == 1 else self.total_buf[:n].reshape(n, 2 * L, n_dev),
            kv_len, B, pcie if pcie.any() else None, link if link.any() else None, attention)
        pcie[:] = 0
        link[:] = 0
        self.token_s[w0:w1] = cost.step_s
        self.imbalance[w0:w1] = cost.dimm_imbalance
        for k, v in cost.components.items():
            self.breakdown[k] += v
        for k, v in cost.stage_s.items():
            self.stage_s[k] = self.stage_s.get(k, 0.0) + v
        self.gpu_work += per_dev[0]
        self.all_work += all_work
        if self.bar is not None:
            self.bar.update(n)
            if w1 >= sim.gen_len:
                self.bar.close()
        self.next_step = w1
        # the whole-window path has read or stored every token of the window in the replay
        counts = memo = None
        if self.replay is not None and self.whole_window:     # (tests may switch the path off)
            counts = functools.partial(self.replay.counts, P + w0, P + w1)
            memo = WindowMemo(self.replay, P + w0, P + w1, sim._reserve_replay_bytes)
        activity = WindowActivity(P + w0, P + w1, window_load, self._active_source() if self.keep_active else None,
                                  toggles, scratch=self.scratch, window_counts=counts, memo=memo)
        self.last = WindowOutcome(P + w0, P + w1, cost, activity, float(per_dev[0]), all_work, per_dev)
        # policies that observe the whole run (learned policies, hindsight oracles) reach it here
        activity.run, activity.outcome = self, self.last
        self.prior_decision, self.decision = self.decision, dict.fromkeys(self.decision, 0.0)
        return self.last

    def _advance_token(self, t: int, row: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Apply token ``t``'s toggles of every sequence; the counts go to buffer row ``row``."""
        K, key_of, total, union, active = self.K, self.key_of, self.total, self.union, self._own_active()
        B = self.sim.batch
        out = []
        for pred, s in zip(self.predictors, self.seqs):
            on, off = pred.predict(t, self.sim.trace.on(s, t), self.sim.trace.off(s, t))
            # intp indices: numpy gathers/scatters skip an internal conversion (2x faster)
            on, off = on.astype(np.intp), off.astype(np.intp)
            out.append((on, off))
            k_on, k_off = key_of[on], key_of[off]
            total += np.bincount(k_on, minlength=K)
            total -= np.bincount(k_off, minlength=K)
            if B == 1:
                if self.keep_active:
                    active[on] = 1
                    active[off] = 0
                for obs in self.observers:
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
                for obs in self.observers:
                    obs.observe(t, on[new_on], off[new_off])
        self.total_buf[row] = total
        if B > 1:
            self.union_buf[row] = union
        return out

    def _advance_whole_window(self, t0: int, t1: int) -> tuple[list, np.ndarray, np.ndarray, float]:
        """Tokens [t0, t1) of the batch's one sequence at once (computed set = true set). Returns the
        window's toggles, its (K,) load per cell and (J+1,) per device, and its activations.

        The count deltas come from the cached per-token deltas under the initial keys; only the
        neurons moved since then are re-counted: from the replay's active sets where the sequence
        was simulated before (a gather over the moved neurons), else from the window's toggles (a
        gather over the toggles plus a bincount over the moved ones)."""
        trace, n, P = self.sim.trace, t1 - t0, self.sim.prompt_len
        seq = self.seqs[0]
        lo, hi = trace._slot(seq, t0), trace._slot(seq, t1 - 1) + 1
        deltas = self.base_deltas[t0 - P: t1 - P].astype(np.int64)        # (n, K)
        flat_deltas = deltas.reshape(-1)
        replay = self.replay
        rows = replay.rows(t0, t1) if replay is not None else None       # active sets t0-1 .. t1-1
        # moved neurons' toggles: read from the replayed activity (a pass over the moved and
        # changed bitmaps, then a gather per moved toggler and token) when that is less work than
        # finding them among the window's toggles
        on_ptr, off_ptr = trace.on_ptr[lo: hi + 1].tolist(), trace.off_ptr[lo: hi + 1].tolist()
        n_toggles = on_ptr[-1] - on_ptr[0] + off_ptr[-1] - off_ptr[0]
        from_rows = rows is not None and len(self.moved_bits) // 8 + (n + 1) * self.n_moved < n_toggles
        parts = []
        for ptr, ids, sign in ((on_ptr, trace.on_idx, 1), (off_ptr, trace.off_idx, -1)):
            parts.append([ids[ptr[i]: ptr[i + 1]] for i in range(n)])          # (Python ints: cheap slices)
            if self.n_moved and not from_rows:
                flat = ids[ptr[0]: ptr[n]]
                bounds = np.array(ptr) - ptr[0]
                sel = _moved_positions(self.moved_bits, flat)
                if len(sel):
                    step = np.searchsorted(bounds, sel, side="right") - 1
                    self._fix_moved(flat_deltas, step, flat[sel], sign)
        if self.n_moved and from_rows:
            # a moved neuron's toggles are the steps where its activity changes over the window;
            # the window's changed bits (N / 8 bytes, kept by the replay) skip the moved neurons
            # that do not toggle in it (about 60 % of them under hermes.adjust)
            _recount_moved_from_rows(flat_deltas, rows, replay.changed(t0, t1, rows), self.moved_bits,
                                     self.n_moved, self.key_of, self.base_key, self.K)
        # the counts after each token, the window's load per cell and per device (one compiled pass)
        window_load, per_dev, all_work = _running_counts(deltas, self.total, self.total_buf[:n], self.n_dev)
        toggles = [[(on, off)] for on, off in zip(*parts)]
        for obs in self.observers:
            obs.observe_window(t0, *parts)
        if self.keep_active:
            if rows is not None:
                self._active_packed = rows[-1]                     # unpacked when read
            else:
                active = self._own_active()
                for t, (on, off) in enumerate(zip(*parts), start=t0):
                    active[on] = 1
                    active[off] = 0
                    if replay is not None:
                        replay.store(t, active)
        return toggles, window_load, per_dev, all_work

    def _fix_moved(self, flat_deltas: np.ndarray, step: np.ndarray, ids: np.ndarray, sign) -> None:
        """Re-count toggles of moved neurons ``ids`` at window steps ``step`` (``sign`` +1 for on,
        -1 for off, or an array of them): counted under their initial keys in the base deltas,
        they belong to their current ones."""
        K, n_cells = self.K, len(flat_deltas)
        weights = None if np.isscalar(sign) else sign
        new = np.bincount(step * K + np.take(self.key_of, ids), weights=weights, minlength=n_cells)
        old = np.bincount(step * K + np.take(self.base_key, ids), weights=weights, minlength=n_cells)
        diff = new - old
        flat_deltas += (sign * diff if weights is None else diff).astype(np.int64)

    # ---- decisions between windows ---------------------------------------------------------------
    def apply_policies(self) -> None:
        """Let the run's own partition and balancer policies decide on the last window."""
        if self.last is None:
            raise ConfigError("no window has been simulated yet: call next_window() first")
        self.apply_partition(self.sim.partition.update(self.last.activity, self.placement))
        self.apply_balance(self.sim.balancer.update(self.last.activity, self.placement))

    def apply_partition(self, change: PartitionMoves | None, who: str | None = None) -> dict[str, float]:
        """Validate and apply a hot/cold change; its PCIe copies are priced in the next window.
        Returns the moves and bytes of this change."""
        if change is None or (len(change.promote) == 0 and len(change.evict) == 0):
            return {"promoted": 0, "evicted": 0, "pcie_bytes": 0.0}
        ctx, placement = self.ctx, self.placement
        promote, evict = _id_arrays(change.promote, change.evict)
        # one compiled pass: checks the ids and both lists against the GPU set, flips them, and
        # moves their counts (evicted neurons compute on their home DIMM, promoted ones on the GPU)
        problem, delta, copied, self.n_moved = _apply_hot_change(
            promote, evict, ctx.n_neurons, self._id_bits, placement.on_gpu, placement.home_dimm, ctx.model.n_layers,
            *self._rekey_state())
        if problem:
            raise ConfigError(f"{self._who('partition', who)} " + _ID_PROBLEMS[problem].format(n_max=ctx.n_neurons - 1))
        if delta > 0:   # a swap of equal sizes cannot overflow; only a net growth is checked
            check_gpu_capacity(ctx, placement.on_gpu, self._who("partition", who))
        placement.hot_changes += 1
        placement.last_hot_change = change
        self.pending_pcie += copied
        pcie_bytes = float(copied.sum())
        self.moves["promoted"] += len(promote)
        self.moves["evicted"] += len(evict)
        self.moved_bytes["pcie"] += pcie_bytes
        decision = self.decision
        decision["promoted"] += len(promote)
        decision["evicted"] += len(evict)
        decision["pcie_bytes"] += pcie_bytes
        return {"promoted": len(promote), "evicted": len(evict), "pcie_bytes": pcie_bytes}

    def apply_balance(self, change: BalanceMoves | None, who: str | None = None) -> dict[str, float]:
        """Validate and apply a DIMM remap; its DIMM-link transfers are priced in the next window.
        Returns the moves and bytes of this change."""
        if change is None or len(change.neurons) == 0:
            return {"remapped": 0, "dimm_link_bytes": 0.0}
        ctx, placement = self.ctx, self.placement
        idx, dest = _id_arrays(change.neurons, change.dest)
        if dest.shape != idx.shape:
            raise ConfigError(f"{self._who('balancer', who)} returned {len(dest)} destinations for {len(idx)} neurons")
        cost = self.sim.cost
        # one compiled pass: checks, the real moves (destination not the home), per-DIMM weight
        # bytes (updated by the moves only: a full recount is O(neurons)), the DIMM-link time per
        # layer (the busiest DIMM port bounds it) and the cold movers' counts
        problem, n_real, moved_bytes, fullest, self.n_moved = _apply_remap(
            idx, dest, ctx.n_neurons, self._id_bits, placement.home_dimm, placement.on_gpu, self.dimm_bytes,
            ctx.model.n_layers, change.priced, cost.link_bw, cost.link_lat_s, self.pending_link, *self._rekey_state())
        if problem:
            detail = f"returned destinations outside DIMMs 0..{ctx.n_dimms - 1}" if problem == 3 else _ID_PROBLEMS[problem].format(n_max=ctx.n_neurons - 1)
            raise ConfigError(f"{self._who('balancer', who)} {detail}")
        if fullest > ctx.dimm_budget_bytes * (1 + 1e-9):
            check_dimm_capacity(ctx, placement.home_dimm, self._who("balancer", who))
        self.moves["remapped"] += n_real
        self.decision["remapped"] += n_real
        if not change.priced:                    # a bound's free moves (see BalanceMoves)
            return {"remapped": n_real, "dimm_link_bytes": 0.0}
        self.moved_bytes["dimm_link"] += moved_bytes
        self.decision["dimm_link_bytes"] += moved_bytes
        return {"remapped": n_real, "dimm_link_bytes": moved_bytes}

    def _who(self, role: str, who: str | None) -> str:
        """How an error names the decision's author: ``who`` if given, else the run's policy."""
        return who or f"{role} '{getattr(self.sim, role).registered_name}'"

    def _rekey_state(self) -> tuple:
        """The arguments of :func:`_rekey_counts` after the movers: where neurons sit, their active
        bits or counts, the incremental counts and the moved-neuron bitmap."""
        ctx, packed = self.ctx, self._active_packed        # a replayed window: its bits read in place
        none = _NONE_U8                                    # (for the arrays a call does not read)
        head = (self.key_of, ctx.group_blocks, ctx.group_shift, ctx.kind_bytes, self.n_dev, packed is not None,
                none if packed is None else packed, self._active if packed is None else none,
                self.total, self.union, self.sim.batch > 1, self.whole_window)
        if self.whole_window:
            return (*head, self.base_key, self.moved_bits, self.n_moved)
        return (*head, self.key_of[:0], none, 0)

    # ---- summary -------------------------------------------------------------------------------------
    def result(self) -> SimResult:
        """Metrics of the generation so far (all of it once :attr:`done`)."""
        sim = self.sim
        L = sim.model.n_layers
        # final incremental state, kept for inspection and for tests that recount it from scratch
        sim.final_placement = self.placement
        sim.final_counts = {"total": self.total.reshape(2 * L, self.n_dev).copy(),
                            "union": self.union.reshape(2 * L, self.n_dev).copy()}
        sim.predictor_summary = _merge_summaries([p.summary() for p in self.predictors])
        steps = self.next_step
        decode_s = float(self.token_s[:steps].sum())
        prefill_s = float(sum(self.prefill.values()))
        now = time.perf_counter()
        return SimResult(
            tokens_per_s=steps * sim.batch / (prefill_s + decode_s),
            prefill_s=prefill_s, decode_s=decode_s, breakdown_s=dict(self.breakdown),
            token_s=self.token_s[:steps].copy(),
            dimm_imbalance=float(self.imbalance[:steps].mean()) if steps else 1.0,
            moves=dict(self.moves), bytes_moved=dict(self.moved_bytes),
            hot_fraction=float(self.gpu_work / self.all_work) if self.all_work else 0.0,
            stage_s=dict(self.stage_s), predictor=sim.predictor_summary,
            wall_s=now - self.wall0, loop_wall_s=now - self.loop0,
        )


def _merge_summaries(summaries: list[dict[str, float]]) -> dict[str, float]:
    """Mean of per-sequence predictor statistics."""
    if not summaries or not summaries[0]:
        return {}
    return {k: float(np.mean([s[k] for s in summaries])) for k in summaries[0]}


def _is_online(policy, base: type) -> bool:
    """True when ``policy`` overrides the base class's online ``_update`` hook."""
    return type(policy)._update is not base._update


@kernel
def _running_counts(deltas, total, steps, n_dev):
    """The counts after each token of a window: ``steps[t] = total + deltas[0] + ... + deltas[t]``
    ((n, K) count deltas, float rows out); ``total`` becomes the last row. Returns the window's
    load (K,) (the rows' sum), its (n_dev,) sum per device (cell k's device is k % n_dev) and its
    activations. (Row by row: np.cumsum along the short axis of an (n, K) array walks K columns.)"""
    n, K = deltas.shape
    load = np.zeros(K)
    for t in range(n):
        for k in range(K):
            total[k] += deltas[t, k]
            steps[t, k] = total[k]
            load[k] += total[k]
    per_dev = np.zeros(n_dev)
    for k in range(K):
        per_dev[k % n_dev] += load[k]
    return load, per_dev, per_dev.sum()


def _padded_bits_bytes(n: int) -> int:
    """Bytes of a packed bitmap of ``n`` neurons padded to whole 64-bit words."""
    return (n + 63) // 64 * 8


@kernel
def _moved_positions(moved_bits, ids):
    """Positions in ``ids`` of the neurons whose bit is set in the packed ``moved_bits``."""
    out = np.empty(len(ids), np.int64)
    m = 0
    for k in range(len(ids)):
        i = ids[k]
        out[m] = k
        m += (moved_bits[i >> 3] >> (7 - (i & 7))) & 1
    return out[:m].copy()


@kernel
def _recount_moved_from_rows(flat_deltas, rows, changed, moved_bits, n_moved, key_of, base_key, K):
    """Re-count the window's toggles of the moved neurons (set in the packed ``moved_bits``: their
    key now, ``key_of``, is not their start key, ``base_key``): the (n, K) base deltas
    (``flat_deltas``, flat) counted them under their start keys. ``rows``: the (n + 1, N / 8)
    packed active sets t0 - 1 .. t1 - 1; ``changed``: the packed neurons whose activity changes
    in the window (both bitmaps padded to whole 64-bit words); ``n_moved``: how many bits
    ``moved_bits`` has set (at most that many toggle).

    The moved neurons that toggle are the bits of ``moved_bits & changed``, a word at a time, found
    in id order (one pass over 2 x N / 8 bytes; the rows are then read in order); their keys are
    gathered in loops of their own (the loads overlap)."""
    n = rows.shape[0] - 1
    moved_words, changed_words = moved_bits.view(np.uint64), changed.view(np.uint64)
    ids = np.empty(n_moved, np.int64)
    m = 0
    for w in range(len(moved_words)):
        x = moved_words[w] & changed_words[w]
        while x and m < n_moved:
            b = trailing_zeros(x)
            x &= x - np.uint64(1)
            # word bit b is byte b // 8 of the word, bit 7 - b % 8 of the byte (np.packbits order)
            ids[m] = 64 * w + (b & ~7) + 7 - (b & 7)
            m += 1
    new = np.empty(m, np.int64)
    for k in range(m):
        new[k] = key_of[ids[k]]
    old = np.empty(m, np.int64)
    for k in range(m):
        old[k] = base_key[ids[k]]
    for k in range(m):
        byte, shift = ids[k] >> 3, 7 - (ids[k] & 7)
        before = np.int64((rows[0, byte] >> shift) & 1)
        for t in range(n):
            now = np.int64((rows[t + 1, byte] >> shift) & 1)
            d = now - before                     # +1 on, -1 off, 0 (branch free)
            flat_deltas[t * K + new[k]] += d
            flat_deltas[t * K + old[k]] -= d
            before = now


@kernel
def _rekey_counts(idx, new_dev, key_of, group_blocks, group_shift, n_dev, use_packed, packed, active, total, union,
                  batched, track, base_key, moved_bits, n_moved):
    """Move neurons ``idx`` to devices ``new_dev``: their active counts (from the packed bits or the
    (N,) batch counts ``active``) leave their old (group, device) cells of ``total`` (and, with
    ``batched``, ``union``) for the new ones, and ``key_of`` is updated. With ``track``, a neuron's
    bit in the packed ``moved_bits`` says whether it is away from its start key ``base_key`` now;
    ``n_moved`` counts them. Returns the new count.

    The ids are distinct (a decision's are checked): what the loop reads of them is gathered
    first, in loops of their own whose cache misses overlap (15 % faster in a run)."""
    n = len(idx)
    old = np.empty(n, np.int64)
    for k in range(n):
        old[k] = key_of[idx[k]]
    w = np.empty(n, np.int64)
    for k in range(n):
        i = idx[k]
        w[k] = (packed[i >> 3] >> (7 - (i & 7))) & 1 if use_packed else active[i]
    base = np.zeros(n, np.int64)
    if track:
        for k in range(n):
            base[k] = base_key[idx[k]]
    for k in range(n):
        i = idx[k]
        new = group_blocks[i >> group_shift] * n_dev + new_dev[k]
        total[old[k]] -= w[k]                    # (no-ops for a neuron that is off)
        total[new] += w[k]
        if batched:
            on = np.int64(w[k] > 0)
            union[old[k]] -= on
            union[new] += on
        key_of[i] = new
        if track:
            byte, mask = i >> 3, np.uint8(1 << (7 - (i & 7)))
            was = np.int64(moved_bits[byte] & mask != 0)
            away = np.int64(new != base[k])
            moved_bits[byte] = (moved_bits[byte] & ~mask) | (mask * np.uint8(away))
            n_moved += away - was
    return n_moved


#: what :func:`_apply_hot_change` / :func:`_apply_remap` found wrong, by their problem code
_ID_PROBLEMS = {1: "returned neuron ids outside 0..{n_max}",
                2: "returned the same neuron twice in one decision (or promoted and evicted it)",
                4: "promoted a neuron already on the GPU or evicted one that is not"}
_NONE_U8 = np.zeros(0, dtype=np.uint8)


def _id_arrays(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Two id arrays of one integer dtype: int32 kept where both are (the compiled passes are
    built for int32 and int64 pairs), else int64."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype == np.int32 and b.dtype == np.int32:
        return a, b
    return a.astype(np.int64, copy=False), b.astype(np.int64, copy=False)


@kernel
def _apply_hot_change(promote, evict, n, id_bits, on_gpu, home_dimm, n_layers, key_of, group_blocks, group_shift,
                      kind_bytes, n_dev, use_packed, packed, active, total, union, batched, track, base_key,
                      moved_bits, n_moved):
    """Check a hot/cold change (ids in 0..n-1, none twice, every ``promote`` off the GPU, every
    ``evict`` on it) and, if it holds, apply it: ``on_gpu`` flipped, the movers' counts moved by
    :func:`_rekey_counts` (evicted neurons to their home DIMM + 1, promoted ones to the GPU, 0).
    Returns (problem: 0, or 1 / 2 / 4 as in ``_ID_PROBLEMS`` with nothing changed; promoted minus
    evicted bytes; bytes copied to the GPU per layer; the new count of moved neurons)."""
    problem, k_evict = _mark_ids(evict, n, id_bits)
    k_promote = 0
    if problem == 0:
        problem, k_promote = _mark_ids(promote, n, id_bits)
    _unmark_ids(evict, k_evict, id_bits)
    _unmark_ids(promote, k_promote, id_bits)
    copied = np.zeros(n_layers)
    if problem == 0:
        for i in promote:
            if on_gpu[i]:
                problem = 4
                break
        for i in evict:
            if not on_gpu[i]:
                problem = 4
                break
    if problem:
        return problem, 0.0, copied, n_moved
    n_evict = len(evict)
    idx = np.empty(n_evict + len(promote), np.int64)
    new_dev = np.zeros(len(idx), np.int64)
    delta = 0.0
    for k in range(n_evict):
        i = evict[k]
        on_gpu[i] = False
        delta -= kind_bytes[group_blocks[i >> group_shift] & 1]
        idx[k] = i
        new_dev[k] = home_dimm[i] + 1
    for k in range(len(promote)):
        i = promote[k]
        on_gpu[i] = True
        group = group_blocks[i >> group_shift]
        delta += kind_bytes[group & 1]
        copied[group >> 1] += kind_bytes[group & 1]
        idx[n_evict + k] = i
    n_moved = _rekey_counts(idx, new_dev, key_of, group_blocks, group_shift, n_dev, use_packed, packed, active,
                            total, union, batched, track, base_key, moved_bits, n_moved)
    return 0, delta, copied, n_moved


@kernel
def _apply_remap(idx, dest, n, id_bits, home_dimm, on_gpu, dimm_bytes, n_layers, priced, link_bw, link_lat_s,
                 pending_link, key_of, group_blocks, group_shift, kind_bytes, n_dev, use_packed, packed, active, total,
                 union, batched, track, base_key, moved_bits, n_moved):
    """Check a DIMM remap (ids in 0..n-1, none twice, destinations in 0..J-1) and, if it holds,
    apply it: neuron ``idx[k]`` gets home ``dest[k]``; ``dimm_bytes`` (J,) follows the real moves
    (destination not the home); with ``priced``, ``pending_link`` (L,) gains each layer's DIMM-link
    time (its busiest DIMM port, sent or received bytes, over ``link_bw``, plus ``link_lat_s``);
    the cold movers' counts move to their new DIMM (:func:`_rekey_counts`).

    Returns (problem: 0, or 1 / 2 as in ``_ID_PROBLEMS`` / 3 for a destination outside the DIMMs,
    with nothing changed; real moves; their bytes; the fullest DIMM's bytes; the moved count)."""
    problem = _id_problem(idx, n, id_bits)
    J = len(dimm_bytes)
    if problem == 0:
        for d in dest:
            if d < 0 or d >= J:
                problem = 3
                break
    if problem:
        return problem, 0, 0.0, 0.0, n_moved
    sent, recv = np.zeros((n_layers, J)), np.zeros((n_layers, J))
    n_real = n_cold = 0
    moved_bytes = 0.0
    cold = np.empty(len(idx), np.int64)
    cold_dev = np.empty(len(idx), np.int64)
    for k in range(len(idx)):
        i, d = idx[k], dest[k]
        src = home_dimm[i]
        if src == d:
            continue
        home_dimm[i] = d
        group = group_blocks[i >> group_shift]
        b = kind_bytes[group & 1]
        dimm_bytes[d] += b
        dimm_bytes[src] -= b
        sent[group >> 1, src] += b
        recv[group >> 1, d] += b
        moved_bytes += b
        n_real += 1
        if not on_gpu[i]:
            cold[n_cold], cold_dev[n_cold] = i, d + 1
            n_cold += 1
    if priced:
        for layer in range(n_layers):
            port = 0.0
            for j in range(J):
                port = max(port, sent[layer, j], recv[layer, j])
            if port > 0:
                pending_link[layer] += port / link_bw + link_lat_s
    n_moved = _rekey_counts(cold[:n_cold], cold_dev[:n_cold], key_of, group_blocks, group_shift, n_dev, use_packed,
                            packed, active, total, union, batched, track, base_key, moved_bits, n_moved)
    return 0, n_real, moved_bytes, dimm_bytes.max(), n_moved


@kernel
def _mark_ids(idx, n, bits):
    """Set the packed bit (``bits``: (n / 8,) uint8 scratch) of each id of ``idx``. Returns (0, all
    of them) if they are in 0..n-1 and distinct, else (1 for one out of range / 2 for a repeat,
    how many were marked before it). :func:`_unmark_ids` clears them again: a packed bitmap stays
    in cache, where an (n,) stamp array took a cache miss per id."""
    k = 0
    while k < len(idx):
        i = idx[k]
        if i < 0 or i >= n:
            return 1, k
        mask = np.uint8(1 << (i & 7))
        if bits[i >> 3] & mask:
            return 2, k
        bits[i >> 3] |= mask
        k += 1
    return 0, k


@kernel
def _unmark_ids(idx, k, bits):
    """Clear what :func:`_mark_ids` set for the first ``k`` ids of ``idx``."""
    for j in range(k):
        bits[idx[j] >> 3] = 0


@kernel
def _id_problem(idx, n, bits):
    """0 if ids ``idx`` are in 0..n-1 and distinct, 1 if one is out of range, 2 if one repeats
    (``bits`` all zero before and after)."""
    problem, k = _mark_ids(idx, n, bits)
    _unmark_ids(idx, k, bits)
    return problem
