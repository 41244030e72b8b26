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
    arrays, scalars = _feature_args(run, out, reference_token_s, last_moves, candidate_states)
    n = len(COMMON_FEATURES) + out.activity.device_load.shape[1] - 1 + (len(STATE_LEVELS) if len(arrays[3]) else 0)
    row = np.empty(n, np.float64)
    _feature_row(row, np.empty(len(out.activity.device_load)), *arrays, _constants(run.sim), *scalars)
    return row


def _feature_args(run: DecodeRun, out: WindowOutcome, reference_token_s: float, last_moves: dict[str, float],
                  candidate_states: np.ndarray | None) -> tuple[tuple, tuple]:
    """The arguments of :func:`_feature_row` after its output and scratch rows, less the
    simulator's constants (:func:`_constants`), which come between them: the window's (2L, J + 1)
    loads, (J + 1,) per-device loads and per-step DIMM imbalance, and the candidates' state
    histogram (empty if none); then the scalars the features are ratios of (plain floats: a kernel
    takes them for free, an array of them costs a microsecond)."""
    cost = out.cost
    comps = cost.components
    per_device = out.device_activations
    if per_device is None:
        per_device = out.activity.device_load.sum(axis=0)
    cand = _NO_CANDIDATES if candidate_states is None else np.asarray(candidate_states, dtype=np.int64)
    return ((out.activity.device_load, per_device, cost.dimm_imbalance, cand),
            (out.window_s, out.t1 - out.t0, reference_token_s, comps["exposed_migration"], comps["gpu_compute"],
             comps["dimm_compute"], last_moves.get("dimm_link_bytes", 0.0), last_moves.get("pcie_bytes", 0.0),
             run.next_step / run.sim.gen_len))


_NO_CANDIDATES = np.zeros(0, dtype=np.int64)


@kernel
def _feature_row(row, excess, device_load, per_device, imbalance, cand, consts, window_s, n_tokens, reference_token_s,
                 exposed_s, gpu_compute_s, dimm_compute_s, link_bytes, pcie_bytes, progress):
    """One window's features into ``row``, in the order of :func:`feature_names`, in one compiled
    pass instead of a dozen small numpy calls at every env step (``excess``: scratch of at least
    2L floats). Returns the mean per-step DIMM imbalance (the info's ``dimm_imbalance``).

    The scalars: per-token latency over the reference; mean per-step DIMM imbalance - 1; the GPU's
    share of the activations (``per_device[0]`` of their sum); exposed migration over the window's
    time; the DIMM-link and PCIe bytes moved over what a window hides (``consts[:2]``); progress;
    the DIMMs' share of the compute time.

    The load statistics: per stage, how far its slowest DIMM is above the mean (max / mean - 1,
    from the (2L, J + 1) loads, GPU column first; the 1e-30 makes an idle stage 0 and changes no
    busy stage's ratio, its loads being whole activations): the fraction of stages above each
    tolerance (:data:`TOLERANCE_LEVELS`), the median, the 90th percentile (lower) and the maximum;
    the DIMM ranks: the DIMMs' window loads (``per_device[1:]``) from the busiest down over their
    mean (all 1 if idle); then (if ``cand`` (16,) is not empty) the candidates per state level
    over the promotion capacity ``consts[2]``.

    Both orderings are insertion sorts of a few dozen values, with no allocation: between two
    windows of the simulator this code runs cold, and np.sort's larger code and a scratch
    allocation cost more there than the comparisons."""
    n, J = device_load.shape[0], device_load.shape[1] - 1
    for g in range(n):
        top = device_load[g, 1]
        total = device_load[g, 1]
        for j in range(2, J + 1):
            top = max(top, device_load[g, j])
            total += device_load[g, j]
        x = (top * J + 1e-30) / (total + 1e-30) - 1.0
        i = g                                   # excess[:g + 1] ascending
        while i > 0 and excess[i - 1] > x:
            excess[i] = excess[i - 1]
            i -= 1
        excess[i] = x
    imbalance_sum = 0.0
    for s in range(len(imbalance)):
        imbalance_sum += imbalance[s]
    imbalance_mean = imbalance_sum / len(imbalance)
    gpu_total = per_device[0]
    all_total = per_device[0]
    for j in range(1, J + 1):
        all_total += per_device[j]
    dimm_total = all_total - gpu_total
    compute_s = gpu_compute_s + dimm_compute_s
    row[0] = window_s / n_tokens / reference_token_s
    row[1] = imbalance_mean - 1.0
    n_tol = len(_TOLERANCES)
    for k in range(n_tol):
        above = 0
        for g in range(n):
            above += excess[g] > _TOLERANCES[k]
        row[2 + k] = above / n
    at = 2 + n_tol
    row[at] = excess[n // 2]
    row[at + 1] = excess[int(0.9 * (n - 1))]
    row[at + 2] = excess[n - 1]
    row[at + 3] = gpu_total / all_total if all_total else 0.0
    row[at + 4] = exposed_s / window_s
    row[at + 5] = link_bytes / consts[0]
    row[at + 6] = pcie_bytes / consts[1]
    row[at + 7] = progress
    row[at + 8] = dimm_compute_s / compute_s if compute_s > 0 else 0.0
    at += 9
    for j in range(J):                          # the DIMMs' loads, busiest first
        x = per_device[1 + j]
        i = j
        while i > 0 and row[at + i - 1] < x:
            row[at + i] = row[at + i - 1]
            i -= 1
        row[at + i] = x
    for j in range(J):
        row[at + j] = row[at + j] * (J / dimm_total) if dimm_total > 0 else 1.0
    at += J
    if len(cand):
        # candidates with state >= s: the histogram is indexed by 15 - state
        for k in range(len(_STATE_ABOVE)):
            count = 0
            for c in range(16 - _STATE_ABOVE[k]):
                count += cand[15 - c]
            row[at + k] = count / consts[2]
    return imbalance_mean


def _constants(sim) -> np.ndarray:
    """Per simulator (its hardware, cost model and batch do not change): the DIMM-link and PCIe
    bytes one window's projections hide (the migration time hidden per window, one projection
    per layer), and the promotion capacity (at least 1): neurons PCIe copies within one
    projection per layer, summed over layers (FFN-sized); a (3,) float64 array."""
    out = _CONSTANTS.get(sim)
    if out is None:
        cm = sim.cost
        hidden_s = cm.fixed_times_s(sim.batch)[2] * sim.model.n_layers
        per_layer_bytes = cm.projection_s(sim.batch) * cm.pcie_bw
        cap = float(per_layer_bytes / cm.neuron_bytes[1] * sim.model.n_layers)
        out = _CONSTANTS[sim] = np.array([cm.link_bw * hidden_s, cm.pcie_bw * hidden_s, max(cap, 1.0)])
    return out


#: _constants' values, by simulator
_CONSTANTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ObservationStack:
    """The last ``history`` windows' features, oldest first, clipped to ``[0, FEATURE_MAX]`` as
    float32: what the environments return and what a trained policy reads inside the simulator."""

    def __init__(self, history: int, n_features: int) -> None:
        self._hist = np.zeros((history, n_features), dtype=np.float32)   # rows clipped on entry
        self._sim = None                            # the simulator of the last push
        # _push_window's work array: the simulator's _constants, then the row and per-stage scratch
        self._work = np.zeros(0)
        #: mean per-step DIMM imbalance of the last window pushed (:meth:`push_window`)
        self.last_dimm_imbalance = float("nan")

    def reset(self) -> None:
        self._hist[:] = 0.0

    def push(self, features: np.ndarray) -> np.ndarray:
        """Add a window's features (clipped) and return the flat history (a new array)."""
        _push_row(self._hist, np.asarray(features, dtype=np.float64), FEATURE_MAX)
        return self._hist.ravel().copy()

    def push_window(self, run: DecodeRun, out: WindowOutcome, reference_token_s: float,
                    last_moves: dict[str, float], candidate_states: np.ndarray | None) -> np.ndarray:
        """``push(window_features(...))`` in one compiled call (the envs' step)."""
        if run.sim is not self._sim:
            self._sim = run.sim
            self._work = np.concatenate([_constants(run.sim),
                                         np.zeros(self._hist.shape[1] + len(out.activity.device_load))])
        arrays, scalars = _feature_args(run, out, reference_token_s, last_moves, candidate_states)
        # (few arguments: each costs a quarter of a microsecond when the call runs cold, between
        # two windows of the simulator)
        self.last_dimm_imbalance = _push_window(self._hist, self._work, *arrays, *scalars)
        # (the copy here: an array returned by a kernel costs 3x more to hand back)
        return self._hist.ravel().copy()


@kernel
def _push_row(hist, features, top):
    """Shift the (history, F) float32 rows up by one and write ``features`` clipped to [0, top]
    as the last row. One compiled call: numpy's shift and two clips cost 4x more here."""
    h, n = hist.shape
    for r in range(h - 1):
        for j in range(n):
            hist[r, j] = hist[r + 1, j]
    for j in range(n):
        hist[h - 1, j] = min(max(features[j], 0.0), top)


def candidate_histogram(partition, run: DecodeRun, out: WindowOutcome) -> np.ndarray | None:
    """The promotion candidates' FSM-state histogram from a partition policy that keeps one
    (``hermes.adjust``, or a learned policy wrapping it), else None."""
    policy = getattr(partition, "base", partition)
    if not hasattr(policy, "candidate_state_histogram"):
        return None
    return policy.candidate_state_histogram(run.placement, out.activity)


@kernel
def _push_window(hist, work, device_load, per_device, imbalance, cand, window_s, n_tokens, reference_token_s,
                 exposed_s, gpu_compute_s, dimm_compute_s, link_bytes, pcie_bytes, progress):
    """:func:`_feature_row` into ``work`` (after its first three values, the simulator's
    :func:`_constants`: the row, then the per-stage scratch), then :func:`_push_row` of the row
    clipped to [0, FEATURE_MAX]; returns the window's mean DIMM imbalance."""
    n_features = hist.shape[1]
    row = work[3: 3 + n_features]
    imbalance_mean = _feature_row(row, work[3 + n_features:], device_load, per_device, imbalance, cand, work[:3],
                                  window_s, n_tokens, reference_token_s, exposed_s, gpu_compute_s, dimm_compute_s,
                                  link_bytes, pcie_bytes, progress)
    _push_row(hist, row, FEATURE_MAX)
    return imbalance_mean
