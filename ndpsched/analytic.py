"""Analytic ("expected-value") mode of the execution model: no token-by-token trace.

The trace-driven simulator (:mod:`ndpsched.simulator`) steps every token of every sequence and
counts, per (layer, kind) group and device, how many neurons fire. This mode replaces those counts
by their expectations under the activation frequencies the trace generator would use:

- ``total`` (compute work, summed over the batch) of a group on a device = ``B * sum_i p_i``;
- ``union`` (weight bytes, each active neuron read once per step) = ``sum_i 1 - (1 - p_i)^B``,
  the expected size of the union of B independent sequences' active sets;

with the sums over the neurons the *initial* placement puts on that device (the system's partition
and balancer decide it from the offline profile, exactly as in trace mode). The cost model then
prices every decode step once (only the KV length changes from step to step), in one vectorized
call.

What it leaves out, by construction (docs/sweeps.md measures the effect):

- online moves (Hermes' hot/cold adjustment and DIMM remapping) and the migration traffic they cost;
- predictor errors (the predicted set is the true set, as with the ``oracle`` predictor);
- step-to-step noise: a stage waits for its slowest DIMM, and E[max] >= max E, so trace mode is
  slower where the per-DIMM counts are small and noisy.

It therefore tracks the trace mode of offline systems (``hermes-offline``, ``powerinfer-ndp``,
``topk``) closely and is an optimistic-placement / pessimistic-adaptation estimate for ``hermes``.
It is meant for design-space sweeps with thousands of points: with the frequencies cached, a
llama2-70b point costs about a second with a greedy partition (the initial placement's sorts
dominate; an ILP partition adds its solve time), against 6-60 s in trace mode (docs/sweeps.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .config import RunConfig
from .errors import unknown_name
from .models import ModelSpec
from .simulator import SimResult, memory_budgets

#: RunConfig.mode values
MODES = ("trace", "analytic")
#: generators whose frequencies are drawn here without their token chains; any other source
#: (``fitted:PARAMS.yaml``, a ``.npz`` file) is generated or loaded and its decode tokens measured
CLOSED_FORM_SOURCES = ("skew", "relullama7b", "paper-relu")


@dataclass
class ExpectedActivity:
    """Activation frequencies the analytic mode works from.

    Attributes:
        offline: (N,) profiled frequency the policies place from (Hermes' offline profile).
        runtime: (N,) expected per-token activation probability during decode.
        layer_parents: (N, 2) correlation table, or None.
    """

    offline: np.ndarray
    runtime: np.ndarray
    layer_parents: np.ndarray | None = None


_CACHE: dict[tuple, ExpectedActivity] = {}
_CACHE_SIZE = 4


def expected_activity(cfg: RunConfig, model: ModelSpec) -> ExpectedActivity:
    """Cached :func:`compute_expected_activity`: hardware design sweeps change only the machine,
    so the frequencies (seconds to draw for a 70B model) are computed once per process and model.
    The cached arrays are read-only."""
    key = (model.name, model.n_neurons, cfg.trace.source, cfg.trace.top20_share, cfg.seed,
           0 if cfg.trace.source in CLOSED_FORM_SOURCES else cfg.batch, cfg.prompt_len, cfg.gen_len)
    hit = _CACHE.get(key)
    if hit is None:
        hit = compute_expected_activity(cfg, model)
        for arr in (hit.offline, hit.runtime, hit.layer_parents):
            if arr is not None:
                arr.flags.writeable = False
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = hit
    return hit


def compute_expected_activity(cfg: RunConfig, model: ModelSpec) -> ExpectedActivity:
    """Frequencies of the trace ``cfg`` names, without generating its tokens.

    For the generators of CLOSED_FORM_SOURCES this follows
    :func:`ndpsched.tracegen.synthetic_trace` step by step with the same seed children
    (frequencies, coupling plan, drift), so the expected activity is that of the trace the trace
    mode would simulate. For other sources (a fitted generator, a ``.npz`` trace) the trace is
    built and the decode tokens' measured frequencies of the batch's sequences are the runtime
    probabilities.
    """
    from .layercorr import plan_coupling
    from .trace import NeuronLayout
    from .tracegen import (
        DEFAULT_LAYER_COUPLING,
        DEFAULT_PROFILE_DRIFT,
        drift_frequencies,
        frequencies_from_profile,
        frequencies_from_skew,
    )

    src = cfg.trace.source
    if src not in CLOSED_FORM_SOURCES:
        from .inputs import load_trace

        trace = load_trace(cfg, model)
        batch = trace.sequences(range(cfg.batch)) if trace.n_seqs != cfg.batch else trace
        runtime = batch.frequencies(cfg.prompt_len, cfg.prompt_len + cfg.gen_len)
        offline = trace.offline_freqs if trace.offline_freqs is not None else trace.frequencies(0, cfg.prompt_len)
        return ExpectedActivity(np.asarray(offline, np.float64), runtime, getattr(trace, "layer_parents", None))
    freq_seed, _chain_seed, couple_seed, drift_seed = np.random.SeedSequence(cfg.seed).spawn(4)
    if src == "skew":
        freqs = frequencies_from_skew(model, cfg.trace.top20_share, freq_seed)
    else:
        freqs = frequencies_from_profile(model, None, freq_seed)
    layout = NeuronLayout.of(model)
    plan = plan_coupling(freqs, layout, DEFAULT_LAYER_COUPLING, np.random.default_rng(couple_seed))
    offline = freqs.copy()
    offline[plan.follower] = freqs[plan.root[plan.follower]]
    runtime = drift_frequencies(freqs, layout, DEFAULT_PROFILE_DRIFT, np.random.default_rng(drift_seed))
    runtime[plan.follower] = runtime[plan.root[plan.follower]]    # a follower fires with its root
    # the trace stores the offline profile as float32; policies must see the same numbers
    return ExpectedActivity(offline.astype(np.float32).astype(np.float64), runtime, plan.parents)


def expected_counts(p: np.ndarray, key: np.ndarray, n_keys: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Expected (union, total) active neurons per key.

    Args:
        p: (N,) per-token activation probability of every neuron.
        key: (N,) int, the (group, device) cell of every neuron.
        n_keys: number of cells.
        batch: sequences per step, B.

    Returns:
        union (n_keys,): sum of 1 - (1 - p)^B; total (n_keys,): B * sum of p.
    """
    total = batch * np.bincount(key, weights=p, minlength=n_keys)
    union = total if batch == 1 else np.bincount(key, weights=-np.expm1(batch * np.log1p(-np.minimum(p, 1.0 - 1e-12))),
                                                  minlength=n_keys)
    return union, total


def simulate_analytic(cfg: RunConfig, activity: ExpectedActivity | None = None) -> SimResult:
    """Price ``cfg`` from expected activity (see module doc); same result type as trace mode.

    ``moves`` and ``bytes_moved`` are zero (no online moves) and ``predictor`` is empty.
    """
    from .costmodel import COMPONENTS, CostModel, CostParams
    from .policy import Placement, SchedContext
    from .presets import build_spec, load_hardware
    from .registry import registry
    from .inputs import resolve_policies
    from .systems import HOST_SYSTEMS, canonical
    from .trace import NeuronLayout

    wall0 = time.perf_counter()
    model = cfg.load_model()
    hw = load_hardware(cfg.gpu, cfg.dimms, overrides=cfg.hardware)
    if canonical(cfg.system) in HOST_SYSTEMS:
        from .baselines import host_platform

        hw = host_platform(hw)
    cost = CostModel(model, hw, build_spec(CostParams, cfg.cost, "cost parameters"))
    specs = resolve_policies(cfg)
    policies = {role: registry(role).create(spec.name, spec.params) for role, spec in specs.items()}
    if activity is None:
        activity = expected_activity(cfg, model)
    layout = NeuronLayout.of(model)
    B, P, G = cfg.batch, cfg.prompt_len, cfg.gen_len
    gpu_budget, dimm_budget = memory_budgets(model, hw, cost.params, B, P + G)
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed).spawn(1)[0])
    ctx = SchedContext(model, hw, cost, layout, B, cfg.window_tokens, activity.offline, activity.runtime,
                       gpu_budget, dimm_budget, rng, layer_parents=activity.layer_parents)
    on_gpu = policies["partition"].initial_partition(ctx)
    home = policies["balancer"].initial_mapping(ctx, on_gpu)
    device = Placement(on_gpu, home).device()
    L, n_dev = model.n_layers, hw.n_dimms + 1
    K = 2 * L * n_dev
    key = ctx.group_of.astype(np.int64) * n_dev + device
    union, total = expected_counts(activity.runtime, key, K, B)
    loop0 = time.perf_counter()
    shape = (G, 2 * L, n_dev)
    steps = cost.steps_cost(np.broadcast_to(union.reshape(2 * L, n_dev), shape),
                            np.broadcast_to(total.reshape(2 * L, n_dev), shape), np.arange(P, P + G) + 1, B)
    breakdown = dict.fromkeys(COMPONENTS, 0.0)
    for part in (cost.prefill_cost(P, B), steps.components):
        for k, v in part.items():
            breakdown[k] += v
    prefill_s = float(sum(cost.prefill_cost(P, B).values()))
    decode_s = float(steps.step_s.sum())
    per_dev = total.reshape(2 * L, n_dev).sum(axis=0)
    resolved = cfg.to_dict()
    for role, policy in (("partition", policies["partition"]), ("predictor", policies["predictor"]),
                         ("balancer", policies["balancer"])):
        resolved[role] = policy.describe()
    return SimResult(
        tokens_per_s=G * B / (prefill_s + decode_s), prefill_s=prefill_s, decode_s=decode_s,
        breakdown_s=breakdown, token_s=steps.step_s, dimm_imbalance=float(steps.dimm_imbalance.mean()),
        moves={"promoted": 0, "evicted": 0, "remapped": 0}, bytes_moved={"pcie": 0.0, "dimm_link": 0.0},
        hot_fraction=float(per_dev[0] / per_dev.sum()) if per_dev.sum() else 0.0, stage_s=steps.stage_s,
        predictor={}, wall_s=time.perf_counter() - wall0, loop_wall_s=time.perf_counter() - loop0,
        config=resolved)


def check_mode(mode: str) -> None:
    """Raise a one-line error for an unknown execution mode."""
    if mode not in MODES:
        raise unknown_name("mode", mode, MODES)
