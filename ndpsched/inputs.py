"""What a run consumes besides the machine: its policies (the system's, with the config's
per-role overrides) and its activation trace (a generator, a fit of a recording, or a file).
Shared by the trace-driven simulator (:mod:`ndpsched.run`) and the analytic mode."""
from __future__ import annotations

from pathlib import Path

from .config import ROLES, PolicySpec, RunConfig
from .errors import unknown_name
from .models import ModelSpec
from .systems import system_policies
from .trace import ActivationTrace
from .tracegen import FITTED_PREFIX, TRACE_GENERATORS, is_trace_generator, synthetic_trace


def resolve_policies(cfg: RunConfig) -> dict[str, PolicySpec]:
    """The system's policies with the config's per-role overrides applied.

    A role override with an empty name keeps the system's policy and merges the params.
    """
    specs = system_policies(cfg.system)
    for role in ROLES:
        override = getattr(cfg, role)
        if override is None:
            continue
        if override.name and override.name != specs[role].name:
            specs[role] = PolicySpec(override.name, dict(override.params))
        else:
            specs[role] = PolicySpec(specs[role].name, {**specs[role].params, **override.params})
    return specs


def load_trace(cfg: RunConfig, model: ModelSpec) -> ActivationTrace:
    """The activation trace a config names: a generator (``fitted:PARAMS.yaml`` included) or a
    ``.npz`` file of the model's shape (another shape is refused: ``ndpsched trace fit`` transfers
    a recording to any model)."""
    src = cfg.trace.source
    if src.startswith(FITTED_PREFIX):
        from .tracefit import trace_from_fit_file

        return trace_from_fit_file(src[len(FITTED_PREFIX):], model, cfg.prompt_len + cfg.gen_len, cfg.batch, cfg.seed)
    if is_trace_generator(src):
        return synthetic_trace(model, cfg.prompt_len + cfg.gen_len, cfg.batch, source=src,
                               top20_share=cfg.trace.top20_share, token_overlap=cfg.trace.token_overlap,
                               seed=cfg.seed)
    if not src.endswith(".npz") and not Path(src).exists():
        raise unknown_name("trace generator (or an existing .npz file)", src, TRACE_GENERATORS)
    trace = ActivationTrace.load(src)
    trace.check_model(model)
    return trace
