"""Policy registry: lookup, errors, duplicates, entry points; every registered policy checked."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from ndpsched import registry as reg
from ndpsched.costmodel import CostModel
from ndpsched.errors import ConfigError, NdpschedError, UnknownNameError
from ndpsched.policy import BalancerPolicy, PartitionPolicy, SchedContext
from ndpsched.registry import ROLES, register_policy, registry
from ndpsched.simulator import memory_budgets
from ndpsched.trace import NeuronLayout


def make_ctx(model, hw, trace, seed=0, cost=None):
    cm = CostModel(model, hw, cost)
    gpu_budget, dimm_budget = memory_budgets(model, hw, cm.params, 1, trace.n_tokens)
    freqs = trace.frequencies()
    return SchedContext(model, hw, cm, NeuronLayout.of(model), 1, 5, freqs, freqs,
                        gpu_budget, dimm_budget, np.random.default_rng(seed),
                        layer_parents=getattr(trace, "layer_parents", None))


def test_builtins_present():
    assert {"topk", "random", "none"} <= set(registry("partition").names())
    assert "oracle" in registry("predictor").names()
    assert {"round-robin", "random"} <= set(registry("balancer").names())


def test_unknown_name_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean 'round-robin'"):
        registry("balancer").get("round_robin")
    with pytest.raises(UnknownNameError, match="policy role"):
        registry("scheduler")


def test_unknown_param_names_valid_keys():
    with pytest.raises(UnknownNameError, match="budget_fraction"):
        registry("partition").create("topk", {"budget_fractio": 0.5})
    with pytest.raises(ConfigError, match="budget_fraction"):
        registry("partition").create("topk", {"budget_fraction": 2.0})


def test_duplicate_registration():
    class A(PartitionPolicy):
        def _initial(self, ctx):
            return np.zeros(ctx.n_neurons, bool)

    class B(A):
        pass

    register_policy("partition", "test.dup")(A)
    try:
        with pytest.raises(NdpschedError, match="already registered"):
            register_policy("partition", "test.dup")(B)
        register_policy("partition", "test.dup", override=True)(B)
        assert registry("partition").get("test.dup") is B
    finally:
        registry("partition")._classes.pop("test.dup")


def test_entry_point_plugins_load_lazily(monkeypatch, tmp_path):
    """A third-party module named by an ``ndpsched.policies`` entry point registers on first lookup."""
    mod = tmp_path / "my_ndp_plugin.py"
    mod.write_text(
        "import numpy as np\n"
        "from ndpsched.policy import BalancerPolicy\n"
        "from ndpsched.registry import register_policy\n"
        "@register_policy('balancer', 'plugin.zero')\n"
        "class Zero(BalancerPolicy):\n"
        "    def _initial(self, ctx, on_gpu):\n"
        "        return np.zeros(ctx.n_neurons, dtype=np.int16)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from importlib.metadata import EntryPoint

    eps = [EntryPoint("mine", "my_ndp_plugin", "ndpsched.policies")]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None: eps if group == reg.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(reg, "_loaded", False)
    try:
        assert "plugin.zero" in registry("balancer").names()
    finally:
        registry("balancer")._classes.pop("plugin.zero", None)


def _all(role):
    """Every registered policy that runs from its defaults; policies that load an artifact (a
    trained model, ``rl:DIR``) are checked with one in tests/test_train.py."""
    return [(role, name) for name in registry(role).names()
            if not name.startswith("test.") and not registry(role).get(name).artifact_param]


def test_artifact_policies_refuse_to_run_without_their_artifact(tiny_model, tiny_hw, tiny_trace):
    from ndpsched.errors import ConfigError

    for role in ("partition", "balancer"):
        with pytest.raises(ConfigError, match="rl:DIR"):
            policy = registry(role).create("rl")
            policy.reset(make_ctx(tiny_model, tiny_hw, tiny_trace, seed=0))
        with pytest.raises(ConfigError, match="takes no 'NAME:ARGUMENT' form"):
            registry(role).create("random:x")


@pytest.mark.parametrize("role,name", _all("partition"))
def test_every_partition_valid_deterministic_picklable(role, name, tiny_model, tiny_hw, tiny_trace):
    policy = registry(role).create(name)
    out1 = policy.initial_partition(make_ctx(tiny_model, tiny_hw, tiny_trace, seed=1))
    out2 = registry(role).create(name).initial_partition(make_ctx(tiny_model, tiny_hw, tiny_trace, seed=1))
    assert out1.dtype == bool and out1.shape == (tiny_model.n_neurons,)
    assert np.array_equal(out1, out2)
    pickle.loads(pickle.dumps(policy))


@pytest.mark.parametrize("role,name", _all("balancer"))
def test_every_balancer_valid_deterministic_picklable(role, name, tiny_model, tiny_hw, tiny_trace):
    ctx = make_ctx(tiny_model, tiny_hw, tiny_trace, seed=1)
    on_gpu = registry("partition").create("topk").initial_partition(ctx)
    home1 = registry(role).create(name).initial_mapping(make_ctx(tiny_model, tiny_hw, tiny_trace, seed=1), on_gpu)
    home2 = registry(role).create(name).initial_mapping(make_ctx(tiny_model, tiny_hw, tiny_trace, seed=1), on_gpu)
    assert home1.shape == (tiny_model.n_neurons,) and home1.min() >= 0 and home1.max() < tiny_hw.n_dimms
    assert np.array_equal(home1, home2)
    pickle.loads(pickle.dumps(registry(role).create(name)))


@pytest.mark.parametrize("role,name", _all("predictor"))
def test_every_predictor_picklable_and_shaped(role, name, tiny_model, tiny_hw, tiny_trace):
    pred = registry(role).create(name)
    pickle.loads(pickle.dumps(pred))
    ctx = make_ctx(tiny_model, tiny_hw, tiny_trace)
    pred.begin(ctx, tiny_trace.active(0, 10), 10)
    on, off = pred.predict(11, tiny_trace.on(0, 11), tiny_trace.off(0, 11))
    assert on.ndim == 1 and off.ndim == 1


def test_base_class_names_offending_dimm_and_layer(tiny_model, tiny_hw, tiny_trace):
    ctx = make_ctx(tiny_model, tiny_hw, tiny_trace)

    class AllOnGpu(PartitionPolicy):
        registered_name = "all-on-gpu"

        def _initial(self, ctx):
            return np.ones(ctx.n_neurons, bool)

    class AllOnDimm0(BalancerPolicy):
        registered_name = "all-on-0"

        def _initial(self, ctx, on_gpu):
            return np.zeros(ctx.n_neurons, np.int16)

    class OffRange(BalancerPolicy):
        registered_name = "off-range"

        def _initial(self, ctx, on_gpu):
            return np.full(ctx.n_neurons, 9, np.int16)

    with pytest.raises(NdpschedError, match="over its budget .* layer"):
        AllOnGpu().initial_partition(ctx)
    small = make_ctx(tiny_model, tiny_hw.replace(dimm=tiny_hw.dimm.__class__(**{**tiny_hw.dimm.__dict__, "capacity_bytes": 2.0e5})), tiny_trace)
    with pytest.raises(NdpschedError, match="DIMM 0"):
        AllOnDimm0().initial_mapping(small, np.zeros(tiny_model.n_neurons, bool))
    with pytest.raises(ConfigError, match="DIMM 9"):
        OffRange().initial_mapping(ctx, np.zeros(tiny_model.n_neurons, bool))


def test_roles():
    assert ROLES == ("partition", "predictor", "balancer")
