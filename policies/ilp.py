"""Offline partition ILPs (Hermes Eqs. 1-7 and PowerInfer's solver) on frequency buckets.

Neurons of each sparse stage (layer, kind) are sorted by offline frequency and grouped into
buckets of similar frequency (PowerInfer groups 64-256 neurons); an integer variable per bucket
counts how many of its neurons (its most frequent ones) go on the GPU. The expected per-token
cost of a bucket comes from the execution model's own constants, so the ILP optimises the same
model the simulator prices. Solved with HiGHS (``scipy.optimize.milp``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from ndpsched.errors import NdpschedError
from ndpsched.policy import SchedContext


@dataclass
class Buckets:
    """Frequency buckets of every stage.

    Attributes:
        order: (N,) neuron ids sorted by (stage, decreasing frequency).
        stage: (B,) stage (= group 2*layer+kind) of each bucket.
        start, size: (B,) slice of ``order`` holding each bucket.
        gpu_cost, dimm_cost: (B,) expected seconds per token if the whole bucket runs there
            (DIMM cost of one DIMM doing all of it; divide by J when spread).
        freq_mass: (B,) expected activations per token of the whole bucket.
        neuron_bytes: (B,) bytes of one neuron of the bucket.
    """

    order: np.ndarray
    stage: np.ndarray
    start: np.ndarray
    size: np.ndarray
    gpu_cost: np.ndarray
    dimm_cost: np.ndarray
    freq_mass: np.ndarray
    neuron_bytes: np.ndarray


def frequency_buckets(ctx: SchedContext, buckets_per_stage: int) -> Buckets:
    """Split every stage's neurons, sorted by offline frequency, into equal-count buckets."""
    cm, f, B = ctx.cost, ctx.offline_freqs.astype(np.float64), ctx.batch
    order = np.lexsort((-f, ctx.group_of))
    n_stage = ctx.layout.n_groups
    sizes = np.bincount(ctx.group_of, minlength=n_stage)
    stage_start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    per = np.minimum(buckets_per_stage, sizes)
    b_stage = np.repeat(np.arange(n_stage), per)
    k = np.arange(len(b_stage)) - np.repeat(np.cumsum(per) - per, per)
    edges_lo = (k * sizes[b_stage]) // per[b_stage]
    edges_hi = ((k + 1) * sizes[b_stage]) // per[b_stage]
    start = stage_start[b_stage] + edges_lo
    size = edges_hi - edges_lo
    fs = f[order]
    csum = np.concatenate([[0.0], np.cumsum(fs)])
    mass = csum[start + size] - csum[start]                           # sum f: expected activations
    union = np.concatenate([[0.0], np.cumsum(1 - (1 - fs) ** B)])
    union_mass = union[start + size] - union[start]                   # expected union count
    kind = b_stage % 2
    nb = cm.neuron_bytes[kind]
    macs = cm.neuron_macs[kind]
    gpu_cost = np.maximum(union_mass * nb / cm.gpu_sparse_bw, B * mass * 2 * macs / cm.gpu_flops)
    dimm_cost = np.maximum(union_mass * nb / cm.dimm_bw, B * mass * macs / cm.ndp_macs)
    return Buckets(order, b_stage, start, size, gpu_cost, dimm_cost, B * mass, nb)


def gpu_stage_overhead_s(ctx: SchedContext) -> np.ndarray:
    """(2,) fixed GPU cost of a stage that has GPU neurons: kernels + 2 T_sync (QKV, FFN)."""
    cm = ctx.cost
    return cm.gpu_kernels * cm.kernel_s + 2 * cm.sync_s


@dataclass
class IlpResult:
    """Hot set chosen by an ILP, with how the solve went."""

    on_gpu: np.ndarray
    objective_s: float
    solve_s: float
    mip_gap: float
    n_variables: int
    status: str


def _select(buckets: Buckets, y: np.ndarray, n: int) -> np.ndarray:
    """Put the ``y[b]`` most frequent neurons of every bucket on the GPU."""
    y = np.clip(np.round(y).astype(np.int64), 0, buckets.size)
    rank = np.arange(n) - np.repeat(buckets.start, buckets.size)
    take = rank < np.repeat(y, buckets.size)
    on_gpu = np.zeros(n, dtype=bool)
    on_gpu[buckets.order[np.repeat(buckets.start, buckets.size) + rank][take]] = True
    return on_gpu


class _Rows:
    """Accumulates sparse constraint rows ``lo <= A x <= hi`` for scipy's milp."""

    def __init__(self, n_var: int) -> None:
        self.n_var = n_var
        self.r, self.c, self.v, self.lo, self.hi = [], [], [], [], []

    def add(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int, lo, hi) -> None:
        """Add ``n_rows`` rows; ``rows`` are 0-based within this block."""
        base = len(self.lo)
        self.r.append(np.asarray(rows) + base)
        self.c.append(np.asarray(cols))
        self.v.append(np.asarray(vals, dtype=float))
        self.lo.extend(np.broadcast_to(lo, (n_rows,)).tolist())
        self.hi.extend(np.broadcast_to(hi, (n_rows,)).tolist())

    def constraint(self) -> LinearConstraint:
        A = coo_matrix((np.concatenate(self.v), (np.concatenate(self.r), np.concatenate(self.c))),
                       shape=(len(self.lo), self.n_var)).tocsr()
        return LinearConstraint(A, np.array(self.lo), np.array(self.hi))


def hermes_ilp(bk: Buckets, n_stages: int, n_dimms: int, stage_overhead_s: np.ndarray, ndp_issue_s: float,
               gpu_budget_bytes: float, dimm_budget_bytes: float, per_dimm: bool = False,
               mip_rel_gap: float = 0.005, time_limit_s: float = 60.0):
    """Solve Hermes' ILP on buckets; returns (y per bucket, x per bucket and DIMM or None, result).

    Minimise sum_s tau_s with, per stage s,
      tau_s >= overhead_s z_s + sum_b gpu_cost_b y_b / n_b                 (GPU side, Eq. 3)
      tau_s >= issue + sum_b dimm_cost_b x_bj / n_b  for every DIMM j       (per_dimm, Eq. 2)
      tau_s >= issue + sum_b dimm_cost_b (n_b - y_b) / n_b / J              (aggregated)
      y_b <= n_b z_s;  sum_b bytes_b y_b <= GPU budget;  per_dimm: sum_j x_bj = n_b - y_b,
      sum_b bytes_b x_bj <= DIMM budget.
    The aggregated form assumes the balancer spreads each stage's cold load evenly (identical
    DIMMs); it has no symmetric DIMM variables, which keeps large models fast to solve.
    """
    nB, S, J = len(bk.size), n_stages, n_dimms
    # work in microseconds: coefficients of ~1e-8 s per neuron sit below HiGHS' tolerances
    us = 1e6
    bk = Buckets(bk.order, bk.stage, bk.start, bk.size, bk.gpu_cost * us, bk.dimm_cost * us, bk.freq_mass,
                 bk.neuron_bytes)
    stage_overhead_s, ndp_issue_s = np.asarray(stage_overhead_s) * us, ndp_issue_s * us
    nx = nB * J if per_dimm else 0
    iy, iz, it, ix = 0, nB, nB + S, nB + 2 * S
    nvar = ix + nx
    ar, sr = np.arange(nB), np.arange(S)
    n = bk.size.astype(float)
    rows = _Rows(nvar)
    # GPU side: sum gpu_cost/n y + over z - tau <= 0
    rows.add(np.concatenate([bk.stage, sr, sr]), np.concatenate([iy + ar, iz + sr, it + sr]),
             np.concatenate([bk.gpu_cost / n, stage_overhead_s, -np.ones(S)]), S, -np.inf, 0.0)
    if per_dimm:
        # DIMM j of stage s: sum dimm_cost/n x_bj - tau <= -issue
        bj = np.repeat(ar, J) * J + np.tile(np.arange(J), nB)         # flat (b, j)
        srow = np.repeat(bk.stage, J) * J + np.tile(np.arange(J), nB)
        rows.add(np.concatenate([srow, np.repeat(sr, J) * J + np.tile(np.arange(J), S)]),
                 np.concatenate([ix + bj, it + np.repeat(sr, J)]),
                 np.concatenate([np.repeat(bk.dimm_cost / n, J), -np.ones(S * J)]), S * J, -np.inf, -ndp_issue_s)
        # conservation: y_b + sum_j x_bj = n_b
        rows.add(np.concatenate([ar, np.repeat(ar, J)]), np.concatenate([iy + ar, ix + bj]),
                 np.ones(nB + nx), nB, n, n)
        # DIMM capacity
        rows.add(np.tile(np.arange(J), nB), ix + bj, np.repeat(bk.neuron_bytes.astype(float), J), J,
                 -np.inf, dimm_budget_bytes)
    else:
        const = np.bincount(bk.stage, weights=bk.dimm_cost, minlength=S) / J + ndp_issue_s
        rows.add(np.concatenate([bk.stage, sr]), np.concatenate([iy + ar, it + sr]),
                 np.concatenate([-bk.dimm_cost / n / J, -np.ones(S)]), S, -np.inf, -const)
    # linking y_b <= n_b z_s, and the GPU budget
    rows.add(np.concatenate([ar, ar]), np.concatenate([iy + ar, iz + bk.stage]),
             np.concatenate([np.ones(nB), -n]), nB, -np.inf, 0.0)
    rows.add(np.zeros(nB, dtype=int), iy + ar, bk.neuron_bytes.astype(float), 1, -np.inf, gpu_budget_bytes)
    c = np.zeros(nvar)
    c[it:it + S] = 1.0
    # tie-break: among equally fast solutions prefer fewer GPU bytes, i.e. the most frequent
    # neurons (1e-9 us per byte: ~0.005 % of the objective for a full 24 GB GPU)
    c[iy:iz] = 1e-9 * bk.neuron_bytes
    integrality = np.ones(nvar)
    integrality[it:it + S] = 0
    upper = np.concatenate([n, np.ones(S), np.full(S, np.inf), np.repeat(n, J) if per_dimm else []])
    res = milp(c, integrality=integrality, bounds=Bounds(np.zeros(nvar), upper), constraints=rows.constraint(),
               options={"mip_rel_gap": mip_rel_gap, "time_limit": time_limit_s, "presolve": True})
    if res.x is None:
        raise NdpschedError(f"hermes.ilp: the solver found no solution ({res.message})")
    x = np.round(res.x[ix:]).reshape(nB, J) if per_dimm else None
    res.fun = res.fun / us
    return np.round(res.x[iy:iz]), x, res


def solve_hermes_ilp(ctx: SchedContext, buckets_per_stage: int = 32, per_dimm: bool = False,
                     mip_rel_gap: float = 0.005, time_limit_s: float = 60.0) -> IlpResult:
    """Hermes' offline ILP for a run: buckets from the offline profile, costs from the model."""
    t0 = time.perf_counter()
    bk = frequency_buckets(ctx, buckets_per_stage)
    over = gpu_stage_overhead_s(ctx)[np.arange(ctx.layout.n_groups) % 2]
    y, _, res = hermes_ilp(bk, ctx.layout.n_groups, ctx.n_dimms, over, ctx.cost.ndp_issue_s,
                           ctx.gpu_budget_bytes, ctx.dimm_budget_bytes, per_dimm, mip_rel_gap, time_limit_s)
    return IlpResult(_select(bk, y, ctx.n_neurons), float(res.fun), time.perf_counter() - t0,
                     float(getattr(res, "mip_gap", 0.0) or 0.0), len(res.x), str(res.message))


def solve_powerinfer_ilp(ctx: SchedContext, buckets_per_stage: int = 32, mip_rel_gap: float = 0.005,
                         time_limit_s: float = 60.0) -> IlpResult:
    """PowerInfer's solver: maximise activations on the GPU under the VRAM budget, where a stage
    gets either no GPU neurons or enough that their saving pays for its sync overhead.

    maximise sum_b mass_b y_b / n_b  s.t.  sum bytes y <= budget, y_b <= n_b z_s,
    sum_b (dimm_cost_b / J) y_b / n_b >= overhead_s z_s.
    """
    t0 = time.perf_counter()
    bk = frequency_buckets(ctx, buckets_per_stage)
    nB, nS, J = len(bk.size), ctx.layout.n_groups, ctx.n_dimms
    over = gpu_stage_overhead_s(ctx)[np.arange(nS) % 2]
    nvar = nB + nS
    c = np.concatenate([-bk.freq_mass / bk.size, np.zeros(nS)])
    ar = np.arange(nB)
    us = 1e6  # microseconds keep the coefficients above HiGHS' tolerances
    over = over * us
    # PowerInfer's view: the GPU is far faster than the cold side, so a GPU neuron saves its
    # cold-side time; a stage must save at least its sync overhead
    saving = bk.dimm_cost / J / bk.size * us
    A = coo_matrix((
        np.concatenate([np.ones(nB), -bk.size.astype(float),            # link
                        -saving, over,                                    # pays for its sync
                        bk.neuron_bytes.astype(float)]),                  # budget
        (np.concatenate([ar, ar, bk.stage + nB, np.arange(nS) + nB, np.full(nB, nB + nS)]),
         np.concatenate([ar, nB + bk.stage, ar, nB + np.arange(nS), ar]))),
        shape=(nB + nS + 1, nvar)).tocsr()
    ub = np.concatenate([np.zeros(nB), np.zeros(nS), [ctx.gpu_budget_bytes]])
    res = milp(c, integrality=np.ones(nvar), bounds=Bounds(0, np.concatenate([bk.size.astype(float), np.ones(nS)])),
               constraints=LinearConstraint(A, -np.inf, ub),
               options={"mip_rel_gap": mip_rel_gap, "time_limit": time_limit_s})
    if res.x is None:
        raise NdpschedError(f"powerinfer.topk: the solver found no solution ({res.message})")
    on_gpu = _select(bk, res.x[:nB], ctx.n_neurons)
    return IlpResult(on_gpu, float(-res.fun), time.perf_counter() - t0, float(getattr(res, "mip_gap", 0.0) or 0.0),
                     nvar, str(res.message))
