"""Hermes' ablation: random placement -> offline partition -> + online adjustment -> + window
remapping, and predictor variants, with each step's speed-up over the previous one."""
from __future__ import annotations

from typing import Any

from .config import PolicySpec, RunConfig
from .presets import load_model
from .registry import registry
from .run import simulate
from .tracegen import synthetic_trace

#: (step label, policies) in the order of Hermes' ablation (Fig. 14 structure)
PLACEMENT_STEPS: list[tuple[str, dict[str, PolicySpec]]] = [
    ("random placement", {"partition": PolicySpec("random"), "balancer": PolicySpec("random")}),
    ("+ offline partition (ILP)", {"partition": PolicySpec("hermes.ilp"), "balancer": PolicySpec("static")}),
    ("+ online adjustment", {"partition": PolicySpec("hermes.adjust"), "balancer": PolicySpec("static")}),
    ("+ window remapping", {"partition": PolicySpec("hermes.adjust"), "balancer": PolicySpec("hermes.window")}),
]
#: predictor variants, run with the full placement (only if hermes.fsm is registered)
PREDICTOR_STEPS: list[tuple[str, dict[str, Any]]] = [
    ("predictor: token-wise only", {"mode": "token"}),
    ("predictor: layer-wise only", {"mode": "layer"}),
    ("predictor: token + layer", {"mode": "both"}),
]


def run_ablation(model: str, batches: list[int], traces: list[str], prompt_len: int = 128, gen_len: int = 128,
                 seed: int = 0, gpu: str = "rtx4090", dimms: int = 8, progress: bool = False) -> list[dict[str, Any]]:
    """One row per (trace, batch, step): MLP-block latency, tokens/s, DIMM imbalance, speed-ups."""
    spec = load_model(model)
    rows: list[dict[str, Any]] = []
    for source in traces:
        trace = synthetic_trace(spec, prompt_len + gen_len, max(batches), source=source, seed=seed)
        for batch in batches:
            sub = trace if trace.n_seqs == batch else trace.sequences(range(batch))
            steps = [(label, dict(policies, predictor=PolicySpec("oracle"))) for label, policies in PLACEMENT_STEPS]
            if "hermes.fsm" in registry("predictor"):
                full = PLACEMENT_STEPS[-1][1]
                steps += [(label, dict(full, predictor=PolicySpec("hermes.fsm", params))) for label, params in PREDICTOR_STEPS]
            prev = None
            for label, policies in steps:
                cfg = RunConfig(system="hermes", model=model, gpu=gpu, dimms=dimms, batch=batch, prompt_len=prompt_len,
                                gen_len=gen_len, seed=seed, trace=source, **policies)
                r = simulate(cfg, trace=sub, progress=progress)
                mlp_ms = 1e3 * r.stage_s["ffn"] / gen_len
                row = {
                    "trace": source, "model": model, "batch": batch, "step": label,
                    "partition": policies["partition"].name, "balancer": policies["balancer"].name,
                    "predictor": policies["predictor"].name,
                    "mlp_ms_per_token": mlp_ms, "decode_ms_per_token": 1e3 * r.decode_s / gen_len,
                    "tokens_per_s": r.tokens_per_s, "dimm_imbalance": r.dimm_imbalance,
                    "hot_fraction": r.hot_fraction, "moves": r.moves,
                    "mlp_speedup_vs_prev": None, "tokens_per_s_speedup_vs_prev": None,
                }
                if prev is not None and label.startswith("+"):
                    row["mlp_speedup_vs_prev"] = prev["mlp_ms_per_token"] / mlp_ms
                    row["tokens_per_s_speedup_vs_prev"] = r.tokens_per_s / prev["tokens_per_s"]
                row.update({f"predictor_{k}": v for k, v in r.predictor.items()})
                rows.append(row)
                if label.startswith("+") or prev is None:
                    prev = row
    return rows
