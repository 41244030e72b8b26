"""What a replayed sequence's decode looks like, whatever the schedule: cached per sequence.

With one sequence and a perfect predictor (the Gymnasium envs' setting), the set of neurons that
fire at every token is the trace's, so it is the same in every episode that replays the sequence,
whatever the policies did. The envs sample episodes from a small pool of sequences, so from the
second episode on a window can read that state instead of rebuilding it from the trace's toggles:

- ``bits``: the active set at every token, bit-packed (N / 8 bytes a token);
- ``window_counts``: per window, each neuron's active-token count (N bytes a window), what
  :meth:`~ndpsched.policy.WindowActivity.neuron_counts` returns;
- ``window_changed``: per window, the neurons whose activity changes at one of its tokens,
  bit-packed (N / 8 bytes a window): the simulator re-counts only those of its moved neurons;
- ``memo``: per window, what policies derive from the window's activity alone (Hermes' FSM states
  at its end, say), handed to them as a :class:`WindowMemo`.

Memory is bounded by :data:`REPLAY_CACHE_BYTES` per simulator; past it sequences are simply not
cached and the simulator takes the O(toggles) path, with identical results.
"""
from __future__ import annotations

from typing import Callable, Hashable

import numpy as np

#: bytes of replay state a simulator may keep (relullama-7b: 20 MB per sequence of 128 decode
#: tokens in 5-token windows; llama2-70b: 130 MB), a pool of a few sequences, not a history
REPLAY_CACHE_BYTES = 384 * 2**20


class SequenceReplay:
    """Placement-independent state of the decode of one sequence (batch 1, true active sets).

    Row ``r`` of :attr:`bits` is the active set at token ``first_token + r``; row 0 (the last
    prompt token) is filled at creation, the others as the first episode simulates them.
    """

    def __init__(self, active_at_first: np.ndarray, first_token: int, n_rows: int) -> None:
        self.n_neurons = len(active_at_first)
        self.first_token = first_token
        self.bits = np.zeros((n_rows, (self.n_neurons + 7) // 8), dtype=np.uint8)
        self.have = np.zeros(n_rows, dtype=bool)
        self.bits[0] = np.packbits(active_at_first)
        self.have[0] = True
        self.n_leading = 1            # rows 0 .. n_leading - 1 are all present (the common check)
        self.window_counts: dict[tuple[int, int], np.ndarray] = {}
        self.window_changed: dict[tuple[int, int], np.ndarray] = {}
        self.memo: dict[tuple[int, int], dict] = {}
        self.visits: dict[tuple[int, int], int] = {}

    @staticmethod
    def nbytes_for(n_neurons: int, n_rows: int, window_tokens: int) -> int:
        """Bytes a sequence's replay state reaches once every window is cached."""
        n_windows = -(-(n_rows - 1) // window_tokens)
        return n_rows * ((n_neurons + 7) // 8) + n_windows * (n_neurons + (n_neurons + 7) // 8)

    def rows(self, t0: int, t1: int) -> np.ndarray | None:
        """(t1 - t0 + 1, N / 8) packed active sets at tokens t0 - 1 .. t1 - 1, or None if a token
        of the window has not been simulated yet."""
        r0, r1 = t0 - 1 - self.first_token, t1 - self.first_token
        return self.bits[r0: r1] if r1 <= self.n_leading or self.have[r0: r1].all() else None

    def store(self, token: int, active: np.ndarray) -> None:
        """Record the (N,) 0/1 active set at ``token``."""
        r = token - self.first_token
        self.bits[r] = np.packbits(active)
        self.have[r] = True
        while self.n_leading < len(self.have) and self.have[self.n_leading]:
            self.n_leading += 1

    def counts(self, t0: int, t1: int) -> np.ndarray:
        """(N,) uint8 active-token count of every neuron over tokens [t0, t1) (cached)."""
        key = (t0, t1)
        if key not in self.window_counts:
            rows = self.rows(t0, t1)[1:]
            acc = np.unpackbits(rows[0], count=self.n_neurons)
            for row in rows[1:]:
                acc += np.unpackbits(row, count=self.n_neurons)
            self.window_counts[key] = acc
        return self.window_counts[key]

    def changed(self, t0: int, t1: int, rows: np.ndarray) -> np.ndarray:
        """uint8: bit-packed, the neurons whose activity at one of tokens [t0, t1) differs from the
        token before (``rows``: :meth:`rows` of the window), zero-padded to whole 64-bit words;
        cached per window."""
        key = (t0, t1)
        if key not in self.window_changed:
            changed = np.zeros((rows.shape[1] + 7) // 8 * 8, dtype=np.uint8)
            np.bitwise_or.reduce(rows[1:] ^ rows[:-1], axis=0, out=changed[:rows.shape[1]])
            self.window_changed[key] = changed
        return self.window_changed[key]

    @staticmethod
    def active_of(rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(len(rows), len(ids)) uint8: whether neurons ``ids`` are active in each packed row."""
        shift = (7 - (ids & 7)).astype(np.uint8)
        return (rows.take(ids >> 3, axis=1) >> shift) & np.uint8(1)


class WindowMemo:
    """Placement-independent results a policy derives from one window of a replayed sequence
    (Hermes' FSM states at the window's end, say), kept for the episodes that replay it.

    ``visits`` counts the episodes that reached this window, this one included. A policy should
    store only from the second visit on, so that a sequence simulated once (a sweep trial) pays
    nothing for the memo. Stores past the simulator's replay budget are dropped (the policy then
    computes as if nothing was kept).
    """

    def __init__(self, replay: SequenceReplay, t0: int, t1: int, reserve: Callable[[int], bool]) -> None:
        self.window = window = (t0, t1)
        self._store = replay.memo.setdefault(window, {})
        self.visits = replay.visits[window] = replay.visits.get(window, 0) + 1
        self._reserve = reserve

    def get(self, key: Hashable) -> np.ndarray | tuple | None:
        """The value stored under ``key`` (name it after the policy and its parameters), or None."""
        return self._store.get(key)

    def put(self, key: Hashable, value: np.ndarray | tuple) -> None:
        """Keep ``value`` (an array or a tuple of arrays, made read-only) for later visits, if the
        replay budget allows."""
        arrays = value if isinstance(value, tuple) else (value,)
        if key not in self._store and self._reserve(sum(a.nbytes for a in arrays)):
            for a in arrays:
                a.flags.writeable = False
            self._store[key] = value
