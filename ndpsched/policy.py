"""Policy interfaces: partition, predictor, balancer; and what they see.

A scheduler is made of three roles. Each public method validates, a protected hook implements
(SB3's ``predict`` -> ``_predict``): a policy writes only ``_initial`` / ``_update`` /
``_predict`` and the base class checks shapes, device ids and capacities, raising errors that
name the layer or DIMM at fault.

Online decisions happen once per *window* of tokens (Hermes: 5); a policy sees the window's
activity (:class:`WindowActivity`) and returns moves, which the execution model prices
(PCIe copies for promotions, DIMM-link transfers for remaps) and hides under the projection
when they fit.
"""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from .costmodel import CostModel
from .errors import CapacityError, ConfigError
from .hardware import HardwareSpec
from .models import KIND_NAMES, ModelSpec
from .trace import NeuronLayout


@dataclass
class SchedContext:
    """Everything a policy may read when it decides (shared, read-only arrays)."""

    model: ModelSpec
    hw: HardwareSpec
    cost: CostModel
    layout: NeuronLayout
    batch: int
    window_tokens: int
    #: (N,) offline-profiled activation frequency of every neuron (Hermes: C4/Pile profile)
    offline_freqs: np.ndarray
    #: (N,) activation frequency during this batch's prompt (what the host records in prefill)
    prefill_freqs: np.ndarray
    #: bytes of GPU memory available for hot-neuron copies
    gpu_budget_bytes: float
    #: bytes of each DIMM available for weights (capacity minus its KV-cache and dense share)
    dimm_budget_bytes: float
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    #: (N, 2) the two most correlated neurons of the previous layer of every neuron (-1: none),
    #: Hermes' offline correlation table; None when the trace carries none
    layer_parents: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.group_of, self.layer_of, self.kind_of, self.neuron_bytes, self.group_blocks = _neuron_tables(
            self.layout, tuple(float(b) for b in self.model.neuron_bytes))
        #: neuron i's group is ``group_blocks[i >> group_shift]`` (compiled loops read this small
        #: table, which stays in cache, instead of the (N,) arrays: a cache miss per neuron)
        self.group_shift = _block_shift(self.layout)
        #: (2,) float64 bytes of a QKV and of an FFN neuron (``neuron_bytes`` is kind_bytes[kind_of])
        self.kind_bytes = np.asarray(self.model.neuron_bytes, dtype=np.float64)

    @property
    def n_neurons(self) -> int:
        return self.layout.n_neurons

    @property
    def n_dimms(self) -> int:
        return self.hw.n_dimms

    def describe_group(self, group: int) -> str:
        return f"layer {group // 2} {KIND_NAMES[group % 2]}"


@functools.lru_cache(maxsize=8)
def _neuron_tables(layout: NeuronLayout, neuron_bytes: tuple[float, float]):
    """Per-neuron group (2*layer + kind, int32), layer (int32), kind (int8) and bytes (float64)
    of a layout: the same for every run of a model, so computed once (read-only arrays)."""
    group_of = layout.group_of()
    kind_of = (group_of % 2).astype(np.int8)
    tables = (group_of, group_of // 2, kind_of, np.asarray(neuron_bytes, dtype=np.float64)[kind_of],
              np.ascontiguousarray(group_of[:: 1 << _block_shift(layout)]))
    for array in tables:
        array.flags.writeable = False
    return tables


def _block_shift(layout: NeuronLayout) -> int:
    """log2 of the largest power-of-two block of ids (at most 4096) that never straddles two
    groups: every group starts at a multiple of it (d_qkv and d_ffn are multiples)."""
    common = math.gcd(layout.d_qkv, layout.d_ffn)
    return min((common & -common).bit_length() - 1, 12)


@dataclass
class Placement:
    """Where every neuron lives: its home DIMM (weights always stay there) and GPU copies.

    Attributes:
        on_gpu: (N,) bool, a copy is on the GPU and the neuron is computed there (hot).
        home_dimm: (N,) int16 in 0..J-1, the DIMM holding the neuron's weights (cold compute).
    """

    on_gpu: np.ndarray
    home_dimm: np.ndarray
    #: what runs derive from a frozen placement (cell keys, per-DIMM bytes), computed once
    derived: dict = field(default_factory=dict, repr=False, compare=False)
    #: hot/cold changes a run applied to ``on_gpu``, and the last one (the PartitionMoves object):
    #: a policy that knows what its own last moves left can tell that nothing else changed since
    hot_changes: int = field(default=0, repr=False, compare=False)
    last_hot_change: Any = field(default=None, repr=False, compare=False)

    def freeze(self) -> "Placement":
        """Make the arrays read-only (a start state shared by many runs) and return self."""
        self.on_gpu.flags.writeable = False
        self.home_dimm.flags.writeable = False
        return self

    @property
    def frozen(self) -> bool:
        return not self.on_gpu.flags.writeable and not self.home_dimm.flags.writeable

    def device(self) -> np.ndarray:
        """(N,) int16: compute device, 0 = GPU, 1 + j = DIMM j."""
        return np.where(self.on_gpu, 0, self.home_dimm.astype(np.int16) + 1).astype(np.int16)

    def copy(self) -> "Placement":
        return Placement(self.on_gpu.copy(), self.home_dimm.copy())


@dataclass
class PartitionMoves:
    """Online hot/cold change: copy ``promote`` to the GPU (PCIe), drop ``evict`` (free)."""

    promote: np.ndarray
    evict: np.ndarray


@dataclass
class BalanceMoves:
    """Online remap: neuron ``neurons[k]`` moves to DIMM ``dest[k]`` over DIMM-link.

    ``priced=False`` is for bounds only (the hindsight oracle): the moves take no DIMM-link time,
    bytes or energy, so the result bounds what balancing alone can reach."""

    neurons: np.ndarray
    dest: np.ndarray
    priced: bool = True


class _WeakAttribute:
    """An instance attribute held through a weak reference: reads give the object, or None once
    it is gone (stored as ``_<name>`` in the instance's dict)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = "_" + name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        ref = obj.__dict__.get(self.key)
        return ref() if ref is not None else None

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.key] = None if value is None else weakref.ref(value)


class WindowActivity:
    """What happened in the last window of tokens, for online policies.

    Attributes:
        t0, t1: token range [t0, t1) of the window.
        device_load: (2L, J+1) float, neuron activations per (layer, kind) group and device,
            summed over the window's tokens and the batch (Hermes' Z_j per stage).
        active: (N,) uint8, in how many sequences of the batch each neuron is active at the last
            token of the window (None when no policy of the run reads it; the simulator may
            pass a function returning it, called on first read).
        toggles: per token of the window, per sequence, the sorted (on, off) ids of the computed
            set.
        memo: a :class:`~ndpsched.replay.WindowMemo` where the window belongs to a replayed
            sequence (one sequence, perfect predictor): results derived from the window's activity
            alone can be kept there for the next episodes; None otherwise.
    """

    def __init__(self, t0: int, t1: int, device_load: np.ndarray, active: np.ndarray | Callable[[], np.ndarray] | None,
                 toggles: list[list[tuple[np.ndarray, np.ndarray]]], scratch: np.ndarray | None = None,
                 window_counts: Callable[[], np.ndarray] | None = None, memo: Any = None) -> None:
        self.t0, self.t1 = t0, t1
        self.memo = memo
        self.device_load = device_load
        self._active = active
        self.toggles = toggles
        # ((N,) int32 zeros, (N,) bool False) work arrays, restored after use; allocated if None
        self._scratch = scratch
        # returns the (N,) counts of the whole window where the simulator has them (a replayed
        # sequence, see ndpsched.replay): neuron_counts is then one gather
        self._window_counts = window_counts

    # the run (a DecodeRun) and this window's WindowOutcome, set by the simulator for policies
    # that observe the whole run (None if not set or gone); held weakly: the run holds its last
    # outcome, which holds this activity, and a reference cycle would keep every window's (and
    # every finished run's) arrays alive until the garbage collector ran
    run = _WeakAttribute()
    outcome = _WeakAttribute()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_run", "_outcome"):          # (a weak reference does not pickle; its object does)
            if key in state:
                state[key] = getattr(self, key[1:])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        strong = {key: state.pop(key, None) for key in ("_run", "_outcome")}
        self.__dict__.update(state)
        self.run, self.outcome = strong["_run"], strong["_outcome"]

    @property
    def active(self) -> np.ndarray | None:
        if callable(self._active):
            self._active = self._active()
        return self._active

    def all_counts(self) -> np.ndarray | None:
        """(N,) active-token counts of every neuron in the window where the run keeps them (a
        replayed sequence), else None (then :meth:`neuron_counts` computes them for given ids)."""
        return self._window_counts() if self._window_counts is not None else None

    def neuron_counts(self, idx: np.ndarray) -> np.ndarray:
        """Active-token counts in the window (summed over the batch) of neurons ``idx``.

        Walks back from the state at the window's last token: with c(t) the batch count of a
        neuron at token t, ``sum_t c(t) = W c(t1-1) - sum_{tau in (t0, t1)} (tau - t0)(on - off)``.
        The correction is scattered into a zeroed (N,) array and gathered at ``idx``: cost
        O(toggles + len(idx)), independent of the model's size.
        """
        if self._active is None:
            raise ConfigError("neuron_counts() needs a policy with uses_neuron_activity = True")
        idx = np.asarray(idx, dtype=np.intp)
        if self._window_counts is not None:
            return self._window_counts().take(idx).astype(np.int64)
        counts = (self.t1 - self.t0) * self.active[idx].astype(np.int64)
        if len(self.toggles) < 2:
            return counts
        if self._scratch is None:
            self._scratch = (np.zeros(len(self.active), dtype=np.int32), np.zeros(len(self.active), dtype=bool))
        acc, member = self._scratch
        member[idx] = True
        touched = []
        # only toggles of neurons in idx are scattered (a cheap gather from the bool mask finds
        # them); ids are unique within one sequence's toggles of one token, so scatters are exact
        for k, per_seq in enumerate(self.toggles[1:], start=1):  # k = tau - t0
            for on, off in per_seq:
                on, off = on[np.take(member, on)], off[np.take(member, off)]
                acc[on] -= k
                acc[off] += k
                touched += (on, off)
        counts += acc[idx]
        for ids in touched:
            acc[ids] = 0
        member[idx] = False
        return counts


class Policy:
    """Base of all policies. Subclasses may define a ``Params`` dataclass of their constants."""

    Params: ClassVar[type | None] = None
    registered_name: ClassVar[str] = ""
    #: set True when the policy calls ``WindowActivity.neuron_counts`` or reads ``active``
    uses_neuron_activity: ClassVar[bool] = False
    #: set True to receive every token's batch-union toggles through :meth:`observe`
    observes_tokens: ClassVar[bool] = False
    #: parameter naming an artifact the policy loads (a trained model); such a policy is created
    #: as ``"name:ARTIFACT"`` and cannot run from its defaults alone
    artifact_param: ClassVar[str | None] = None

    def __init__(self, params: Any = None) -> None:
        if params is None and self.Params is not None:
            params = self.Params()
        self.params = params
        self.ctx: SchedContext | None = None

    def reset(self, ctx: SchedContext) -> None:
        """Called once per run before any decision."""
        self.ctx = ctx

    def start(self, active: np.ndarray, token: int) -> None:
        """Called once before the first decode step with the batch's (N,) active counts at
        ``token`` (the last prompt token). Default: nothing."""

    def observe(self, token: int, on: np.ndarray, off: np.ndarray) -> None:
        """For policies with ``observes_tokens``: neurons that start (``on``) or stop (``off``)
        firing in at least one sequence of the batch at ``token`` (sorted ids). Default: nothing."""

    def observe_window(self, token: int, ons: list[np.ndarray], offs: list[np.ndarray]) -> None:
        """Tokens ``token``, ``token + 1``, ... at once (``ons[k]`` / ``offs[k]``: token + k's, as in
        :meth:`observe`); the simulator calls it where it has a whole window's toggles. Default:
        :meth:`observe` per token."""
        for k, (on, off) in enumerate(zip(ons, offs)):
            self.observe(token + k, on, off)

    def describe(self) -> dict[str, Any]:
        from dataclasses import asdict, is_dataclass
        params = asdict(self.params) if is_dataclass(self.params) else {}
        out = {"name": self.registered_name, "params": params}
        if getattr(self, "info", None):
            out["info"] = dict(self.info)     # e.g. an ILP's solve time and optimality gap
        return out


class PartitionPolicy(Policy):
    """Decides which neurons are hot (computed on the GPU from a GPU copy)."""

    def initial_partition(self, ctx: SchedContext) -> np.ndarray:
        """(N,) bool hot set after prefill; checked against the GPU budget."""
        self.reset(ctx)
        on_gpu = np.asarray(self._initial(ctx))
        if on_gpu.shape != (ctx.n_neurons,) or on_gpu.dtype != bool:
            raise ConfigError(f"partition '{self.registered_name}' returned {on_gpu.dtype} array of shape "
                              f"{on_gpu.shape}, expected bool of shape ({ctx.n_neurons},)")
        check_gpu_capacity(ctx, on_gpu, f"partition '{self.registered_name}'")
        return on_gpu

    def update(self, window: WindowActivity, placement: Placement) -> PartitionMoves | None:
        """Online adjustment at a window end; the result is validated by the simulator."""
        return self._update(window, placement)

    def _initial(self, ctx: SchedContext) -> np.ndarray:
        raise NotImplementedError  # abstract: every partition policy decides its hot set

    def _update(self, window: WindowActivity, placement: Placement) -> PartitionMoves | None:
        return None


class BalancerPolicy(Policy):
    """Decides which DIMM holds each neuron's weights (and computes it while it is cold)."""

    def initial_mapping(self, ctx: SchedContext, on_gpu: np.ndarray) -> np.ndarray:
        """(N,) int16 home DIMM of every neuron; checked against each DIMM's budget."""
        self.reset(ctx)
        home = np.asarray(self._initial(ctx, on_gpu))
        if home.shape != (ctx.n_neurons,) or not np.issubdtype(home.dtype, np.integer):
            raise ConfigError(f"balancer '{self.registered_name}' returned {home.dtype} array of shape "
                              f"{home.shape}, expected integers of shape ({ctx.n_neurons},)")
        if home.size and (home.min() < 0 or home.max() >= ctx.n_dimms):
            raise ConfigError(f"balancer '{self.registered_name}' placed a neuron on DIMM "
                              f"{int(home.max() if home.max() >= ctx.n_dimms else home.min())}; valid DIMMs are "
                              f"0..{ctx.n_dimms - 1}")
        home = home.astype(np.int16)
        check_dimm_capacity(ctx, home, f"balancer '{self.registered_name}'")
        return home

    def update(self, window: WindowActivity, placement: Placement) -> BalanceMoves | None:
        return self._update(window, placement)

    def _initial(self, ctx: SchedContext, on_gpu: np.ndarray) -> np.ndarray:
        raise NotImplementedError  # abstract

    def _update(self, window: WindowActivity, placement: Placement) -> BalanceMoves | None:
        return None


class PredictorPolicy(Policy):
    """Predicts which neurons fire; the execution model computes the predicted set.

    Per token the simulator passes the true on/off toggles (the host learns each layer's true
    activity as it is computed) and receives the toggles of the *computed* set.
    """

    #: True when the computed set is always the true set (the oracle): the simulator may then
    #: read a whole window's toggles from the trace at once
    passthrough: ClassVar[bool] = False

    def begin(self, ctx: SchedContext, active: np.ndarray, token: int) -> None:
        """Called once per sequence before the first decode step, with that sequence's (N,)
        activity at ``token`` (the last prompt token)."""
        self.reset(ctx)
        active = np.asarray(active)
        self._begin_active = active if active.dtype == bool else active > 0

    def initial_computed(self) -> np.ndarray:
        """(N,) bool computed set at the last prompt token (default: what was active)."""
        return self._begin_active

    def summary(self) -> dict[str, float]:
        """Predictor statistics (recall, precision, table sizes); empty for the oracle."""
        return {}

    def predict(self, token: int, on: np.ndarray, off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (on, off) toggles of the computed set for ``token`` (sorted ids)."""
        return self._predict(token, on, off)

    def _predict(self, token: int, on: np.ndarray, off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError  # abstract


# ---- capacity checks ------------------------------------------------------------------------
def check_gpu_capacity(ctx: SchedContext, on_gpu: np.ndarray, who: str) -> None:
    used = float(ctx.neuron_bytes[on_gpu].sum())
    if used > ctx.gpu_budget_bytes * (1 + 1e-9):
        per_layer = np.bincount(ctx.layer_of[on_gpu], weights=ctx.neuron_bytes[on_gpu], minlength=ctx.model.n_layers)
        worst = int(np.argmax(per_layer))
        raise CapacityError(f"{who} puts {used / 1e9:.2f} GB of hot neurons on the GPU, over its budget of "
                            f"{ctx.gpu_budget_bytes / 1e9:.2f} GB (largest share: layer {worst}, "
                            f"{per_layer[worst] / 1e9:.2f} GB)")


def check_dimm_capacity(ctx: SchedContext, home: np.ndarray, who: str) -> None:
    per_dimm = np.bincount(home, weights=ctx.neuron_bytes, minlength=ctx.n_dimms)
    worst = int(np.argmax(per_dimm))
    if per_dimm[worst] > ctx.dimm_budget_bytes * (1 + 1e-9):
        raise CapacityError(f"{who} puts {per_dimm[worst] / 1e9:.2f} GB of weights on DIMM {worst}, over its "
                            f"budget of {ctx.dimm_budget_bytes / 1e9:.2f} GB")
