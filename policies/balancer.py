"""DIMM balancers: where each neuron's weights live, and online remapping between DIMMs.

- ``round-robin``, ``random``: naive static mappings (baselines).
- ``static``: a frequency-balanced static mapping that never changes (the ablation's
  "offline partition" step): within every (layer, kind), neurons sorted by offline frequency are
  dealt to DIMMs in snake order (0..J-1, J-1..0, ...), which evens each DIMM's expected load.
- ``hermes.window``: Hermes Algorithm 1, every window of tokens.
- ``greedy.lpt``: longest-processing-time-first re-assignment of each window's activity.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ndpsched.jit import kernel
from ndpsched.policy import BalanceMoves, BalancerPolicy, Placement, SchedContext, WindowActivity
from ndpsched.trace import NeuronLayout
from ndpsched.registry import register_policy


@register_policy("balancer", "round-robin")
class RoundRobin(BalancerPolicy):
    """Neuron i of every (layer, kind) goes to DIMM i mod J, whatever its frequency."""

    def _initial(self, ctx: SchedContext, on_gpu: np.ndarray) -> np.ndarray:
        return (index_in_group(ctx) % ctx.n_dimms).astype(np.int16)


@register_policy("balancer", "random")
class RandomBalancer(BalancerPolicy):
    """Each neuron on a uniformly random DIMM (seeded)."""

    def _initial(self, ctx: SchedContext, on_gpu: np.ndarray) -> np.ndarray:
        return ctx.rng.integers(0, ctx.n_dimms, size=ctx.n_neurons).astype(np.int16)


def index_in_group(ctx: SchedContext) -> np.ndarray:
    """(N,) position of every neuron inside its (layer, kind) group."""
    lay = ctx.layout
    pos = np.arange(ctx.n_neurons) - ctx.layer_of.astype(np.int64) * lay.per_layer
    return np.where(ctx.kind_of == 1, pos - lay.d_qkv, pos)


def snake_mapping(ctx: SchedContext, on_gpu: np.ndarray) -> np.ndarray:
    """Frequency-balanced static mapping: per group, cold neurons by decreasing offline frequency
    dealt in snake order over the DIMMs (hot neurons are dealt the same way after them, so their
    weights are spread too; they are computed on the GPU while hot). Cached per process by its
    inputs (sweep trials on one trace and hot set share it)."""
    from ndpsched.content_cache import cached_array

    layout = (ctx.layout.n_layers, ctx.layout.d_qkv, ctx.layout.d_ffn, ctx.n_dimms)
    return cached_array("snake mapping", (ctx.offline_freqs, on_gpu), layout,
                        lambda: _snake_mapping(ctx, on_gpu)).copy()


def _snake_mapping(ctx: SchedContext, on_gpu: np.ndarray) -> np.ndarray:
    J = ctx.n_dimms
    # sort key: group, then cold before hot, then decreasing frequency (stable -> deterministic)
    order = np.lexsort((-ctx.offline_freqs, on_gpu, ctx.group_of))
    group_sorted = ctx.group_of[order]
    starts = np.searchsorted(group_sorted, np.arange(ctx.layout.n_groups))
    rank = np.arange(ctx.n_neurons) - starts[group_sorted]
    lap, pos = np.divmod(rank, J)
    dimm = np.where(lap % 2 == 0, pos, J - 1 - pos)
    home = np.empty(ctx.n_neurons, dtype=np.int16)
    home[order] = dimm
    return home


@register_policy("balancer", "static")
class StaticBalanced(BalancerPolicy):
    """Frequency-balanced mapping (snake order by offline frequency); never remaps."""

    def _initial(self, ctx: SchedContext, on_gpu: np.ndarray) -> np.ndarray:
        return snake_mapping(ctx, on_gpu)


def _window_candidates(ctx: SchedContext, window: WindowActivity, placement: Placement, groups: np.ndarray,
                       stride: int = 1, offset: int = 0):
    """Cold neurons of ``groups`` that fired in the window: (ids, home DIMM, activation count A_i).

    With ``stride`` > 1 only every stride-th neuron of each group is examined, starting at
    ``offset`` (callers rotate it, so every neuron is a candidate every ``stride`` windows).
    """
    ids = _group_members(ctx.layout, groups, stride, offset)
    counts = window.neuron_counts(ids)
    keep = np.flatnonzero((counts > 0) & ~placement.on_gpu.take(ids))
    ids = ids.take(keep)
    return ids, placement.home_dimm.take(ids).astype(np.int64), counts.take(keep)


def _group_members(layout: NeuronLayout, groups: np.ndarray, stride: int, offset: int) -> np.ndarray:
    """The neurons at positions offset, offset + stride, ... (offset mod stride) of each of
    ``groups``, group after group."""
    members, ptr = _strided_members(layout, stride)[offset % stride]
    if len(groups) == len(ptr) - 1:
        return members
    return _runs_of(members, ptr, np.asarray(groups, dtype=np.int64))


@kernel
def _runs_of(members, ptr, groups):
    """``members[ptr[g]: ptr[g + 1]]`` for each of ``groups``, concatenated (one compiled copy in
    place of a list of slices and np.concatenate)."""
    size = 0
    for g in groups:
        size += ptr[g + 1] - ptr[g]
    out = np.empty(size, members.dtype)
    n = 0
    for g in groups:
        for k in range(ptr[g], ptr[g + 1]):
            out[n] = members[k]
            n += 1
    return out


@functools.lru_cache(maxsize=8)
def _strided_members(layout: NeuronLayout, stride: int) -> list[tuple[np.ndarray, list[int]]]:
    """Per offset o < ``stride``: the neurons at positions o, o + stride, ... of every group,
    group after group (read-only intp array), and where each group's run starts ((G + 1,) int64)."""
    bounds = layout.group_starts()
    starts, lengths = bounds[:-1], np.diff(bounds)
    out = []
    for o in range(stride):
        sizes = np.maximum(lengths - o + stride - 1, 0) // stride
        ends = np.cumsum(sizes)
        ids = np.repeat(starts + o - (ends - sizes) * stride, sizes) + np.arange(ends[-1]) * stride
        ids = ids.astype(np.intp)
        ids.flags.writeable = False
        ptr = np.concatenate([[0], ends]).astype(np.int64)
        ptr.flags.writeable = False
        out.append((ids, ptr))
    return out


def _imbalanced_groups(window: WindowActivity, tolerance: float) -> np.ndarray:
    """The stages whose busiest DIMM is more than ``tolerance`` above their mean DIMM load."""
    return _over_tolerance(np.ascontiguousarray(window.device_load, dtype=np.float64), float(tolerance))


@kernel
def _over_tolerance(device_load, tolerance):
    """Rows g of the (G, J + 1) loads (GPU column first) with DIMM loads not all 0 and
    max * J > (1 + tolerance) * sum (one compiled pass: numpy took five calls)."""
    G, J = device_load.shape[0], device_load.shape[1] - 1
    out = np.empty(G, np.int64)
    n = 0
    for g in range(G):
        top = total = 0.0
        for d in range(1, J + 1):
            top = max(top, device_load[g, d])
            total += device_load[g, d]
        if total > 0 and top * J > (1 + tolerance) * total:
            out[n] = g
            n += 1
    return out[:n].copy()


class WindowRebalancer(BalancerPolicy):
    """Base of the online balancers: frequency-balanced start; each window, the stages whose
    slowest DIMM exceeds the mean by more than ``params.tolerance`` are rebalanced by
    :meth:`_rebalance` from their cold neurons that fired in the window."""

    uses_neuron_activity = True

    def reset(self, ctx: SchedContext) -> None:
        super().reset(ctx)
        self._windows = 0      # rotates the candidate sample (see ``candidate_stride``)

    def _initial(self, ctx: SchedContext, on_gpu: np.ndarray) -> np.ndarray:
        return snake_mapping(ctx, on_gpu)

    def _update(self, window: WindowActivity, placement: Placement) -> BalanceMoves | None:
        groups = _imbalanced_groups(window, self.params.tolerance)
        if len(groups) == 0 or self.ctx.n_dimms < 2:
            return None
        self._windows += 1
        return self._rebalance_groups(window, placement, groups)

    def _rebalance_groups(self, window: WindowActivity, placement: Placement, groups: np.ndarray) -> BalanceMoves | None:
        """The moves for the imbalanced stages ``groups``: by default :meth:`_rebalance` on their
        cold neurons that fired in the window."""
        stride = getattr(self.params, "candidate_stride", 1)
        ids, home, A = _window_candidates(self.ctx, window, placement, groups, stride, self._windows)
        return self._rebalance(window, groups, ids, home, A)

    def _rebalance(self, window, groups, ids, home, A) -> BalanceMoves | None:
        raise NotImplementedError  # abstract


@register_policy("balancer", "hermes.window")
class HermesWindow(WindowRebalancer):
    """Hermes Algorithm 1: per window, pair the busiest DIMM with the idlest, the 2nd busiest
    with the 2nd idlest, ...; within a pair move the most-activated cold neurons from the busy
    DIMM to its partner while the busy side stays the more loaded (as printed, the loop condition
    and partner index look like typos; this is the stated intent: partner = J-1-rank).

    Loads are per (layer, kind) stage, since each stage waits for its slowest DIMM. A stage whose
    slowest DIMM is within ``tolerance`` of the mean is left alone (Hermes: a balanced mapping
    keeps DIMM runtimes within 5 %); this also keeps the policy's cost proportional to the
    imbalanced stages, not to the model. Initial mapping: frequency-balanced snake order.
    """

    @dataclass(frozen=True)
    class Params:
        #: stages whose max/mean DIMM load is at most 1 + tolerance are not remapped
        tolerance: float = 0.05
        #: cap on neurons moved per stage and window (Hermes sets none: 0 = no cap)
        max_moves_per_stage: int = 0
        #: examine every stride-th neuron of a stage per window (rotating), 1 = all (exact
        #: Algorithm 1). The most-activated neurons tie at A = window length by the hundreds per
        #: DIMM, so a sample finds them at 1/stride of the cost (chosen default 16).
        candidate_stride: int = 16
        #: share of each pair's load gap that is closed: 1.0 moves up to half the gap, i.e. until
        #: the pair is even (Algorithm 1); smaller values move less (fewer DIMM-link bytes)
        move_fraction: float = 1.0

        def __post_init__(self) -> None:
            if self.tolerance < 0:
                raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")
            if not 0 <= self.move_fraction <= 1:
                raise ValueError(f"move_fraction must be in [0, 1], got {self.move_fraction}")
            if self.max_moves_per_stage < 0:
                raise ValueError(f"max_moves_per_stage must be >= 0, got {self.max_moves_per_stage}")
            if self.candidate_stride < 1:
                raise ValueError(f"candidate_stride must be >= 1, got {self.candidate_stride}")

    def _rebalance_groups(self, window: WindowActivity, placement: Placement, groups: np.ndarray) -> BalanceMoves | None:
        p, ctx = self.params, self.ctx
        groups = np.asarray(groups, dtype=np.int64)
        counts = window.all_counts()
        if counts is None:               # the candidates and their counts, from the toggles
            ids, _, counts = _window_candidates(ctx, window, placement, groups, p.candidate_stride, self._windows)
            members, ptr, runs, by_id = np.asarray(ids, dtype=np.int64), np.array([0, len(ids)]), np.zeros(1, np.int64), False
        else:                            # a replayed window: the kernel reads the (N,) counts and the
            members, ptr = _strided_members(ctx.layout, p.candidate_stride)[self._windows % p.candidate_stride]
            runs, by_id = groups, True   # stages' members in place
        load = np.ascontiguousarray(window.device_load, dtype=np.float64)   # (2L, J + 1): Z_j of stage g is [g, 1 + j]
        neurons, dest = _algorithm1(load, groups, ctx.group_blocks, ctx.group_shift, ctx.layout.n_groups,
                                    members, ptr, runs, counts, by_id, placement.on_gpu,
                                    placement.home_dimm, float(p.move_fraction), int(p.max_moves_per_stage))
        return BalanceMoves(neurons, dest) if len(neurons) else None


@kernel
def _algorithm1(load, groups, group_blocks, group_shift, n_groups, members, ptr, runs, counts, by_id, on_gpu, home_dimm,
                move_fraction, max_moves):
    """Hermes Algorithm 1 on the stages ``groups`` with DIMM loads ``load[g, 1 + j]`` ((stages, J + 1)
    device loads, GPU first): in each stage
    the DIMM of load rank r (0 = busiest, ties by DIMM index) is paired with rank J-1-r, and for
    r < J/2 its candidates (the cold ids on it that fired among ``members[ptr[r]: ptr[r + 1]]``
    for r in ``runs``, in that order: activation counts ``counts[id]`` with ``by_id``, else
    ``counts[k]`` for the k-th of them), most activated first (ties: in the given order), move to
    the partner while what has moved stays within ``move_fraction`` / 2 of the pair's load gap
    (at most ``max_moves`` per DIMM if > 0). (Runs, not one array: a replayed window's
    candidates are whole stages of a cached member list, read in place instead of copied.)
    Returns (neurons, destination DIMMs), by stage, DIMM, then count."""
    G, J = len(groups), load.shape[1] - 1
    # per (stage, DIMM) cell: busy (rank < J/2), its partner, and the load it may shed
    partner = np.empty(G * J, np.int64)
    busy = np.zeros(G * J, np.bool_)
    allowance = np.empty(G * J, np.float64)
    at_rank = np.empty(J, np.int64)
    rank = np.empty(J, np.int64)
    for g in range(G):
        z = load[groups[g], 1:]
        for d in range(J):
            r = 0
            for e in range(J):
                if z[e] > z[d] or (z[e] == z[d] and e < d):
                    r += 1
            rank[d] = r
            at_rank[r] = d
        for d in range(J):
            c = g * J + d
            partner[c] = at_rank[J - 1 - rank[d]]
            busy[c] = rank[d] < J // 2
            allowance[c] = move_fraction / 2.0 * (z[d] - z[partner[c]])
    position = np.full(n_groups, -1, np.int64)
    for k in range(G):
        position[groups[k]] = k
    # candidates on busy DIMMs, ordered by (cell, count descending, given order): two stable
    # counting sorts (by count, then by cell)
    n = 0
    for r in runs:
        n += ptr[r + 1] - ptr[r]
    cell = np.empty(n, np.int64)
    cand = np.empty(n, np.int64)
    A = np.empty(n, np.int64)
    m = 0
    a_max = 0
    k = 0                                    # position among the candidates
    for r in runs:
        for j in range(ptr[r], ptr[r + 1]):  # (branch free: about half the neurons fired)
            i = members[j]
            a = np.int64(counts[i] if by_id else counts[k])
            k += 1
            c = position[group_blocks[i >> group_shift]] * J + home_dimm[i]
            take = (a > 0) & (not on_gpu[i]) & busy[c]
            cell[m], cand[m], A[m] = c, i, a
            a_max = max(a_max, a * take)
            m += take
    at = np.zeros(a_max + 2, np.int64)
    for j in range(m):
        at[a_max - A[j] + 1] += 1
    for v in range(a_max + 1):
        at[v + 1] += at[v]
    by_count = np.empty(m, np.int64)
    for j in range(m):
        v = a_max - A[j]
        by_count[at[v]] = j
        at[v] += 1
    at = np.zeros(G * J + 1, np.int64)
    for j in range(m):
        at[cell[j] + 1] += 1
    for c in range(G * J):
        at[c + 1] += at[c]
    begin = at.copy()
    order = np.empty(m, np.int64)
    for j in by_count:
        order[at[cell[j]]] = j
        at[cell[j]] += 1
    # each busy cell moves a prefix of its candidates (counts decrease, so the first one past
    # the allowance ends it)
    neurons = np.empty(m, np.int64)
    dest = np.empty(m, np.int64)
    n_out = 0
    for c in range(G * J):
        moved = 0.0
        for j in range(begin[c], begin[c + 1]):
            k = order[j]
            moved += A[k]
            if moved > allowance[c] or (max_moves > 0 and j - begin[c] >= max_moves):
                break
            neurons[n_out], dest[n_out] = cand[k], partner[c]
            n_out += 1
    return neurons[:n_out].copy(), dest[:n_out].copy()


@register_policy("balancer", "greedy.lpt")
class GreedyLPT(WindowRebalancer):
    """Longest-processing-time-first re-assignment of each window's activity.

    Per window and stage, the cold neurons that fired are sorted by activation count and each
    goes to the currently least-loaded DIMM (neurons that did not fire keep their DIMM and
    their load). Near-perfect balance for the window just seen, at the price of many moves;
    a strong classic baseline. Runs over all stages at once, J neurons per round.
    """

    @dataclass(frozen=True)
    class Params:
        tolerance: float = 0.05

        def __post_init__(self) -> None:
            if self.tolerance < 0:
                raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")

    def _rebalance(self, window, groups, ids, home, A) -> BalanceMoves | None:
        ctx, J = self.ctx, self.ctx.n_dimms
        gpos = np.searchsorted(groups, ctx.group_of[ids])
        # load of the neurons that stay (did not fire): the fired ones are re-assigned
        load = window.device_load[groups, 1:].astype(np.float64).copy()
        np.subtract.at(load, (gpos, home), A)
        order = np.lexsort((-A, gpos))
        gpos_s, A_s = gpos[order], A[order].astype(np.float64)
        first = np.searchsorted(gpos_s, np.arange(len(groups)))
        rank = np.arange(len(order)) - first[gpos_s]
        dest = np.empty(len(order), dtype=np.int64)
        # round k takes the k-th block of J neurons of every stage (largest first) and gives them
        # to the J DIMMs, least loaded first; within a stage and round each DIMM gets one neuron
        rounds = rank // J
        by_round = np.argsort(rounds, kind="stable")
        bounds = np.searchsorted(rounds[by_round], np.arange(int(rounds.max(initial=-1)) + 2))
        for k in range(len(bounds) - 1):
            sel = by_round[bounds[k]: bounds[k + 1]]
            by_load = np.argsort(load, axis=1, kind="stable")
            d = by_load[gpos_s[sel], rank[sel] - k * J]
            dest[sel] = d
            load[gpos_s[sel], d] += A_s[sel]       # (stage, DIMM) pairs are unique within a round
        new_home = np.empty(len(ids), dtype=np.int64)
        new_home[order] = dest
        moved = new_home != home
        return BalanceMoves(ids[moved], new_home[moved]) if moved.any() else None


@register_policy("balancer", "oracle.lpt")
class HindsightLPT(GreedyLPT):
    """Hindsight oracle, the upper bound of balancing: at every window end it knows the *next*
    window's true activity and re-assigns, per stage, the cold neurons that will fire by
    longest-processing-time first, so the next window is as balanced as LPT can make it, and
    its remaps are free (no DIMM-link time, bytes or energy; ``BalanceMoves.priced=False``).
    Needs the run (``window.run``) and the trace; ``tolerance`` is unused (every stage with
    future work is re-assigned).
    """

    def _update(self, window: WindowActivity, placement: Placement) -> BalanceMoves | None:
        run = getattr(window, "run", None)
        ctx = self.ctx
        if run is None or ctx.n_dimms < 2:
            return None
        counts = _future_counts(run, window.t1)
        fired = np.flatnonzero((counts > 0) & ~placement.on_gpu)
        if len(fired) == 0:
            return None
        J, n_groups = ctx.n_dimms, ctx.layout.n_groups
        home = placement.home_dimm[fired].astype(np.int64)
        group = ctx.group_of[fired].astype(np.int64)
        load = np.zeros((n_groups, J + 1))
        load[:, 1:] = np.bincount(group * J + home, weights=counts[fired], minlength=n_groups * J).reshape(n_groups, J)
        groups = np.flatnonzero(load[:, 1:].sum(axis=1) > 0)
        future = WindowActivity(window.t1, window.t1, load, None, [])
        moves = self._rebalance(future, groups, fired, home, counts[fired])
        return None if moves is None else BalanceMoves(moves.neurons, moves.dest, priced=False)


def _future_counts(run, t1: int) -> np.ndarray:
    """(N,) active-token counts of the batch over the window starting at token ``t1`` (true
    activity, from the trace)."""
    sim = run.sim
    t2 = min(t1 + sim.window_tokens, sim.prompt_len + sim.gen_len)
    if t2 <= t1:
        return np.zeros(sim.layout.n_neurons, dtype=np.int64)
    if all(p.passthrough for p in run.predictors) and run.keep_active:
        now = run.active.astype(np.int64)            # the computed set is the true set
    else:
        now = sum(sim.trace.active(s, t1 - 1).astype(np.int64) for s in run.seqs)
    counts = (t2 - t1) * now
    trace = sim.trace
    for s in run.seqs:
        for t in range(t1, t2):
            weight = t2 - t                           # tokens in [t, t2) the toggle affects
            counts[trace.on(s, t)] += weight
            counts[trace.off(s, t)] -= weight
    return counts
