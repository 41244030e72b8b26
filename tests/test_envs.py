"""The Gymnasium environments: API conformance, determinism, pickling, vectorised use, masks,
rewards, and the heuristic adapter reproducing the simulator's own run."""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")
import ndpsched.envs  # noqa: E402,F401  (registers the ids)
from ndpsched.envs import ENV_IDS  # noqa: E402
from ndpsched.envs.evaluate import FixedAgent, HeuristicAgent, RandomAgent, evaluate  # noqa: E402
from ndpsched.errors import ConfigError, NdpschedError  # noqa: E402

pytestmark = pytest.mark.rl

TINY = {"preset": "tiny"}


def make(env_id: str, **kw):
    return gym.make(env_id, **{**TINY, **kw})


@pytest.mark.parametrize("env_id", list(ENV_IDS))
def test_gymnasium_env_checker_passes_without_warnings(env_id):
    from gymnasium.utils.env_checker import check_env

    env = make(env_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped, skip_render_check=True)


@pytest.mark.parametrize("env_id", list(ENV_IDS))
def test_sb3_env_checker_passes_without_warnings(env_id):
    from stable_baselines3.common.env_checker import check_env

    env = make(env_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped, warn=True)


def _rollout(env, n_steps: int, action_seed: int = 3):
    """n_steps steps with seeded random valid actions, resetting on episode end."""
    rng = np.random.default_rng(action_seed)
    obs, info = env.reset(seed=11)
    trail = [(obs, 0.0, info)]
    u = env.unwrapped
    for _ in range(n_steps):
        mask = u.action_masks()
        acts, off = [], 0
        for role in u.controlled:
            n = u.grids[role].n
            acts.append(int(rng.choice(np.flatnonzero(mask[off: off + n]))))
            off += n
        action = acts[0] if len(acts) == 1 else np.array(acts)
        obs, reward, terminated, truncated, info = env.step(action)
        trail.append((obs, reward, info))
        if terminated or truncated:
            obs, info = env.reset()
            trail.append((obs, 0.0, info))
    return trail


@pytest.mark.parametrize("env_id", list(ENV_IDS))
def test_same_seed_same_observations_rewards_and_infos_for_100_steps(env_id):
    a, b = _rollout(make(env_id), 100), _rollout(make(env_id), 100)
    assert len(a) == len(b) > 100
    for (oa, ra, ia), (ob, rb, ib) in zip(a, b):
        assert np.array_equal(oa, ob)
        assert ra == rb
        assert ia == ib


@pytest.mark.parametrize("env_id", ["ndpsched/HotCold-v0", "ndpsched/Schedule-v0"])
def test_replayed_episodes_match_an_env_without_replay_cache(env_id, monkeypatch):
    """Episodes replay the pool's sequences; from the second visit of a window on, the simulator
    and hermes.adjust read what depends only on the sequence from the replay cache (active sets,
    FSM states, the window's sorted turn-ons). Random actions (no-move ones leave the promotion
    pool to carry over) must give exactly what an env with no replay cache gives."""
    import ndpsched.simulator as simulator

    def trail():
        env = make(env_id)
        rng, out = np.random.default_rng(3), []
        for episode in range(8):
            obs, _ = env.reset(options={"seqs": [episode % 2]})
            out.append(obs)
            done = False
            while not done:
                space = env.action_space
                action = (env.unwrapped.heuristic_action() if episode < 4
                          else rng.integers(space.nvec) if hasattr(space, "nvec") else int(rng.integers(space.n)))
                obs, reward, terminated, truncated, info = env.step(action)
                out.append((obs, reward, info["moves"], info["window_s"]))
                done = terminated or truncated
        return env, out

    env, cached = trail()
    kept = {k[:2] for memo in env.unwrapped.sim._replays[0].memo.values() for k in memo}
    assert ("hermes.adjust", "window set") in kept
    monkeypatch.setattr(simulator, "REPLAY_CACHE_BYTES", 0)
    plain, uncached = trail()
    assert not plain.unwrapped.sim._replays
    assert sum(step[2]["promoted"] for step in uncached if isinstance(step, tuple)) > 0
    for a, b in zip(cached, uncached, strict=True):
        if isinstance(a, tuple):
            assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
        else:
            assert np.array_equal(a, b)


def test_pickled_env_continues_identically():
    env = make("ndpsched/Schedule-v0").unwrapped
    env.reset(seed=5)
    env.step(env.heuristic_action())
    clone = pickle.loads(pickle.dumps(env))
    for _ in range(3):
        o1, r1, *_ = env.step(env.heuristic_action())
        o2, r2, *_ = clone.step(clone.heuristic_action())
        assert np.array_equal(o1, o2) and r1 == r2


def test_observations_are_float32_in_bounds_and_named():
    env = make("ndpsched/HotCold-v0")
    obs, _ = env.reset(seed=0)
    u = env.unwrapped
    assert obs.dtype == np.float32 and env.observation_space.contains(obs)
    assert obs.shape == (u.history * len(u.feature_names),)
    assert "candidates_over_10" in u.feature_names and "dimm_load_rank3" in u.feature_names


def test_observation_and_action_spaces_do_not_depend_on_the_model():
    small = make("ndpsched/DimmBalance-v0")
    other = make("ndpsched/DimmBalance-v0", model="smollm2-135m", gpu="rtx4090", config={})
    assert small.observation_space == other.observation_space
    assert small.action_space == other.action_space


def test_gymnasium_make_vec_and_sb3_make_vec_env():
    from stable_baselines3.common.env_util import make_vec_env

    venv = gym.make_vec("ndpsched/DimmBalance-v0", num_envs=2, vectorization_mode="sync", **TINY)
    obs, _ = venv.reset(seed=0)
    assert obs.shape == (2,) + venv.single_observation_space.shape
    obs, rew, term, trunc, info = venv.step(np.array([0, 9]))
    assert rew.shape == (2,) and "window_s" in info
    venv.close()
    sb3 = make_vec_env("ndpsched/DimmBalance-v0", n_envs=2, seed=0, env_kwargs=TINY)
    obs = sb3.reset()
    obs, rew, done, infos = sb3.step(np.array([0, 9]))
    assert obs.shape[0] == 2 and len(infos) == 2
    masks = sb3.env_method("action_masks")
    assert len(masks) == 2 and all(m[0] for m in masks)
    sb3.close()


def test_heuristic_action_reproduces_the_simulator_run():
    """Hermes' own decision is an action: playing it gives exactly Simulator.run's result."""
    env = make("ndpsched/DimmBalance-v0").unwrapped
    env.reset(options={"seqs": [2]})
    while True:
        *_, terminated, _, _ = env.step(env.heuristic_action())
        if terminated:
            break
    got = env.episode_result()
    from ndpsched.run import build_simulator

    sim = build_simulator(env.config, env.sim.trace)
    want = sim.run(seqs=[2], initial=env._initial)
    assert np.array_equal(got.token_s, want.token_s)
    assert got.moves == want.moves and got.moves["remapped"] >= 0


def test_no_move_action_means_no_moves():
    env = make("ndpsched/Schedule-v0").unwrapped
    env.reset(seed=1)
    while True:
        *_, terminated, _, info = env.step(np.array([0, 0]))
        assert info["moves"] == {"promoted": 0, "evicted": 0, "remapped": 0}
        assert info["migration_energy_j"] == 0.0
        if terminated:
            break


def test_masks_with_one_dimm_allow_only_no_move_and_masked_actions_are_refused():
    env = make("ndpsched/DimmBalance-v0", dimms=1).unwrapped
    env.reset(seed=0)
    mask = env.action_masks()
    assert mask[0] and not mask[1:].any()
    with pytest.raises(ConfigError, match="masked out"):
        env.step(env.heuristic_action())
    with pytest.raises(ConfigError, match="outside the action space"):
        env.step(999)


def test_energy_reward_charges_migration():
    lat = make("ndpsched/HotCold-v0").unwrapped
    en = make("ndpsched/HotCold-v0", reward="latency_energy", reward_params={"energy_weight_s_per_j": 1e6}).unwrapped
    lat.reset(seed=0)
    en.reset(seed=0)
    charged = 0
    for _ in range(6):
        _, r1, *_, i1 = lat.step(lat.heuristic_action())
        _, r2, *_, i2 = en.step(en.heuristic_action())
        assert i1 == i2
        assert r2 <= r1
        charged += r2 < r1
        assert (r2 < r1) == (i2["migration_energy_j"] > 0)
    assert charged, "Hermes' adjustment should have promoted something in 6 windows"


@pytest.mark.parametrize("kwargs, match", [
    ({"reward": "latencyy"}, "Did you mean 'latency'"),
    ({"preset": "tinyy"}, "env preset"),
    ({"knobs": {"balancer": {"tolerence": [0.1]}}}, "Did you mean 'tolerance'"),
    ({"knobs": {"partition": {"hot_threshold": [1]}}}, "this env controls"),
    ({"balancer": "hermes.windw"}, "Did you mean 'hermes.window'"),
    ({"gen_len": 5, "window_tokens": 5}, "must exceed window_tokens"),
])
def test_bad_env_arguments_give_one_clear_line(kwargs, match):
    with pytest.raises(NdpschedError, match=match) as err:
        make("ndpsched/DimmBalance-v0", **kwargs)
    assert "\n" not in str(err.value)


def test_bad_reset_option_is_named():
    env = make("ndpsched/DimmBalance-v0")
    with pytest.raises(ConfigError, match="unknown reset option"):
        env.reset(options={"sequence": 1})


@pytest.mark.parametrize("env_id", list(ENV_IDS))
def test_steps_out_of_order_are_refused_without_gymnasiums_wrappers(env_id):
    env = make(env_id)
    assert env.unwrapped is env                  # registered without OrderEnforcing / PassiveEnvChecker
    assert env.render() is None
    with pytest.raises(ConfigError, match="call reset"):
        env.step(env.unwrapped.heuristic_action())
    env.reset(seed=0)
    done = False
    while not done:
        *_, terminated, truncated, _ = env.step(env.unwrapped.heuristic_action())
        done = terminated or truncated
    with pytest.raises(ConfigError, match="episode is over"):
        env.step(env.unwrapped.heuristic_action())


@pytest.mark.parametrize("env_id", list(ENV_IDS))
def test_window_features_is_the_observations_last_row(env_id):
    from ndpsched.envs.observations import FEATURE_MAX, candidate_histogram, window_features

    env = make(env_id)
    obs, _ = env.reset(seed=0)
    u = env.unwrapped
    run = u._run
    moves = {"dimm_link_bytes": 0.0, "pcie_bytes": 0.0}
    cand = candidate_histogram(u.sim.partition, run, run.last) if u.with_candidates else None
    row = window_features(run, run.last, u._reference_token_s, moves, cand)
    n = len(u.feature_names)
    assert row.shape == (n,)
    np.testing.assert_array_equal(obs[-n:], np.clip(row, 0.0, FEATURE_MAX).astype(np.float32))


@pytest.mark.parametrize("env_id", list(ENV_IDS))
def test_max_episode_steps_truncates(env_id):
    env = make(env_id, max_episode_steps=3)
    env.reset(seed=0)
    ends = [env.step(env.unwrapped.heuristic_action())[2:4] for _ in range(3)]
    assert ends == [(False, False), (False, False), (False, True)]
    env.reset(seed=1)                                # a new episode after the truncation
    assert env.step(env.unwrapped.heuristic_action())[2:4] == (False, False)


def test_info_values_are_plain_python_numbers():
    """(JSON and CSV loggers take them as they are.)"""
    env = make("ndpsched/Schedule-v0")
    env.reset(seed=0)
    infos = []
    for _ in range(4):
        infos.append(env.step(env.unwrapped.heuristic_action())[-1])
    assert any(i["moves"]["remapped"] or i["moves"]["promoted"] for i in infos)
    for info in infos:
        assert all(type(v) is int for v in info["moves"].values())
        assert all(type(v) is float for v in info["bytes_moved"].values())
        assert all(type(info[k]) is float for k in ("window_s", "token_s", "dimm_imbalance", "hot_fraction",
                                                   "migration_energy_j"))


def test_evaluate_scores_heuristic_random_and_fixed_agents_the_same_way():
    kw = dict(env_id="ndpsched/DimmBalance-v0", n_episodes=3, seed=100, env_kwargs=TINY)
    results = [evaluate(HeuristicAgent(), **kw), evaluate(RandomAgent(seed=0), **kw),
               evaluate(FixedAgent(0), **kw), evaluate(HeuristicAgent({"balancer": "greedy.lpt"}), **kw)]
    for r in results:
        assert len(r["per_episode"]["tokens_per_s"]) == 3
        assert r["tokens_per_s"] > 0 and r["tokens_per_s_ci95"] >= 0
    assert results[2]["bytes_migrated"] == 0.0
    assert results[3]["agent"] == "greedy.lpt"
    # the same agent on the same seeds gives the same score
    assert evaluate(HeuristicAgent(), **kw)["per_episode"] == results[0]["per_episode"]


def test_heuristic_agent_refuses_an_env_made_for_another_policy():
    env = make("ndpsched/DimmBalance-v0")
    with pytest.raises(ConfigError, match="greedy.lpt"):
        HeuristicAgent({"balancer": "greedy.lpt"}).bind(env)
