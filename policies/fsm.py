"""Hermes' neuron state table: a 4-bit saturating counter per neuron, updated lazily.

After prefill each counter is set from the neuron's prefill activation frequency binned into
16 levels (>90 % -> 15, <2 % -> 0, linear in between); after every token it moves +4 if the
neuron fired and -1 if not, saturating at 0 and 15 (Hermes section IV-B).

Updating 3 million counters per token would cost more than the rest of the simulation, so the
table is updated only where a neuron's activity *changes*: between two toggles a neuron fires at
every token or at none, and its counter follows ``clip(s + 4 k)`` or ``clip(s - k)`` after k
tokens in closed form. Each neuron stores one int64 word: the token of its last toggle, its
counter then, and whether it has fired since.
"""
from __future__ import annotations

import numpy as np

from ndpsched.jit import kernel

_ACTIVE_BITS = 1
_STATE_BITS = 7
_T_SHIFT = _ACTIVE_BITS + _STATE_BITS


def initial_states(prefill_freqs: np.ndarray, hi: float = 0.9, lo: float = 0.02, max_state: int = 15) -> np.ndarray:
    """(N,) int: prefill frequency binned into ``max_state + 1`` levels (>hi -> max, <lo -> 0)."""
    f = np.asarray(prefill_freqs, dtype=np.float64)
    levels = 1 + np.floor((f - lo) / (hi - lo) * (max_state - 1))
    return np.where(f > hi, max_state, np.where(f < lo, 0, np.clip(levels, 1, max_state - 1))).astype(np.int64)


class SaturatingStates:
    """Lazily updated saturating counters (see module doc); O(toggles) per token."""

    def __init__(self, states: np.ndarray, active: np.ndarray, token: int, inc: int = 4, dec: int = 1,
                 max_state: int = 15) -> None:
        """``states``: (N,) counters after ``token``; ``active``: (N,) whether each neuron fired then."""
        if max_state >= 2**_STATE_BITS:
            raise ValueError(f"max_state must be < {2**_STATE_BITS}")
        self.inc, self.dec, self.max_state = int(inc), int(dec), int(max_state)
        if token >= 2**(31 - _T_SHIFT):
            raise ValueError(f"token {token} is too large for the packed state word")
        # int32 words (12 MB for llama2-70b) keep the per-toggle gathers cache friendly
        self.word = self.pack(states, active, token)
        # the counter k tokens after its word's token, for k = 0 .. max_state (by then it has
        # saturated: it moves by at least 1 a token, or never), as one table indexed by
        # (the word's low bits: counter and activity) << k_bits | k
        self._k_bits = max(int(self.max_state).bit_length(), 1)
        low = np.arange(2**_T_SHIFT)
        s, firing, k = (low >> _ACTIVE_BITS)[:, None], (low & 1)[:, None] == 1, np.arange(2**self._k_bits)[None, :]
        table = np.where(firing, np.minimum(self.max_state, s + self.inc * k), np.maximum(0, s - self.dec * k))
        self._table = np.clip(table, 0, 255).astype(np.uint8).ravel()
        self._table.flags.writeable = False

    def copy(self) -> "SaturatingStates":
        """An independent copy (its own state words; the lookup table is shared, read-only)."""
        new = object.__new__(SaturatingStates)
        new.__dict__.update(self.__dict__)
        new.word = self.word.copy()
        return new

    @staticmethod
    def pack(states: np.ndarray, active: np.ndarray, token: int) -> np.ndarray:
        """(N,) int32 words of counters ``states`` after ``token`` and activity ``active`` (> 0:
        fired) then."""
        return _pack_words(np.asarray(states), np.asarray(active), token << _T_SHIFT)

    def _lookup(self, word: np.ndarray, token: int) -> np.ndarray:
        """uint8 counters after ``token`` of neurons with state words ``word``."""
        k = np.minimum(token - (word >> _T_SHIFT), self.max_state)
        return self._table.take(((word & (2**_T_SHIFT - 1)) << self._k_bits) | k)

    def states(self, idx: np.ndarray, token: int) -> np.ndarray:
        """uint8 counters of neurons ``idx`` after ``token`` (token >= their last toggle - 1)."""
        return self._lookup(self.word.take(idx), token)

    def all_states(self, token: int) -> np.ndarray:
        """(N,) uint8 every counter after ``token`` (O(N): for tests, reports and replay memos)."""
        return self._lookup(self.word, token)

    def toggle(self, on: np.ndarray, off: np.ndarray, token: int) -> tuple[np.ndarray, np.ndarray]:
        """Neurons ``on`` start firing at ``token``, ``off`` stop; each id unique within its list.

        The counter is brought to the token before the change (an 'on' neuron was idle since its
        last toggle, an 'off' one firing) and restarted from there with the new activity.
        Returns those counters (after ``token - 1``) of ``on`` and of ``off``.
        """
        mask = (1 << _STATE_BITS) - 1
        stamp = np.int32((token - 1) << _T_SHIFT)
        out = []
        for ids, firing in ((on, True), (off, False)):
            if not len(ids):
                out.append(np.zeros(0, dtype=np.int32))
                continue
            w = self.word[ids]
            s, elapsed = (w >> _ACTIVE_BITS) & mask, (token - 1) - (w >> _T_SHIFT)
            # an 'on' neuron was idle since its last toggle, an 'off' one firing
            s = np.maximum(0, s - self.dec * elapsed) if firing else np.minimum(self.max_state, s + self.inc * elapsed)
            self.word[ids] = stamp | (s << _ACTIVE_BITS) | int(firing)
            out.append(s)
        return out[0], out[1]

    def memory_bytes(self, n_neurons: int) -> int:
        """Size of the hardware table Hermes keeps: 4 bits per neuron."""
        return (n_neurons * 4 + 7) // 8


@kernel
def _pack_words(states, active, token_bits):
    """One pass (a start packs every neuron's word; numpy took six passes over them)."""
    words = np.empty(len(states), np.int32)
    for i in range(len(states)):
        words[i] = token_bits | (np.int32(states[i]) << _ACTIVE_BITS) | (1 if active[i] > 0 else 0)
    return words
