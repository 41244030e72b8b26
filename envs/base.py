"""The execution model as a Gymnasium environment: one step = one scheduling window.

:class:`SchedulingEnv` owns a :class:`~ndpsched.simulator.Simulator` over a pool of trace
sequences. ``reset`` starts a generation on sequences drawn from the pool (prefill, then the
first window under the offline placement, which sets the episode's reference latency); every
``step`` applies the agent's decision for the roles it controls (the other roles' registered
heuristics decide as usual), simulates the next window and prices it. Subclasses
(:mod:`ndpsched.envs.dimm_balance`, :mod:`ndpsched.envs.hot_cold`, :mod:`ndpsched.envs.schedule`)
only choose the controlled roles.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ndpsched.config import PolicySpec, RunConfig
from ndpsched.errors import ConfigError, unknown_name
from ndpsched.presets import TINY_SPLIT
from ndpsched.run import build_simulator, load_trace
from ndpsched.simulator import DecodeRun, WindowOutcome

from .actions import KnobGrid, role_mask
from .observations import FEATURE_MAX, ObservationStack, candidate_histogram, feature_names
from .rewards import WindowReport, make_reward

#: roles in the order their decisions are applied at a window boundary
DECISION_ROLES = ("partition", "balancer")

#: workload defaults of every env (Hermes' evaluation set-up on the small ReLU model)
ENV_DEFAULTS: dict[str, Any] = {"model": "relullama-7b", "gpu": "rtx4090", "dimms": 8, "batch": 1,
                                "prompt_len": 128, "gen_len": 128, "window_tokens": 5, "trace": "skew",
                                "trace_seqs": 4}
#: named sets of defaults (``preset="tiny"``); explicit keyword arguments override them.
#: 'tiny' is :data:`ndpsched.presets.TINY_SPLIT`, a toy for tests and examples, not a real machine
ENV_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {**{k: v for k, v in TINY_SPLIT.items() if k not in ("cost", "hardware")}, "trace_seqs": 6,
             "config": {k: TINY_SPLIT[k] for k in ("cost", "hardware")}},
}


@functools.lru_cache(maxsize=4)
def _pool_trace(trace_key: str, n_seqs: int, trace_seed: int):
    """The episode pool's trace, shared by the envs of one process (vector envs in sync mode,
    every policy of a leaderboard): keyed by what the trace depends on, not by the policies."""
    import yaml

    fields = yaml.safe_load(trace_key)
    cfg = RunConfig.from_dict({**fields, "batch": n_seqs, "seed": trace_seed})
    return load_trace(cfg, cfg.load_model())


def _trace_key(cfg: RunConfig) -> str:
    import yaml

    keys = ("model", "weight_dtype", "kv_dtype", "prompt_len", "gen_len", "trace")
    return yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k in keys})


class SchedulingEnv(gym.Env):
    """Base of the ndpsched environments (see the subclasses' docstrings for the spaces).

    Args:
        model, gpu, dimms, batch, prompt_len, gen_len, window_tokens: the workload and machine
            (preset names; see ``ndpsched list``).
        trace: trace generator name ('skew', 'relullama7b', ...) or a trace ``.npz`` file.
        trace_seqs: sequences in the episode pool (a generated trace has this many; a file has its own).
        trace_seed: seed of the generated pool; evaluate on another seed for held-out traces.
        partition, predictor, balancer: registered policy names of the three roles; a role the
            agent controls is carried out by this policy with the parameters the action picks.
        partition_params, predictor_params, balancer_params: their base parameters.
        knobs: {role: {param: [levels]}} replacing the default action grid of a controlled role.
        reward: registered reward name ('latency', 'latency_energy') or a Reward instance.
        reward_params: constants of the reward.
        history: windows of features stacked in the observation.
        config: base RunConfig (dict, YAML path or RunConfig) for everything else (hardware and
            cost overrides, dtypes); the keyword arguments above override it.
        preset: a named set of defaults from :data:`ENV_PRESETS` ('tiny' for fast tests).
        render_mode: None or 'ansi'.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"]}
    #: roles the agent decides (set by subclasses)
    controlled: tuple[str, ...] = ()
    #: default policy of each role when this env is made
    default_policies = {"partition": "hermes.ilp", "predictor": "oracle", "balancer": "hermes.window"}

    def __init__(self, model: str | None = None, gpu: str | None = None, dimms: int | None = None,
                 batch: int | None = None, prompt_len: int | None = None, gen_len: int | None = None,
                 window_tokens: int | None = None, trace: str | None = None, trace_seqs: int | None = None,
                 trace_seed: int = 0, partition: str | None = None, predictor: str | None = None,
                 balancer: str | None = None, partition_params: dict | None = None,
                 predictor_params: dict | None = None, balancer_params: dict | None = None,
                 knobs: dict[str, dict[str, list]] | None = None, reward: Any = "latency",
                 reward_params: dict | None = None, history: int = 3,
                 config: dict | str | RunConfig | None = None, preset: str | None = None,
                 render_mode: str | None = None) -> None:
        super().__init__()
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ConfigError(f"render_mode must be None, 'ansi' or 'rgb_array', got {render_mode!r}")
        if not isinstance(history, int) or history < 1:
            raise ConfigError(f"history must be a positive integer, got {history!r}")
        self.render_mode = render_mode
        if preset is not None and preset not in ENV_PRESETS:
            raise unknown_name("env preset", str(preset), ENV_PRESETS)
        given = {"model": model, "gpu": gpu, "dimms": dimms, "batch": batch, "prompt_len": prompt_len,
                 "gen_len": gen_len, "window_tokens": window_tokens, "trace": trace, "trace_seqs": trace_seqs}
        chosen = {**ENV_DEFAULTS, **ENV_PRESETS.get(preset, {}), **{k: v for k, v in given.items() if v is not None}}
        model, gpu, dimms, batch = chosen["model"], chosen["gpu"], chosen["dimms"], chosen["batch"]
        prompt_len, gen_len, window_tokens = chosen["prompt_len"], chosen["gen_len"], chosen["window_tokens"]
        trace, trace_seqs = chosen["trace"], chosen["trace_seqs"]
        names = {"partition": partition, "predictor": predictor, "balancer": balancer}
        params = {"partition": partition_params, "predictor": predictor_params, "balancer": balancer_params}
        base = _base_config(config if config is not None else chosen.get("config"))
        cfg = dataclasses.replace(
            base, model=model, gpu=gpu, dimms=dimms, batch=batch, prompt_len=prompt_len, gen_len=gen_len,
            window_tokens=window_tokens, trace=dataclasses.replace(base.trace, source=str(trace)),
            **{role: PolicySpec(names[role] or self.default_policies[role], dict(params[role] or {}))
               for role in names})
        cfg = RunConfig.from_dict(cfg.to_dict())          # validates the keyword arguments
        if gen_len <= window_tokens:
            raise ConfigError(f"gen_len ({gen_len}) must exceed window_tokens ({window_tokens}): an "
                              "episode needs at least one decision")
        if not isinstance(trace_seqs, int) or trace_seqs < batch:
            raise ConfigError(f"trace_seqs must be an integer >= batch ({batch}), got {trace_seqs!r}")
        self.config = cfg
        knobs = knobs or {}
        unknown = set(knobs) - set(self.controlled)
        if unknown:
            raise ConfigError(f"knobs given for {sorted(unknown)}, but this env controls {list(self.controlled)}")
        self.grids = {role: KnobGrid(role, getattr(cfg, role).name, getattr(cfg, role).params, knobs.get(role))
                      for role in self.controlled}
        self.reward_fn = make_reward(reward, reward_params)

        if Path(str(trace)).suffix == ".npz":
            pool = load_trace(cfg, cfg.load_model())
        else:
            pool = _pool_trace(_trace_key(cfg), trace_seqs, trace_seed)
        if pool.n_seqs < batch:
            raise ConfigError(f"trace '{trace}' has {pool.n_seqs} sequences, batch {batch} needs {batch}")
        self.pool_size = pool.n_seqs
        self.sim = build_simulator(cfg, pool)
        # the offline placement (Hermes computes it once per model, offline) is decided once per
        # env on the first sequences of the pool; every episode starts from it
        self._initial = self.sim.start(seqs=range(batch)).initial_placement.freeze()
        self._masks = self._compute_masks()
        # where each role's actions start in the masks, and joules per byte moved (step reads them)
        sizes = [self.grids[role].n for role in self.controlled]
        self._n_actions = dict(zip(self.controlled, sizes))
        self._action_names = {role: self.grids[role].names for role in self.controlled}
        # a Discrete space's actions as _split returns them
        self._discrete_acts = ([{self.controlled[0]: a} for a in range(sizes[0])] if len(self.controlled) == 1
                               else None)
        # the same where the action is not masked (the masks are fixed for the env's life), else None
        self._valid_discrete = (None if self._discrete_acts is None else
                                [acts if self._masks[a] else None for a, acts in enumerate(self._discrete_acts)])
        # each decision role's action settings (None: the agent does not control the role)
        self._settings = {role: self.grids[role].settings if role in self.grids else None for role in DECISION_ROLES}
        self._mask_offset = dict(zip(self.controlled, np.cumsum([0, *sizes[:-1]]).tolist()))
        hw = self.sim.hw
        self._link_j_per_byte = 8e-12 * hw.dimm_link.energy_pj_per_bit
        self._pcie_j_per_byte = 8e-12 * hw.pcie.energy_pj_per_bit

        J = self.sim.hw.n_dimms
        self.history = history
        self.with_candidates = "partition" in self.controlled and hasattr(self.sim.partition, "candidate_state_histogram")
        self.feature_names = feature_names(J, self.with_candidates)
        n_feat = len(self.feature_names)
        self.observation_space = spaces.Box(0.0, FEATURE_MAX, shape=(history * n_feat,), dtype=np.float32)
        self.action_space = self._make_action_space()
        self._stack = ObservationStack(history, n_feat)
        self._run: DecodeRun | None = None
        self._reference_token_s = 1.0
        self._last_info: dict[str, Any] = {}

    # ---- spaces ------------------------------------------------------------------------------------
    def _make_action_space(self) -> spaces.Space:
        sizes = [self.grids[role].n for role in self.controlled]
        return spaces.Discrete(sizes[0]) if len(sizes) == 1 else spaces.MultiDiscrete(sizes)

    def _split(self, action: Any) -> dict[str, int]:
        """{role: action index} of an action of this env's space (anything else is an error)."""
        if isinstance(action, (int, np.integer)) and self._discrete_acts is not None:   # Discrete: the common case
            if 0 <= action < len(self._discrete_acts):
                return self._discrete_acts[action]        # (read only: shared between steps)
        flat = np.asarray(action).reshape(-1)
        ok = flat.size == len(self.controlled) and (flat.dtype.kind in "iu" or
                                                    (flat.dtype.kind == "f" and np.all(flat == np.round(flat))))
        acts = dict(zip(self.controlled, map(int, flat.tolist()))) if ok else {}
        if not ok or any(not 0 <= a < self._n_actions[role] for role, a in acts.items()):
            raise ConfigError(f"action {action!r} is outside the action space {self.action_space}")
        return acts

    def action_masks(self) -> np.ndarray:
        """Valid actions (sb3-contrib's MaskablePPO reads this): "no move" is always valid; moves
        between DIMMs need two DIMMs; promotions need a GPU budget. Concatenated over the roles of
        a MultiDiscrete space."""
        return self._masks.copy()

    def _compute_masks(self) -> np.ndarray:
        # they depend on the machine and the offline placement only, fixed for the env's life
        masks = [role_mask(role, self.grids[role].n, self.sim.hw.n_dimms, bool(self._initial.on_gpu.any()))
                 for role in self.controlled]
        return np.concatenate(masks)

    def heuristic_action(self) -> Any:
        """The action that reproduces the configured heuristics' own decisions."""
        acts = [self.grids[role].default_action for role in self.controlled]
        return acts[0] if len(acts) == 1 else np.array(acts, dtype=np.int64)

    def describe_action(self, action: Any) -> dict[str, str]:
        return {role: self.grids[role].describe(a) for role, a in self._split(action).items()}

    # ---- episode -----------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start a generation. ``options={"seqs": [...]}`` picks the pool sequences of the batch
        (default: drawn with the env's seeded generator)."""
        super().reset(seed=seed)
        options = dict(options or {})
        seqs = options.pop("seqs", None)
        if options:
            raise ConfigError(f"unknown reset option(s) {sorted(options)}; valid: ['seqs']")
        if seqs is None:
            seqs = sorted(self.np_random.choice(self.pool_size, size=self.sim.batch, replace=False).tolist())
        self._run = self.sim.start(seqs=seqs, initial=self._initial)
        out = self._run.next_window()
        self._reference_token_s = out.window_s / out.n_tokens
        self._stack.reset()
        moves = {"promoted": 0, "evicted": 0, "remapped": 0, "pcie_bytes": 0.0, "dimm_link_bytes": 0.0}
        obs = self._observe(out, moves)
        info = self._info(out, moves, energy_j=0.0, action=None)
        return obs, info

    def step(self, action: Any):
        run = self._run
        if run is None or run.done:
            raise ConfigError("the episode is over (or was never started): call reset()")
        # a valid Discrete action is one lookup; anything else is split and checked against the masks
        valid = self._valid_discrete
        acts = valid[action] if valid is not None and type(action) is int and 0 <= action < len(valid) else None
        if acts is None:
            acts = self._split(action)
            mask, offset = self._masks, self._mask_offset
            for role, a in acts.items():
                if not mask[offset[role] + a]:
                    self._masked(role, a)
        activity, placement, sim = run.last.activity, run.placement, self.sim
        partition, balancer = sim.partition, sim.balancer
        # DECISION_ROLES' order: the partition first, then the balancer on the new hot set
        a = acts.get("partition")
        change = self._decide(partition, self._settings["partition"], a, activity, placement)
        moves = run.apply_partition(change)
        a = acts.get("balancer")
        change = self._decide(balancer, self._settings["balancer"], a, activity, placement)
        moves.update(run.apply_balance(change))
        link_bytes, pcie_bytes = moves["dimm_link_bytes"], moves["pcie_bytes"]
        energy_j = link_bytes * self._link_j_per_byte + pcie_bytes * self._pcie_j_per_byte
        out = run.next_window()
        reward = float(self.reward_fn(WindowReport(out.window_s, out.t1 - out.t0, self._reference_token_s, energy_j,
                                                   link_bytes, pcie_bytes)))
        obs = self._observe(out, moves)
        info = self._info(out, moves, energy_j, acts)
        return obs, reward, run.done, False, info

    @staticmethod
    def _decide(policy, settings, a, activity, placement):
        """A role's change at a window boundary: its heuristic's own (``a`` None: the agent does
        not control it), or the heuristic with the parameters action ``a`` picks (None: no move)."""
        if a is None:
            return policy.update(activity, placement)
        setting = settings[a]
        if setting is None:
            return None
        policy.params = setting
        return policy.update(activity, placement)

    def _masked(self, role: str, a: int) -> None:
        first = self._mask_offset[role]
        valid = np.flatnonzero(self._masks[first: first + self.grids[role].n]).tolist()
        raise ConfigError(f"{role} action {a} ({self.grids[role].describe(a)}) is masked out now; valid "
                          f"actions: {valid}")

    # ---- observation and info ------------------------------------------------------------------------
    def _observe(self, out: WindowOutcome, moves: dict[str, float]) -> np.ndarray:
        cand = candidate_histogram(self.sim.partition, self._run, out) if self.with_candidates else None
        return self._stack.push_window(self._run, out, self._reference_token_s, moves, cand)

    def _info(self, out: WindowOutcome, moves: dict[str, float], energy_j: float, action) -> dict[str, Any]:
        n, window_s = out.t1 - out.t0, out.window_s
        info = {
            "tokens": n,
            "window_s": window_s,
            "token_s": window_s / n,
            "reference_token_s": self._reference_token_s,
            "breakdown_s": out.cost.components,             # (a window's own dict: no copy)
            "dimm_imbalance": self._stack.last_dimm_imbalance,     # (the observation's pass computed it)
            # (apply_partition and apply_balance always report these keys, as Python ints and floats)
            "moves": {"promoted": moves["promoted"], "evicted": moves["evicted"], "remapped": moves["remapped"]},
            "bytes_moved": {"pcie": moves["pcie_bytes"], "dimm_link": moves["dimm_link_bytes"]},
            "migration_energy_j": energy_j,
            "hot_fraction": out.gpu_activations / out.all_activations if out.all_activations else 0.0,
        }
        if action is not None:
            names = self._action_names
            named = info["action"] = {}
            for role, a in action.items():
                named[role] = names[role][a]
        self._last_info = info
        return info

    def episode_result(self):
        """The :class:`~ndpsched.simulator.SimResult` of the episode so far (tokens/s etc.)."""
        if self._run is None:
            raise ConfigError("no episode has been started: call reset()")
        return self._run.result()

    def render(self) -> str | np.ndarray | None:
        """'ansi': a one-line summary of the last window; 'rgb_array': a (64, 16 (J + 1), 3) uint8
        bar chart of the last window's activations on the GPU (green) and every DIMM (blue; the
        busiest in red)."""
        if self._run is None or self._run.last is None or self.render_mode is None:
            return None
        if self.render_mode == "ansi":
            i = self._last_info
            return (f"tokens {self._run.next_step}/{self.sim.gen_len}  {1e3 * i['token_s']:.3f} ms/token "
                    f"(ref {1e3 * i['reference_token_s']:.3f})  imbalance {i['dimm_imbalance']:.3f}  "
                    f"moves {i['moves']}")
        per_dev = self._run.last.activity.device_load.sum(axis=0)
        height, width = 64, 16
        img = np.full((height, width * len(per_dev), 3), 255, dtype=np.uint8)
        top = per_dev.max() if per_dev.max() > 0 else 1.0
        busiest = 1 + int(np.argmax(per_dev[1:]))
        for d, value in enumerate(per_dev):
            h = int(round((height - 2) * value / top))
            color = (40, 160, 60) if d == 0 else (200, 40, 40) if d == busiest else (50, 90, 200)
            img[height - h:, d * width + 2: (d + 1) * width - 2] = color
        return img


def _base_config(config: dict | str | RunConfig | None) -> RunConfig:
    if config is None:
        return RunConfig()
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, (str, Path)):
        return RunConfig.from_yaml(config)
    if isinstance(config, dict):
        return RunConfig.from_dict(config)
    raise ConfigError(f"config must be a dict, a YAML path or a RunConfig, got {type(config).__name__}")
