"""Model specifications: transformer shapes, precision, activation sparsity, derived sizes.

A *neuron* (Hermes, PowerInfer) is the unit that is either active or not for a token:

- an **FFN neuron** i is row i of the up (and gate) matrix and column i of the down matrix;
- a **QKV neuron** i is input dimension i of the fused Q/K/V projection (row i of W_qkv^T),
  sparse because Hermes inserts a ReLU before QKV.

Every layer has ``d_model`` QKV neurons and ``d_ffn`` FFN neurons.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

#: bytes per element of the precisions ndpsched prices (int4, int8, fp16/bf16, fp32)
BYTES_PER_ELEMENT = {0.5: "int4", 1: "int8", 2: "fp16", 4: "fp32"}
#: precision names accepted by ``--weight-dtype`` / ``--kv-dtype``
DTYPE_BYTES = {"int4": 0.5, "int8": 1, "fp16": 2, "bf16": 2, "fp32": 4}

#: neuron kinds, in the order they appear inside a layer of the global neuron index
KIND_QKV = 0
KIND_FFN = 1
KIND_NAMES = ("qkv", "ffn")


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and sparsity of a decoder-only transformer."""

    name: str
    n_layers: int
    d_model: int
    d_ffn: int
    gated: bool
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    #: bytes per weight: 2 (fp16/bf16), 1 (int8), 0.5 (int4)
    weight_bytes: float = 2
    mlp_sparsity: float = 0.9
    qkv_sparsity: float = 0.9
    tied_embeddings: bool = False
    #: bytes per stored KV-cache element (FP16 unless quantized)
    kv_bytes: float = 2
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "d_ffn", "n_heads", "n_kv_heads", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model {self.name!r}: {name} must be a positive integer, got {value!r}")
        for name in ("weight_bytes", "kv_bytes"):
            if getattr(self, name) not in BYTES_PER_ELEMENT:
                raise ConfigError(f"model {self.name!r}: {name} must be one of {sorted(BYTES_PER_ELEMENT)} "
                                  f"(int4, int8, fp16, fp32), got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model {self.name!r}: d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model {self.name!r}: n_heads {self.n_heads} not divisible by n_kv_heads {self.n_kv_heads}")
        for name in ("mlp_sparsity", "qkv_sparsity"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ConfigError(f"model {self.name!r}: {name} must be in [0, 1), got {value!r}")

    # ---- shapes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def qkv_out_dim(self) -> int:
        """Output width of the fused QKV projection: d_model + 2 x n_kv_heads x head_dim."""
        return self.d_model + 2 * self.n_kv_heads * self.head_dim

    @property
    def neurons_per_layer(self) -> int:
        return self.d_model + self.d_ffn

    @property
    def n_neurons(self) -> int:
        """Neurons of all layers (QKV + FFN), the length of the global neuron index."""
        return self.n_layers * self.neurons_per_layer

    # ---- sizes in bytes -------------------------------------------------------------------
    @property
    def qkv_neuron_bytes(self) -> int:
        """Bytes of one QKV neuron: one input row of W_q, W_k and W_v."""
        return self.qkv_out_dim * self.weight_bytes

    @property
    def ffn_neuron_bytes(self) -> int:
        """Bytes of one FFN neuron: up (+ gate) row and down column."""
        return (3 if self.gated else 2) * self.d_model * self.weight_bytes

    @property
    def neuron_bytes(self) -> tuple[int, int]:
        """(qkv, ffn) bytes per neuron, indexed by KIND_QKV / KIND_FFN."""
        return (self.qkv_neuron_bytes, self.ffn_neuron_bytes)

    @property
    def neuron_macs(self) -> tuple[int, int]:
        """(qkv, ffn) multiply-accumulates per active neuron per token (one MAC per weight)."""
        return (self.qkv_out_dim, (3 if self.gated else 2) * self.d_model)

    @property
    def proj_bytes_per_layer(self) -> int:
        """Attention output projection W_o (dense, always on the GPU)."""
        return self.d_model * self.d_model * self.weight_bytes

    @property
    def sparse_bytes_per_layer(self) -> int:
        """QKV + FFN weights of one layer (the part split between GPU and DIMMs)."""
        return self.d_model * self.qkv_neuron_bytes + self.d_ffn * self.ffn_neuron_bytes

    @property
    def layer_bytes(self) -> int:
        return self.sparse_bytes_per_layer + self.proj_bytes_per_layer

    @property
    def embedding_bytes(self) -> int:
        return self.vocab_size * self.d_model * self.weight_bytes

    @property
    def lm_head_bytes(self) -> int:
        return self.embedding_bytes

    @property
    def total_bytes(self) -> int:
        """All weights (embedding and LM head counted once if tied)."""
        heads = self.embedding_bytes * (1 if self.tied_embeddings else 2)
        return self.n_layers * self.layer_bytes + heads

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token adds over all layers: 2 (K, V) x layers x kv_heads x head_dim."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.kv_bytes

    @property
    def kv_bytes_per_token_layer(self) -> float:
        return self.kv_bytes_per_token / self.n_layers

    @property
    def active_fraction(self) -> tuple[float, float]:
        """(qkv, ffn) mean fraction of neurons active per token (1 - sparsity)."""
        return (1.0 - self.qkv_sparsity, 1.0 - self.mlp_sparsity)

    @property
    def n_params_per_layer(self) -> int:
        """Weights of one decoder layer (QKV, W_o, FFN), independent of their precision."""
        return (self.d_model * self.qkv_out_dim + self.d_model * self.d_model
                + self.d_ffn * (3 if self.gated else 2) * self.d_model)

    @property
    def n_params(self) -> int:
        """Weights of the model (independent of their precision)."""
        return self.n_layers * self.n_params_per_layer + self.vocab_size * self.d_model * (1 if self.tied_embeddings else 2)
