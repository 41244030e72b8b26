"""Observation features of the scheduling environments: per-window summaries whose size depends
only on the DIMM count and the history length, never on the model's width or depth.

Every feature is a ratio (normalised load, share of time, fraction of stages) clipped to
``[0, FEATURE_MAX]``, so one policy network reads relullama-7b and llama2-70b alike.
"""
from __future__ import annotations

import weakref

import numpy as np

from ndpsched.jit import kernel
from ndpsched.simulator import DecodeRun, WindowOutcome

#: upper bound of every feature (ratios beyond it carry no extra information for a policy)
FEATURE_MAX = 10.0
#: stage-imbalance levels whose exceedance fractions are observed (they match the tolerance
#: levels of the balancer's action grid)
TOLERANCE_LEVELS = (0.02, 0.05, 0.1, 0.2)
#: FSM-state levels whose candidate counts are observed (the hot-threshold levels of the grid)
STATE_LEVELS = (6, 8, 10, 12, 14)
#: each level's candidates are those with a state above it
_STATE_ABOVE = np.array(STATE_LEVELS, dtype=np.int64) + 1
_TOLERANCES = np.array(TOLERANCE_LEVELS)

COMMON_FEATURES = (
    ["latency_vs_reference", "dimm_imbalance_excess"]
    + [f"stages_over_{t:g}" for t in TOLERANCE_LEVELS]
    + ["stage_imbalance_p50", "stage_imbalance_p90", "stage_imbalance_max",
       "hot_fraction", "exposed_migration_share", "link_capacity_used", "pcie_capacity_used",
       "progress", "dimm_time_share"]
)


def feature_names(n_dimms: int, candidates: bool) -> list[str]:
    """Names of one window's features, in order."""
    names = COMMON_FEATURES + [f"dimm_load_rank{j}" for j in range(n_dimms)]
    if candidates:
        names += [f"candidates_over_{s}" for s in STATE_LEVELS]
    return names


def window_features(run: DecodeRun, out: WindowOutcome, reference_token_s: float,
                    last_moves: dict[str, float], candidate_states: np.ndarray | None) -> np.ndarray:
    """One window's feature vector (float64; the env casts and clips).

    Args:
        run: the run (hardware, cost model, progress).
        out: the window just simulated.
        reference_token_s: per-token latency of the episode's first window.
        last_moves: DIMM-link and PCIe bytes of the decision made before this window.
        candidate_states: (16,) histogram of FSM states of the cold neurons that are candidates
            for promotion (HotCold), or None.
    """
    inputs = _feature_inputs(run, out, reference_token_s, last_moves, candidate_states)
    row = np.empty(_n_features(inputs), np.float64)
    _feature_row(row, *inputs)
    return row


def _feature_inputs(run: DecodeRun, out: WindowOutcome, reference_token_s: float, last_moves: dict[str, float],
                    candidate_states: np.ndarray | None) -> tuple:
    """The arguments of :func:`_feature_row` after its output row: the window's (2L, J + 1) loads
    and (J + 1,) per-device loads, its DIMM activations, the tolerance levels, the scalar features,
    the candidates' state histogram (empty if none) and the promotion capacity."""
    sim, cost = run.sim, out.cost
    device_load = out.activity.device_load                   # (2L, J + 1) activations per stage, device
    per_device = out.device_activations if out.device_activations is not None else device_load.sum(axis=0)
    window_s = out.window_s
    comps = cost.components
    compute = comps["gpu_compute"] + comps["dimm_compute"]
    link_bytes_hidden, pcie_bytes_hidden, promotion_cap = _constants(sim)
    imbalance = cost.dimm_imbalance.tolist()
    scalars = np.array([
        window_s / (out.t1 - out.t0) / reference_token_s,
        sum(imbalance) / len(imbalance) - 1.0,
        out.gpu_activations / out.all_activations if out.all_activations else 0.0,
        comps["exposed_migration"] / window_s,
        last_moves.get("dimm_link_bytes", 0.0) / link_bytes_hidden,
        last_moves.get("pcie_bytes", 0.0) / pcie_bytes_hidden,
        run.next_step / sim.gen_len,
        comps["dimm_compute"] / compute if compute > 0 else 0.0,
    ])
    cand = _NO_CANDIDATES if candidate_states is None else np.asarray(candidate_states, dtype=np.int64)
    return (device_load, per_device, out.all_activations - out.gpu_activations, _TOLERANCES, scalars, cand,
            promotion_cap)


def _n_features(inputs: tuple) -> int:
    device_load, cand = inputs[0], inputs[5]
    return len(COMMON_FEATURES) + device_load.shape[1] - 1 + (len(STATE_LEVELS) if len(cand) else 0)


_NO_CANDIDATES = np.zeros(0, dtype=np.int64)


@kernel
def _feature_row(row, device_load, per_device, dimm_total, tolerances, scalars, cand, cap):
    """One window's features into ``row``, in the order of :func:`feature_names`, in one compiled
    pass instead of a dozen small numpy calls at every env step: ``scalars[:2]`` (latency,
    imbalance), the load statistics, ``scalars[2:]``, the DIMM ranks, then (if ``cand`` (16,) is
    not empty) the candidates per state level over ``cap``.

    The load statistics: per stage, how far its slowest DIMM is above the mean (max / mean - 1,
    from the (2L, J + 1) loads, GPU column first; the 1e-30 makes an idle stage 0 and changes no
    busy stage's ratio, its loads being whole activations): the fraction of stages above each
    tolerance, the median, the 90th percentile (lower) and the maximum; the DIMM ranks: the DIMMs'
    window loads (``per_device[1:]``) from the busiest down over their mean (all 1 if idle)."""
    n, J = device_load.shape[0], device_load.shape[1] - 1
    excess = np.empty(n, np.float64)
    for g in range(n):
        top = device_load[g, 1]
        total = device_load[g, 1]
        for j in range(2, J + 1):
            top = max(top, device_load[g, j])
            total += device_load[g, j]
        excess[g] = (top * J + 1e-30) / (total + 1e-30) - 1.0
    excess.sort()
    n_tol = len(tolerances)
    row[0], row[1] = scalars[0], scalars[1]
    for k in range(n_tol):
        above = 0
        for g in range(n):
            above += excess[g] > tolerances[k]
        row[2 + k] = above / n
    at = 2 + n_tol
    row[at] = excess[n // 2]
    row[at + 1] = excess[int(0.9 * (n - 1))]
    row[at + 2] = excess[n - 1]
    at += 3
    for k in range(2, len(scalars)):
        row[at] = scalars[k]
        at += 1
    dimms = np.sort(per_device[1:])
    for j in range(J):
        row[at + j] = dimms[J - 1 - j] * (J / dimm_total) if dimm_total > 0 else 1.0
    at += J
    if len(cand):
        # candidates with state >= s: the histogram is indexed by 15 - state
        for k in range(len(_STATE_ABOVE)):
            count = 0
            for c in range(16 - _STATE_ABOVE[k]):
                count += cand[15 - c]
            row[at + k] = count / cap
    return row


def _constants(sim) -> tuple[float, float, float]:
    """Per simulator (its hardware, cost model and batch do not change): the DIMM-link and PCIe
    bytes one window's projections hide (the migration time hidden per window, one projection
    per layer), and the promotion capacity (at least 1): neurons PCIe copies within one
    projection per layer, summed over layers (FFN-sized)."""
    out = _CONSTANTS.get(sim)
    if out is None:
        cm = sim.cost
        hidden_s = cm.fixed_times_s(sim.batch)[2] * sim.model.n_layers
        per_layer_bytes = cm.projection_s(sim.batch) * cm.pcie_bw
        cap = float(per_layer_bytes / cm.neuron_bytes[1] * sim.model.n_layers)
        out = _CONSTANTS[sim] = (cm.link_bw * hidden_s, cm.pcie_bw * hidden_s, max(cap, 1.0))
    return out


#: _constants' values, by simulator
_CONSTANTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ObservationStack:
    """The last ``history`` windows' features, oldest first, clipped to ``[0, FEATURE_MAX]`` as
    float32: what the environments return and what a trained policy reads inside the simulator."""

    def __init__(self, history: int, n_features: int) -> None:
        self._hist = np.zeros((history, n_features), dtype=np.float32)   # rows clipped on entry

    def reset(self) -> None:
        self._hist[:] = 0.0

    def push(self, features: np.ndarray) -> np.ndarray:
        """Add a window's features (clipped) and return the flat history (a new array)."""
        return _push_row(self._hist, np.asarray(features, dtype=np.float64), FEATURE_MAX)

    def push_window(self, run: DecodeRun, out: WindowOutcome, reference_token_s: float,
                    last_moves: dict[str, float], candidate_states: np.ndarray | None) -> np.ndarray:
        """``push(window_features(...))`` in one compiled call (the envs' step)."""
        return _push_window(self._hist, FEATURE_MAX,
                            *_feature_inputs(run, out, reference_token_s, last_moves, candidate_states))


@kernel
def _push_row(hist, features, top):
    """Shift the (history, F) float32 rows up by one, write ``features`` clipped to [0, top] as
    the last row, and return a flat copy (the env's observation; a view would change with the
    next push). One compiled call: numpy's shift, two clips and a copy cost 4x more here."""
    h, n = hist.shape
    for r in range(h - 1):
        hist[r] = hist[r + 1]
    for j in range(n):
        hist[h - 1, j] = min(max(features[j], 0.0), top)
    return hist.flatten()


def candidate_histogram(partition, run: DecodeRun, out: WindowOutcome) -> np.ndarray | None:
    """The promotion candidates' FSM-state histogram from a partition policy that keeps one
    (``hermes.adjust``, or a learned policy wrapping it), else None."""
    policy = getattr(partition, "base", partition)
    if not hasattr(policy, "candidate_state_histogram"):
        return None
    return policy.candidate_state_histogram(run.placement, out.activity)


@kernel
def _push_window(hist, top, device_load, per_device, dimm_total, tolerances, scalars, cand, cap):
    """:func:`_feature_row` into a scratch row, then :func:`_push_row` of it."""
    row = np.empty(hist.shape[1], np.float64)
    _feature_row(row, device_load, per_device, dimm_total, tolerances, scalars, cand, cap)
    return _push_row(hist, row, top)
