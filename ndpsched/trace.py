"""Activation traces: which neurons of each layer are active at each token.

A trace holds ``n_seqs`` sequences of ``n_tokens`` tokens over the model's global neuron index
(see :class:`NeuronLayout`). It is stored XOR-delta encoded, which is both compact and what the
simulator consumes: the active set of token 0 as packed bits, then for every later token the
neurons that turn **on** and the neurons that turn **off**. Adjacent tokens share most active
neurons (>90 % in Hermes' measurements), so the deltas are a small fraction of the active sets.

File format (``.npz``, version 1), all arrays:

==================  ======================  ==================================================
key                 dtype / shape           meaning
==================  ======================  ==================================================
format              str                     ``"ndpsched-trace"``
version             int                     1
n_layers            int                     layers L
d_qkv, d_ffn        int                     QKV and FFN neurons per layer
n_seqs, n_tokens    int                     S sequences of T tokens
initial_packed      uint8 (S, ceil(N/8))    ``np.packbits`` of the active set at token 0
on_ptr, off_ptr     int64 (S*T + 1,)        CSR offsets; slot ``s*T + t`` holds token t of seq s
on_idx, off_idx     int32 (E,)              global neuron ids turning on / off at that token
meta                str (JSON)              model name, source, generator parameters, ...
offline_freqs       float32 (N,), optional  offline activation profile of every neuron
layer_parents       int32 (N, 2), optional  two most correlated previous-layer neurons (-1: none)
==================  ======================  ==================================================

Neuron ids are sorted within each token's on and off lists (the simulator's gathers are then
close to sequential; :meth:`ActivationTrace.from_dense` and the generators produce them so).

Global neuron id of neuron i of kind k (0 = QKV, 1 = FFN) in layer l:
``l * (d_qkv + d_ffn) + (0 if k == 0 else d_qkv) + i``.
"""
from __future__ import annotations

import functools
import json
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TraceError
from .models import ModelSpec

FORMAT_NAME = "ndpsched-trace"
FORMAT_VERSION = 1


@functools.lru_cache(maxsize=16)
def _group_starts(layout: "NeuronLayout") -> np.ndarray:
    layer, kind = np.divmod(np.arange(layout.n_groups + 1), 2)
    starts = layer * layout.per_layer + kind * layout.d_qkv
    starts.flags.writeable = False
    return starts


@dataclass(frozen=True)
class NeuronLayout:
    """Where each layer's QKV and FFN neurons sit in the global neuron index."""

    n_layers: int
    d_qkv: int
    d_ffn: int

    @classmethod
    def of(cls, model: ModelSpec) -> "NeuronLayout":
        return cls(model.n_layers, model.d_model, model.d_ffn)

    @property
    def per_layer(self) -> int:
        return self.d_qkv + self.d_ffn

    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.per_layer

    @property
    def n_groups(self) -> int:
        """Number of (layer, kind) groups: 2 per layer."""
        return 2 * self.n_layers

    def group_of(self) -> np.ndarray:
        """(N,) int32: group id ``2*layer + kind`` of every neuron."""
        one_layer = np.repeat(np.array([0, 1], dtype=np.int32), [self.d_qkv, self.d_ffn])
        return (np.arange(self.n_layers, dtype=np.int32)[:, None] * 2 + one_layer[None, :]).ravel()

    def group_starts(self) -> np.ndarray:
        """(G + 1,) int64: first neuron id of every group, then N (a group's neurons are
        consecutive ids, groups in order). Read-only, computed once per layout (the online
        policies ask for it at every decision)."""
        return _group_starts(self)

    def layer_of(self) -> np.ndarray:
        """(N,) int32: layer of every neuron."""
        return np.repeat(np.arange(self.n_layers, dtype=np.int32), self.per_layer)

    def kind_slice(self, layer: int, kind: int) -> slice:
        start = layer * self.per_layer + (0 if kind == 0 else self.d_qkv)
        return slice(start, start + (self.d_qkv if kind == 0 else self.d_ffn))

    def reshape(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Split an (..., N) array into (..., L, d_qkv) and (..., L, d_ffn) views."""
        v = values.reshape(values.shape[:-1] + (self.n_layers, self.per_layer))
        return v[..., : self.d_qkv], v[..., self.d_qkv:]


class ActivationTrace:
    """Active neurons per token for ``n_seqs`` sequences, XOR-delta encoded (see module doc)."""

    def __init__(
        self,
        layout: NeuronLayout,
        n_seqs: int,
        n_tokens: int,
        initial_packed: np.ndarray,
        on_ptr: np.ndarray,
        on_idx: np.ndarray,
        off_ptr: np.ndarray,
        off_idx: np.ndarray,
        meta: dict[str, Any] | None = None,
        offline_freqs: np.ndarray | None = None,
    ) -> None:
        self.layout = layout
        self.n_seqs = int(n_seqs)
        self.n_tokens = int(n_tokens)
        self.initial_packed = np.ascontiguousarray(initial_packed, dtype=np.uint8)
        self.on_ptr = np.ascontiguousarray(on_ptr, dtype=np.int64)
        self.on_idx = np.ascontiguousarray(on_idx, dtype=np.int32)
        self.off_ptr = np.ascontiguousarray(off_ptr, dtype=np.int64)
        self.off_idx = np.ascontiguousarray(off_idx, dtype=np.int32)
        self.meta = dict(meta or {})
        #: optional (N,) offline activation profile (e.g. the generator's true frequencies, or a
        #: profiling run), used by offline partitioners instead of the prompts' activity
        self.offline_freqs = None if offline_freqs is None else np.asarray(offline_freqs, dtype=np.float32)
        #: optional (N, 2) int64: each neuron's two most correlated previous-layer neurons (-1:
        #: none), Hermes' offline correlation table; set by the generator or an offline profile
        self.layer_parents: np.ndarray | None = None
        # results derived from the trace alone (see prompt_state), kept with it
        self._derived: OrderedDict[tuple, tuple] = OrderedDict()
        self._check_structure()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_derived"] = OrderedDict()          # recomputed where needed: keeps pickles small
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_derived", OrderedDict())
        self.__dict__.update(state)

    def _derive(self, key: tuple, compute) -> tuple:
        """``compute()`` (a tuple of arrays, made read-only), kept for the next call with ``key``
        (the last 16 are kept: a pool of sequences, not every sequence of a large trace)."""
        from .content_cache import lru_lookup

        def read_only() -> tuple:
            value = compute()
            for a in value:
                if isinstance(a, np.ndarray):
                    a.flags.writeable = False
            return value

        return lru_lookup(self._derived, key, read_only, 16)

    def prompt_state(self, seq: int, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
        """((N,) int32 active-token counts over tokens [0, prompt_len), (N,) bool active set at
        token prompt_len - 1) of sequence ``seq``: what a simulation starting decode there needs.
        Cached on the trace (read-only), so every run on it (sweep trials, env episodes) shares it."""
        return self._derive(("prompt", seq, prompt_len), lambda: (
            self.active_token_counts(seq, 0, prompt_len).astype(np.int32), self.active(seq, prompt_len - 1)))

    def prompt_frequencies(self, prompt_len: int) -> np.ndarray:
        """(N,) :meth:`frequencies` over tokens [0, prompt_len) of every sequence (cached)."""
        return self._derive(("prompt frequencies", prompt_len), lambda: (self.frequencies(0, prompt_len),))[0]

    # ---- structure ------------------------------------------------------------------------
    @property
    def n_neurons(self) -> int:
        return self.layout.n_neurons

    def _check_structure(self) -> None:
        """Cheap O(S*T) checks that every array has the shape the format promises."""
        n_bytes = (self.n_neurons + 7) // 8
        if self.n_seqs <= 0 or self.n_tokens <= 0:
            raise TraceError(f"trace must have n_seqs > 0 and n_tokens > 0, got {self.n_seqs}, {self.n_tokens}")
        if self.initial_packed.shape != (self.n_seqs, n_bytes):
            raise TraceError(f"trace initial_packed has shape {self.initial_packed.shape}, "
                             f"expected {(self.n_seqs, n_bytes)}")
        slots = self.n_seqs * self.n_tokens + 1
        for name, ptr, idx in (("on", self.on_ptr, self.on_idx), ("off", self.off_ptr, self.off_idx)):
            if ptr.shape != (slots,) or ptr[0] != 0 or ptr[-1] != len(idx) or np.any(np.diff(ptr) < 0):
                raise TraceError(f"trace {name}_ptr is corrupt: expected {slots} non-decreasing offsets "
                                 f"from 0 to {len(idx)}")
            if len(idx) and (idx.min() < 0 or idx.max() >= self.n_neurons):
                raise TraceError(f"trace {name}_idx has neuron ids outside 0..{self.n_neurons - 1}")
        if self.offline_freqs is not None and (self.offline_freqs.shape != (self.n_neurons,)
                                               or not np.all((self.offline_freqs >= 0) & (self.offline_freqs <= 1))):
            raise TraceError(f"trace offline_freqs must be ({self.n_neurons},) values in [0, 1]")

    def validate(self) -> None:
        """Full O(events) consistency check: every 'on' neuron was off before, and vice versa."""
        for s in range(self.n_seqs):
            state = self.initial_active(s)
            for t in range(1, self.n_tokens):
                on, off = self.on(s, t), self.off(s, t)
                if state[on].any() or not state[off].all():
                    raise TraceError(f"trace is inconsistent at sequence {s}, token {t}: a neuron turns "
                                     "on while already active or off while inactive")
                state[on] = True
                state[off] = False

    def check_model(self, model: ModelSpec) -> None:
        """Raise :class:`TraceError` unless the trace's layer count and widths match ``model``."""
        want = NeuronLayout.of(model)
        if self.layout != want:
            raise TraceError(
                f"trace does not match model '{model.name}': trace has {self.layout.n_layers} layers x "
                f"(qkv {self.layout.d_qkv}, ffn {self.layout.d_ffn}) neurons, model needs "
                f"{want.n_layers} x (qkv {want.d_qkv}, ffn {want.d_ffn}); traces are not resampled to another "
                f"shape: transfer a recording with `ndpsched trace fit FILE --generate OUT.npz --model {model.name}`")

    # ---- access ---------------------------------------------------------------------------
    def initial_active(self, seq: int = 0) -> np.ndarray:
        """(N,) bool: active set of token 0 of sequence ``seq`` (a fresh array)."""
        return np.unpackbits(self.initial_packed[seq], count=self.n_neurons).astype(bool)

    def _slot(self, seq: int, token: int) -> int:
        return seq * self.n_tokens + token

    def on(self, seq: int, token: int) -> np.ndarray:
        """int32 ids of neurons that turn on at ``token`` (empty for token 0)."""
        k = self._slot(seq, token)
        return self.on_idx[self.on_ptr[k]: self.on_ptr[k + 1]]

    def off(self, seq: int, token: int) -> np.ndarray:
        """int32 ids of neurons that turn off at ``token`` (empty for token 0)."""
        k = self._slot(seq, token)
        return self.off_idx[self.off_ptr[k]: self.off_ptr[k + 1]]

    def active(self, seq: int, token: int) -> np.ndarray:
        """(N,) bool: active set of ``token`` in sequence ``seq``; O(N + events up to token)."""
        state = self.initial_active(seq)
        lo, hi = self._slot(seq, 1), self._slot(seq, token) + 1
        on_count = np.bincount(self.on_idx[self.on_ptr[lo]: self.on_ptr[hi]], minlength=self.n_neurons)
        off_count = np.bincount(self.off_idx[self.off_ptr[lo]: self.off_ptr[hi]], minlength=self.n_neurons)
        # toggles alternate, so the final state is the initial state plus (#on - #off)
        return (state.astype(np.int64) + on_count - off_count).astype(bool)

    def dense(self, seq: int = 0) -> np.ndarray:
        """(T, N) bool: every token's active set (for small traces and tests)."""
        out = np.empty((self.n_tokens, self.n_neurons), dtype=bool)
        state = self.initial_active(seq)
        for t in range(self.n_tokens):
            if t:
                state[self.on(seq, t)] = True
                state[self.off(seq, t)] = False
            out[t] = state
        return out

    def active_token_counts(self, seq: int | None = None, t0: int = 0, t1: int | None = None) -> np.ndarray:
        """(N,) int64: tokens in [t0, t1) at which each neuron is active, summed over sequences.

        O(N + events): a neuron active from token a (inclusive) to b (exclusive) contributes
        b - a, so we add (t1 - t) for every 'on' at t and subtract it for every 'off'.
        """
        t1 = self.n_tokens if t1 is None else t1
        if not 0 <= t0 < t1 <= self.n_tokens:
            raise TraceError(f"token range [{t0}, {t1}) is outside the trace's 0..{self.n_tokens}")
        seqs = range(self.n_seqs) if seq is None else [seq]
        total = np.zeros(self.n_neurons, dtype=np.int64)
        for s in seqs:
            start = self.active(s, t0) if t0 else self.initial_active(s)
            total += start.astype(np.int64) * (t1 - t0)
            lo, hi = self._slot(s, t0 + 1), self._slot(s, t1 - 1) + 1
            for ptr, idx, sign in ((self.on_ptr, self.on_idx, 1), (self.off_ptr, self.off_idx, -1)):
                a, b = ptr[lo], ptr[hi]
                # token of each event, from the CSR slot it sits in
                tokens = np.repeat(np.arange(t0 + 1, t1), np.diff(ptr[lo: hi + 1]))
                total += sign * np.bincount(idx[a:b], weights=(t1 - tokens), minlength=self.n_neurons).astype(np.int64)
        return total

    def frequencies(self, t0: int = 0, t1: int | None = None) -> np.ndarray:
        """(N,) float64: fraction of tokens in [t0, t1), over all sequences, each neuron is active."""
        t1 = self.n_tokens if t1 is None else t1
        return self.active_token_counts(None, t0, t1) / (self.n_seqs * (t1 - t0))

    @property
    def n_events(self) -> int:
        return len(self.on_idx) + len(self.off_idx)

    def token_overlap(self, seq: int = 0, distance: int = 1, max_tokens: int = 64) -> float:
        """Mean fraction of token t's active neurons still active at t + distance.

        Over the first ``max_tokens + distance`` tokens of sequence ``seq`` and all neurons; the
        same computation as :func:`ndpsched.tracestats.overlap_curve` (:func:`overlap_counts`).
        """
        if distance < 1 or self.n_tokens <= distance or self.n_neurons * self.n_tokens >= 5e8:
            raise TraceError("token_overlap needs a distance >= 1, a trace longer than the distance and small "
                             "enough to expand")
        dense = self.dense(seq)[: max_tokens + distance]
        hits, base = overlap_counts(dense, distance)
        return float(hits[0, distance - 1] / max(base[0, distance - 1], 1))

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_dense(cls, active: np.ndarray, layout: NeuronLayout, meta: dict[str, Any] | None = None) -> "ActivationTrace":
        """Build from an (S, T, N) or (T, N) bool array."""
        active = np.asarray(active, dtype=bool)
        if active.ndim == 2:
            active = active[None]
        if active.ndim != 3 or active.shape[2] != layout.n_neurons:
            raise TraceError(f"dense activity must be (S, T, {layout.n_neurons}) bool, got shape {active.shape}")
        n_seqs, n_tokens, _ = active.shape
        initial = np.packbits(active[:, 0, :], axis=1)
        on_lists, off_lists, on_counts, off_counts = [], [], [], []
        for s in range(n_seqs):
            on_counts.append(0)
            off_counts.append(0)
            for t in range(1, n_tokens):
                on = np.flatnonzero(active[s, t] & ~active[s, t - 1]).astype(np.int32)
                off = np.flatnonzero(~active[s, t] & active[s, t - 1]).astype(np.int32)
                on_lists.append(on)
                off_lists.append(off)
                on_counts.append(len(on))
                off_counts.append(len(off))
        return cls(
            layout, n_seqs, n_tokens, initial,
            np.concatenate([[0], np.cumsum(on_counts)]), _concat(on_lists),
            np.concatenate([[0], np.cumsum(off_counts)]), _concat(off_lists), meta,
        )

    def sequences(self, seqs: list[int] | range) -> "ActivationTrace":
        """A trace of a subset of the sequences (used to pick a batch)."""
        seqs = list(seqs)
        for s in seqs:
            if not 0 <= s < self.n_seqs:
                raise TraceError(f"sequence {s} is outside the trace's 0..{self.n_seqs - 1}")
        parts = {}
        for name in ("on", "off"):
            ptr, idx = getattr(self, f"{name}_ptr"), getattr(self, f"{name}_idx")
            chunks, counts = [], []
            for s in seqs:
                lo, hi = s * self.n_tokens, (s + 1) * self.n_tokens
                chunks.append(idx[ptr[lo]: ptr[hi]])
                counts.append(np.diff(ptr[lo: hi + 1]))
            parts[name] = (np.concatenate([[0], np.cumsum(np.concatenate(counts))]), _concat(chunks))
        out = ActivationTrace(self.layout, len(seqs), self.n_tokens, self.initial_packed[seqs],
                              *parts["on"], *parts["off"], self.meta, self.offline_freqs)
        out.layer_parents = self.layer_parents
        return out

    # ---- I/O ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the trace as a compressed ``.npz`` (format documented in the module)."""
        np.savez_compressed(
            path, format=FORMAT_NAME, version=FORMAT_VERSION,
            n_layers=self.layout.n_layers, d_qkv=self.layout.d_qkv, d_ffn=self.layout.d_ffn,
            n_seqs=self.n_seqs, n_tokens=self.n_tokens, initial_packed=self.initial_packed,
            on_ptr=self.on_ptr, on_idx=self.on_idx, off_ptr=self.off_ptr, off_idx=self.off_idx,
            meta=json.dumps(self.meta),
            **({} if self.offline_freqs is None else {"offline_freqs": self.offline_freqs}),
            **({} if self.layer_parents is None else {"layer_parents": self.layer_parents.astype(np.int32)}),
        )

    @classmethod
    def load(cls, path: str | Path) -> "ActivationTrace":
        """Read a trace written by :meth:`save`; a corrupt or foreign file raises TraceError."""
        path = Path(path)
        if not path.is_file():
            raise TraceError(f"trace file '{path}' does not exist")
        try:
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise TraceError(f"trace file '{path}' is not a readable .npz file ({exc})") from None
        if str(data.get("format", "")) != FORMAT_NAME:
            raise TraceError(f"'{path}' is not an ndpsched trace (no format='{FORMAT_NAME}' key)")
        if int(data.get("version", -1)) != FORMAT_VERSION:
            raise TraceError(f"trace '{path}' has format version {data.get('version')}, this ndpsched "
                             f"reads version {FORMAT_VERSION}")
        required = ("n_layers", "d_qkv", "d_ffn", "n_seqs", "n_tokens", "initial_packed",
                    "on_ptr", "on_idx", "off_ptr", "off_idx")
        missing = [k for k in required if k not in data]
        if missing:
            raise TraceError(f"trace '{path}' is missing arrays: {', '.join(missing)}")
        layout = NeuronLayout(int(data["n_layers"]), int(data["d_qkv"]), int(data["d_ffn"]))
        try:
            meta = json.loads(str(data["meta"])) if "meta" in data else {}
        except json.JSONDecodeError:
            raise TraceError(f"trace '{path}' has corrupt metadata (not JSON)") from None
        trace = cls(layout, int(data["n_seqs"]), int(data["n_tokens"]), data["initial_packed"],
                    data["on_ptr"], data["on_idx"], data["off_ptr"], data["off_idx"], meta,
                    data.get("offline_freqs"))
        if "layer_parents" in data:
            parents = data["layer_parents"].astype(np.int64)
            if parents.shape != (trace.n_neurons, 2) or parents.min() < -1 or parents.max() >= trace.n_neurons:
                raise TraceError(f"trace '{path}' has a corrupt layer_parents table")
            trace.layer_parents = parents
        return trace


def overlap_counts(active: np.ndarray, max_distance: int,
                   group_starts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Co-activity of every token with the token ``d`` later, d = 1..D, summed per column group.

    Args:
        active: (T, C) bool activity of C neurons over T tokens of one sequence.
        max_distance: D (capped at T - 1).
        group_starts: (G,) increasing first column of each group (default: one group of all).

    Returns:
        hits (G, D) float64: sum over t < T - d and the group's columns of a[t] & a[t + d];
        base (G, D) float64: sum over t < T - d of the group's active neurons at t.
        ``hits / base`` is the share of active neurons still active d tokens later.

    One FFT per group gives every column's autocorrelation at all lags at once (power spectra
    summed over the group's columns before the inverse transform); 0/1 data in float64, so the
    rounded result is exact.
    """
    active = np.asarray(active, dtype=bool)
    n_tokens, n_cols = active.shape
    d_max = max(min(int(max_distance), n_tokens - 1), 0)
    starts = np.zeros(1, dtype=np.int64) if group_starts is None else np.asarray(group_starts, dtype=np.int64)
    ends = np.append(starts[1:], n_cols)
    hits = np.zeros((len(starts), d_max))
    base = np.zeros((len(starts), d_max))
    if d_max == 0:
        return hits, base
    n_fft = 1 << int(2 * n_tokens - 1).bit_length()      # >= 2T - 1: no circular wrap-around
    lags = np.arange(1, d_max + 1)
    for g, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        x = active[:, a:b].astype(np.float64)
        spec = np.fft.rfft(x, n=n_fft, axis=0)
        power = (spec.real ** 2 + spec.imag ** 2).sum(axis=1)
        hits[g] = np.rint(np.fft.irfft(power, n=n_fft)[1: d_max + 1])
        per_token = np.cumsum(x.sum(axis=1))
        base[g] = per_token[n_tokens - 1 - lags]
    return hits, base


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, dtype=np.int32)
