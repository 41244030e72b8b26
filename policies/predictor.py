"""Predictors: the oracle, and Hermes' state-table + correlation-table predictor."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ndpsched.policy import PredictorPolicy
from ndpsched.registry import register_policy


@register_policy("predictor", "oracle")
class OraclePredictor(PredictorPolicy):
    """Perfect prediction: the computed set is the true active set (an upper bound)."""

    passthrough = True

    def _predict(self, token: int, on: np.ndarray, off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return on, off


def child_maps(parents: np.ndarray, n: int) -> list[np.ndarray]:
    """Per parent column c, ``child[c][j]`` = the neuron whose c-th correlated parent is j (or -1).

    Raises ValueError when a neuron is the c-th parent of several neurons (then the fast,
    duplicate-free updates do not apply)."""
    maps = []
    for c in range(parents.shape[1]):
        col = parents[:, c]
        valid = np.flatnonzero(col >= 0)
        if len(valid) and np.bincount(col[valid], minlength=n).max() > 1:
            raise ValueError("correlation table column is not one-to-one")
        child = np.full(n, -1, dtype=np.int32)
        child[col[valid]] = valid
        maps.append(child)
    return maps


#: (parents, layer-0 mask, child maps) of the last table seen: a sweep worker's trials share one
#: trace's table, and building the maps is a scatter over every neuron
_LAST_CHILD_MAPS: tuple | None = None


def _decode_child_maps(parents: np.ndarray, first_layer: np.ndarray) -> list[np.ndarray]:
    """child_maps of the table with layer 0's rows removed (layer 0 has no previous layer: its s2
    is fixed, whatever the table says); the last result is kept, for the same table object."""
    global _LAST_CHILD_MAPS
    last = _LAST_CHILD_MAPS
    if last is not None and last[0] is parents and np.array_equal(last[1], first_layer):
        return last[2]
    maps = child_maps(np.where(first_layer[:, None], -1, parents), len(parents))
    for m in maps:
        m.flags.writeable = False
    _LAST_CHILD_MAPS = (parents, first_layer, maps)
    return maps


@register_policy("predictor", "hermes.fsm")
class HermesFsm(PredictorPolicy):
    """Hermes' online predictor: neuron state table (token-wise) + correlation table (layer-wise).

    A neuron is predicted active at token t if ``s1 + lam * s2 > T`` (Hermes: lam = 6, T = 15),
    where s1 is its 4-bit state after token t-1 (initialised from prefill frequency, +4 when it
    fires, -1 when not) and s2 is how many of its two most correlated neurons in the previous
    layer fire at t (known by then: that layer was just computed). Ablation modes: ``token``
    predicts s1 > ``token_threshold``; ``layer`` predicts s2 >= 1. Layer 0 has no previous layer:
    its neurons are treated as if both correlated neurons fired (chosen; the paper is silent).

    False negatives (``false_negative``, the paper is silent): ``recompute`` (default; they are
    computed once detected: their work is priced, the second pass's extra launch and sync are
    not, so a predictor that predicts little looks nearly free: constrain recall when tuning,
    as examples/sweeps/hermes_constants.yaml does) or ``drop`` (the missed neurons are not
    computed: an accuracy cost, reported as recall).

    Event driven: a neuron's prediction can only change when one of its correlated parents
    toggles or when its own state crosses a threshold, which happens at a token computable at
    its last toggle; so a token re-evaluates O(toggles) neurons, not all of them (deduplicated
    with one scan of an N-byte mask, which costs less than sorting them). The correlation table
    comes from the trace (``trace.layer_parents``: the generator's coupling, or an offline profile).
    """

    @dataclass(frozen=True)
    class Params:
        lam: float = 6.0
        threshold: float = 15.0
        token_threshold: float = 10.0
        mode: str = "both"
        state_inc: int = 4
        state_dec: int = 1
        false_negative: str = "recompute"

        def __post_init__(self) -> None:
            if self.mode not in ("both", "token", "layer"):
                raise ValueError(f"mode must be one of both, token, layer; got {self.mode!r}")
            if self.false_negative not in ("drop", "recompute"):
                raise ValueError(f"false_negative must be drop or recompute, got {self.false_negative!r}")

    HORIZON = 16  # states saturate within 16 tokens: every crossing is scheduled less far ahead

    def begin(self, ctx, active: np.ndarray, token: int) -> None:
        from ndpsched.errors import ConfigError

        from .fsm import SaturatingStates, initial_states

        super().begin(ctx, active, token)
        p = self.params
        n = ctx.n_neurons
        parents = getattr(ctx, "layer_parents", None)
        if parents is None:
            if p.mode != "token":
                raise ConfigError("predictor hermes.fsm needs a correlation table: the trace has no "
                                  "layer_parents (use a generated trace, or mode=token)")
            parents = np.full((n, 2), -1, dtype=np.int64)
        self.parents = parents
        self.first_layer = ctx.layer_of == 0
        try:
            self.child = _decode_child_maps(parents, self.first_layer)
        except ValueError:
            raise ConfigError("hermes.fsm: the correlation table must map each neuron to at most one "
                              "child per column") from None
        act = np.asarray(active) > 0
        self.act = act.copy()
        self.states = SaturatingStates(initial_states(ctx.prefill_freqs), act, token, p.state_inc, p.state_dec)
        self._table = self._rule_table()
        valid = parents >= 0
        self.s2 = np.where(valid, act[np.maximum(parents, 0)], 0).sum(axis=1).astype(np.int8)
        # layer 0 has no previous layer: as if both correlated neurons fired (no neuron has a
        # layer-0 child map entry, so this never changes)
        self.s2[self.first_layer] = 2
        # prediction for the first decode token with the parents' activity of the last prompt
        # token; a parent that toggles at that token re-evaluates its children then
        self.pred = self._rule(np.arange(n), token + 1)
        # levels of s1 at which a prediction can change, for the scheduler
        # levels of s1 at which a prediction can change, each with the s2 under which it matters
        # (None: any s2)
        if p.mode == "token":
            self.levels = [(int(np.floor(p.token_threshold)) + 1, None)]
        elif p.mode == "layer":
            self.levels = []
        else:
            self.levels = [(int(np.floor(p.threshold - p.lam * k)) + 1, k) for k in (0, 1, 2)
                           if 0 < np.floor(p.threshold - p.lam * k) + 1 <= self.states.max_state]
        # calendar[level][token % HORIZON]: neurons whose state crosses that level then
        self.calendar: list[list[list[np.ndarray]]] = [[[] for _ in range(self.HORIZON)] for _ in self.levels]
        self._level_values = np.array([v for v, _ in self.levels], dtype=np.int16)[:, None]
        self._mark = np.zeros(n, dtype=bool)        # all False between tokens (see _predict)
        self.computed = self.pred | self.act if p.false_negative == "recompute" else self.pred.copy()
        self.stats = {"tokens": 0, "active": 0, "predicted": 0, "hits": 0}
        self._count = [int(self.act.sum()), int(self.pred.sum()), int((self.act & self.pred).sum())]
        # crossings of every neuron's trajectory from the last prompt token
        idle = np.flatnonzero(~act)
        self._schedule(np.flatnonzero(act), token + 1, rising=True)
        self._schedule(idle, token + 1, rising=False)

    def initial_computed(self) -> np.ndarray:
        return self.computed

    def _rule_table(self) -> np.ndarray:
        """(3 * (max_state + 1),) bool: the prediction for s2 * (max_state + 1) + s1."""
        p = self.params
        s1 = np.arange(self.states.max_state + 1)[None, :]
        s2 = np.arange(3)[:, None]
        if p.mode == "token":
            table = np.broadcast_to(s1 > p.token_threshold, (3, s1.size))
        elif p.mode == "layer":
            table = np.broadcast_to(s2 >= 1, (3, s1.size))
        else:
            table = s1 + p.lam * s2 > p.threshold
        return np.ascontiguousarray(table).ravel()

    def _rule(self, idx: np.ndarray, token: int) -> np.ndarray:
        """Prediction for ``token`` of neurons ``idx`` (s1 after token-1, s2 now), from a table
        over (s2, s1): integer gathers instead of the float formula on every candidate."""
        s1 = self.states.states(idx, token - 1)
        cell = self.s2.take(idx).astype(np.int16)
        cell *= self.states.max_state + 1
        cell += s1
        return self._table.take(cell)

    def _schedule(self, ids: np.ndarray, token: int, rising: bool, s0: np.ndarray | None = None) -> None:
        """Queue the tokens at which the trajectory of ``ids``, firing (rising) or idle from
        ``token`` on, crosses a level: the state after token-1+k is ``s0`` (their states after
        token-1; read if None) +- k steps, and it decides the prediction for token+k."""
        if not self.levels or len(ids) == 0:
            return
        if s0 is None:
            s0 = self.states.states(ids, token - 1)
        H, n_levels = self.HORIZON, len(self.levels)
        v = self._level_values                                   # (levels, 1)
        s0 = np.asarray(s0, dtype=np.int16)
        # k: tokens until the state after token-1+k crosses level v; k >= 1 exactly when it is
        # still below v (rising) or at or above it (falling): the prediction for token+k changes
        k = -((s0 - v) // max(self.params.state_inc, 1)) if rising else s0 - v + 1    # (levels, n)
        where = np.flatnonzero(((k >= 1) & (k <= H - 1)).ravel())
        # one radix sort by (level, k) puts each calendar slot's neurons in a run, by id order
        slot_key = (where // len(ids) * H + k.ravel().take(where)).astype(np.uint8 if n_levels * H < 256 else np.int64)
        order = np.argsort(slot_key, kind="stable")
        sel, slot_key = ids.take(where.take(order) % len(ids)), slot_key.take(order)
        bounds = np.searchsorted(slot_key, np.arange(n_levels * H + 1))
        for cell in np.flatnonzero(np.diff(bounds)).tolist():
            li, kk = divmod(cell, H)
            self.calendar[li][(token + kk) % H].append(sel[bounds[cell]: bounds[cell + 1]])

    def _predict(self, token: int, on: np.ndarray, off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        on, off = on.astype(np.intp), off.astype(np.intp)
        # 1. the true activity of token t: previous-layer parents changed for their children
        # (each column's map is one-to-one, so plain fancy-index updates are exact)
        kids = []
        for child in self.child:
            k_on, k_off = child[on], child[off]
            k_on, k_off = k_on[k_on >= 0], k_off[k_off >= 0]
            self.s2[k_on] += 1
            self.s2[k_off] -= 1
            kids += [k_on, k_off]
        slot = token % self.HORIZON
        due = []
        for li, (_, s2_needed) in enumerate(self.levels):
            ids = self.calendar[li][slot]
            self.calendar[li][slot] = []
            if not ids:
                continue
            ids = np.concatenate(ids)
            if s2_needed is not None:
                # crossing this level flips a prediction only for neurons with that s2 (layer 0: 2)
                ids = ids[self.s2[ids] == s2_needed]
            due.append(ids)
        # the neurons to re-evaluate, deduplicated through a mask: one scan of N bytes, cheaper
        # than a sort or a stamp table, and it leaves them by id, so every gather below (and the
        # simulator's) walks its table in order
        mark = self._mark
        mark[np.concatenate([*kids, on, off, *due])] = True
        cand = np.flatnonzero(mark)
        mark[cand] = False
        old_act, old_pred = self.act[cand], self.pred[cand]
        self.act[on] = True
        self.act[off] = False
        new_pred = self._rule(cand, token)
        new_act = self.act[cand]
        self.pred[cand] = new_pred
        # 2. the state table learns token t's activity; schedule the new trajectories' crossings
        s_on, s_off = self.states.toggle(on, off, token)
        self._schedule(on, token, rising=True, s0=s_on)
        self._schedule(off, token, rising=False, s0=s_off)
        # 3. statistics and the computed set's toggles
        c = self._count
        c[0] += int(new_act.sum()) - int(old_act.sum())
        c[1] += int(new_pred.sum()) - int(old_pred.sum())
        c[2] += int((new_act & new_pred).sum()) - int((old_act & old_pred).sum())
        self.stats["tokens"] += 1
        self.stats["active"] += c[0]
        self.stats["predicted"] += c[1]
        self.stats["hits"] += c[2]
        new_comp = new_pred | new_act if p.false_negative == "recompute" else new_pred
        old_comp = self.computed[cand]
        self.computed[cand] = new_comp
        return cand[new_comp & ~old_comp], cand[~new_comp & old_comp]     # (by id, as cand)

    def summary(self) -> dict[str, float]:
        """Recall, precision and table sizes over the run so far."""
        s = self.stats
        n = self.ctx.n_neurons
        wrong = s["predicted"] + s["active"] - 2 * s["hits"]   # false positives + false negatives
        return {
            "recall": s["hits"] / max(s["active"], 1),
            "precision": s["hits"] / max(s["predicted"], 1),
            # (TP + TN) / all neuron-tokens: the figure Hermes' "~98 % accuracy" most likely is;
            # at 80-98 % sparsity it is dominated by true negatives
            "accuracy": 1.0 - wrong / max(s["tokens"] * n, 1),
            "state_table_bytes": (n * 4 + 7) // 8,
            "correlation_table_bytes": int((self.parents >= 0).sum()) * 4,
        }
