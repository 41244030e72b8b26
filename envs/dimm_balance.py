"""``ndpsched/DimmBalance-v0``: the agent remaps cold neurons between NDP-DIMMs."""
from __future__ import annotations

from .base import SchedulingEnv


class DimmBalanceEnv(SchedulingEnv):
    """Balance the cold neurons' load over the NDP-DIMMs, one scheduling window at a time.

    ## Description
    Decode of an LLM on one GPU + NDP-DIMMs (Hermes, HPCA 2025), simulated by ndpsched's execution
    model on an activation trace. Every stage (a layer's QKV or FFN neurons) waits for its slowest
    DIMM, so the agent decides, at every window boundary (default 5 tokens), how the balancer
    remaps cold neurons between DIMMs over DIMM-link. The hot/cold partition and the predictor
    are played by registered heuristics (default: Hermes' offline ILP, ``hermes.ilp``, and the
    oracle predictor; pass ``partition="hermes.adjust", predictor="hermes.fsm"`` for full Hermes).

    ## Action Space
    ``Discrete(n)``: 0 = no remapping this window; k > 0 = run the balancer (default
    ``hermes.window``, Hermes' Algorithm 1) with the k-th setting of its knobs: imbalance
    tolerance in {0, 0.02, 0.05, 0.1, 0.2} x share of each DIMM pair's gap closed in
    {0.25, 0.5, 1.0} (16 actions). Hermes' own decision (tolerance 0.05, share 1.0) is
    ``env.unwrapped.heuristic_action()``. ``action_masks()`` masks the remaps with fewer than two DIMMs.

    ## Observation Space
    ``Box(0, 10, (history x (15 + dimms),), float32)``: for each of the last ``history`` windows,
    the latency per token relative to the episode's first window, DIMM imbalance, the fraction of
    stages above each tolerance level, stage-imbalance quantiles, GPU share of activations,
    exposed migration share, DIMM-link and PCIe capacity used by the last moves, progress, the
    DIMM share of compute, and every DIMM's load relative to the mean (sorted). Nothing depends
    on the model's width or depth. ``env.unwrapped.feature_names`` names them.

    ## Rewards
    ``reward="latency"`` (default): ``-token_latency / reference``, the reference being the
    episode's first window; ``reward="latency_energy"``: also minus the migration energy
    (DIMM-link 1.17 pJ/bit, PCIe pJ/bit of the preset) converted at ``energy_weight_s_per_j``.

    ## Starting State
    A generation on ``batch`` sequences drawn from the trace pool with the reset seed
    (``options={"seqs": [...]}`` picks them); prefill and the first window run under the
    offline placement.

    ## Episode End
    Terminated when the generation's ``gen_len`` tokens are decoded (default 128 tokens = 25
    decisions); truncated by ``max_episode_steps`` when given to ``gymnasium.make``.

    ## Arguments
    ``model``, ``gpu``, ``dimms``, ``batch``, ``prompt_len``, ``gen_len``, ``window_tokens``,
    ``trace``, ``trace_seqs``, ``trace_seed``, ``partition``, ``predictor``, ``balancer``,
    ``*_params``, ``knobs``, ``reward``, ``reward_params``, ``history``, ``config``: see
    :class:`ndpsched.envs.base.SchedulingEnv`.

    ## Version History
    * v0: initial version.
    """

    controlled = ("balancer",)
