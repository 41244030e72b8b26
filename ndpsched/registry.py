"""String-keyed registries of scheduling policies, one per role.

Roles: ``partition`` (which neurons are hot on the GPU), ``predictor`` (which neurons will
fire), ``balancer`` (which DIMM holds each cold neuron). Built-ins register with a decorator::

    @register_policy("balancer", "round-robin")
    class RoundRobin(BalancerPolicy): ...

Third-party packages ship policies through the ``ndpsched.policies`` entry-point group (the
value is a module to import, which registers its classes); entry points are loaded lazily on
the first lookup, never at ``import ndpsched``.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ConfigError, NdpschedError, unknown_name

log = logging.getLogger(__name__)

ROLES = ("partition", "predictor", "balancer")
ENTRY_POINT_GROUP = "ndpsched.policies"
BUILTIN_MODULE = "ndpsched.policies"


class Registry:
    """Maps names to policy classes for one role."""

    def __init__(self, role: str) -> None:
        self.role = role
        self._classes: dict[str, type] = {}

    def register(self, name: str, cls: type, override: bool = False) -> type:
        if name in self._classes and not override and not _same_class(self._classes[name], cls):
            raise NdpschedError(f"{self.role} policy '{name}' is already registered by "
                                f"{self._classes[name].__module__}.{self._classes[name].__qualname__}; "
                                "pass override=True to replace it")
        self._classes[name] = cls
        cls.registered_name = name
        return cls

    def get(self, name: str) -> type:
        load_plugins()
        if name not in self._classes:
            raise unknown_name(f"{self.role} policy", name, self._classes)
        return self._classes[name]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._classes)

    def create(self, name: str, params: Mapping[str, Any] | None = None, **kwargs: Any):
        """Instantiate policy ``name`` with ``params`` checked against its ``Params`` dataclass.

        ``"base:ARG"`` names a policy that loads an artifact (e.g. ``rl:runs/ppo``, a trained
        model): ARG becomes its ``artifact_param`` parameter."""
        params = dict(params or {})
        load_plugins()
        if name not in self._classes and ":" in name:
            base, arg = name.split(":", 1)
            cls = self.get(base)
            if not getattr(cls, "artifact_param", None):
                raise ConfigError(f"{self.role} policy '{base}' takes no 'NAME:ARGUMENT' form (only "
                                  "policies that load an artifact do, e.g. 'rl:DIR')")
            params[cls.artifact_param] = arg
            name = base
        cls = self.get(name)
        return cls(params=make_params(cls, params, f"{self.role} policy '{name}'"), **kwargs)

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._classes


def _same_class(a: type, b: type) -> bool:
    """True for the same class, also when its module was imported twice under two names
    (e.g. ``policies.balancer`` from a source checkout and ``ndpsched.policies.balancer``)."""
    if a is b:
        return True
    file_a = getattr(sys.modules.get(a.__module__), "__file__", None)
    file_b = getattr(sys.modules.get(b.__module__), "__file__", None)
    return a.__qualname__ == b.__qualname__ and file_a is not None and file_a == file_b


REGISTRIES: dict[str, Registry] = {role: Registry(role) for role in ROLES}


def registry(role: str) -> Registry:
    if role not in REGISTRIES:
        raise unknown_name("policy role", role, REGISTRIES)
    return REGISTRIES[role]


def register_policy(role: str, name: str, override: bool = False) -> Callable[[type], type]:
    """Class decorator registering a policy class under ``name`` for ``role``."""
    def deco(cls: type) -> type:
        return registry(role).register(name, cls, override=override)
    return deco


def make_params(cls: type, params: Mapping[str, Any], what: str):
    """Build ``cls.Params`` from a mapping, naming unknown keys and the valid ones."""
    params_cls = getattr(cls, "Params", None)
    if params_cls is None:
        if params:
            raise ConfigError(f"{what} takes no parameters, got: {', '.join(params)}")
        return None
    valid = [f.name for f in dataclasses.fields(params_cls)]
    for key in params:
        if key not in valid:
            raise unknown_name(f"parameter of {what}", key, valid)
    try:
        return params_cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what}: {exc}") from None


_loaded = False


def load_plugins() -> None:
    """Import the built-in policies and every ``ndpsched.policies`` entry point (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module(BUILTIN_MODULE)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.value == BUILTIN_MODULE:
            continue
        try:
            ep.load()
        except Exception as exc:  # a broken plug-in must not break ndpsched itself
            log.warning("could not load ndpsched policy plug-in %r (%s): %s", ep.name, ep.value, exc)
