"""Measured GPU profiles: schema, loading, interpolation, and comparison with the roofline.

A profile is the JSON written by ``ndpsched calibrate gpu`` (see :mod:`ndpsched.calibrate`)::

    {"schema": "ndpsched.gpu_profile", "schema_version": 1,
     "gpu": {"name": "NVIDIA H100 80GB HBM3", "preset": "h100", ...},
     "provenance": {"date": ..., "driver": ..., "cuda": ..., "torch": ..., ...},
     "launch": {"device_us": ..., "host_us": ..., "launch_sync_us": ...},
     "families": {"dense_gemv": {"x_name": "weight_bytes", "x": [...], "batch": [1, 2, 4, 8, 16],
                                 "time_us": [[...] per batch], "impl": "..."}, ...}}

Each family is a grid of median times ``time_us[batch_index][x_index]``; :meth:`GpuProfile.lookup_s`
interpolates it log-log (bilinear in log x and log batch) and returns NaN outside the measured
range, where the caller falls back to the roofline. A family measured at one batch only
(``h2d``) ignores the batch argument. ``prefill`` is measured at :data:`PREFILL_PROMPT_TOKENS`
tokens per prompt, its batch axis counting prompts.

Pure numpy: the core never imports torch.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ProfileError, unknown_name
from .hardware import GB, GpuSpec, PcieSpec

SCHEMA = "ndpsched.gpu_profile"
SCHEMA_VERSION = 1

#: family -> (x axis name, what the cost model uses it for)
FAMILIES: dict[str, tuple[str, str]] = {
    "dense_gemv": ("weight_bytes", "W_o projection and LM head (dense GEMV / small-batch GEMM)"),
    "gather_gemv": ("gathered_bytes", "sparse QKV stage on the GPU (gathered-row GEMV)"),
    "sparse_ffn": ("gathered_bytes", "sparse FFN stage on the GPU (gate/up rows + down columns)"),
    "attention": ("kv_bytes_per_seq", "decode attention on the GPU (Hermes runs it on the DIMMs: reported only)"),
    "prefill": ("layer_weight_bytes", "prefill compute of one layer (batch = prompts of 128 tokens)"),
    "h2d": ("bytes", "PCIe host->device copies (prefill weight streaming, hot-neuron copies)"),
}
LAUNCH_KEYS = ("device_us", "host_us", "launch_sync_us")
#: prompt length of the prefill table (Hermes' evaluation prompt); other lengths use the roofline
PREFILL_PROMPT_TOKENS = 128


@dataclass(frozen=True)
class Table:
    """One kernel family's grid: ``time_us[i, j]`` at batch ``batch[i]`` and size ``x[j]``."""

    x_name: str
    x: np.ndarray          # (X,) strictly increasing, > 0
    batch: np.ndarray      # (B,) strictly increasing, >= 1
    time_us: np.ndarray    # (B, X) > 0
    impl: str = ""

    def lookup_s(self, x, batch=1.0) -> np.ndarray:
        """Interpolated time in seconds; NaN where ``x`` or ``batch`` lies outside the grid.

        Bilinear in (log batch, log x) on log time, i.e. a power law between grid points.
        Args broadcast against each other (any shape).
        """
        x = np.asarray(x, dtype=np.float64)
        lx = np.log(np.maximum(x, 1e-300))
        gx = np.log(self.x)
        lt = np.log(self.time_us)
        inside = (x >= self.x[0] * (1 - 1e-9)) & (x <= self.x[-1] * (1 + 1e-9))
        if len(self.batch) == 1:
            out = np.interp(lx, gx, lt[0])
            return np.where(inside, np.exp(out) * 1e-6, np.nan)
        b = np.asarray(batch, dtype=np.float64)
        lb = np.log(np.maximum(b, 1e-300))
        gb = np.log(self.batch)
        inside = inside & (b >= self.batch[0] * (1 - 1e-9)) & (b <= self.batch[-1] * (1 + 1e-9))
        lx, lb = np.broadcast_arrays(lx, lb)
        i = np.clip(np.searchsorted(gb, lb, side="right") - 1, 0, len(gb) - 2)
        j = np.clip(np.searchsorted(gx, lx, side="right") - 1, 0, len(gx) - 2)
        wb = np.clip((lb - gb[i]) / (gb[i + 1] - gb[i]), 0.0, 1.0)
        wx = np.clip((lx - gx[j]) / (gx[j + 1] - gx[j]), 0.0, 1.0) if len(gx) > 1 else np.zeros_like(lx)
        j1 = np.minimum(j + 1, len(gx) - 1)
        out = ((1 - wb) * ((1 - wx) * lt[i, j] + wx * lt[i, j1])
               + wb * ((1 - wx) * lt[i + 1, j] + wx * lt[i + 1, j1]))
        return np.where(inside, np.exp(out) * 1e-6, np.nan)


@dataclass(frozen=True)
class GpuProfile:
    """A validated measured profile of one GPU (see the module docstring for the file format)."""

    gpu_name: str
    preset: str
    tables: Mapping[str, Table]
    launch: Mapping[str, float]
    provenance: Mapping[str, Any]
    source: str = ""

    def lookup_s(self, family: str, x, batch=1.0, fallback=None):
        """Measured time (s) of ``family`` at size ``x`` and ``batch``; ``fallback`` where unmeasured.

        Args:
            family: one of :data:`FAMILIES`.
            x: size on the family's axis (bytes or FLOPs), any shape.
            batch: sequences (may be fractional: active rows x batch / union, see the cost model).
            fallback: roofline time(s) used outside the measured range (or where the family is
                absent); broadcast with ``x``. None leaves NaN there.
        """
        table = self.tables.get(family)
        if table is None:
            t = np.full(np.broadcast(np.asarray(x), np.asarray(batch)).shape, np.nan)
        else:
            t = table.lookup_s(x, batch)
        if fallback is None:
            return t
        return np.where(np.isnan(t), fallback, t)

    def check_gpu(self, gpu_preset: str) -> None:
        """Raise ProfileError if this profile was measured for another GPU preset than ``gpu_preset``."""
        if self.preset and self.preset != gpu_preset:
            raise ProfileError(f"GPU profile {self.source or ''} was measured on '{self.gpu_name}' (preset "
                               f"'{self.preset}') but the run uses GPU preset '{gpu_preset}'; pass --gpu {self.preset}")


def _fail(source: str, what: str) -> ProfileError:
    return ProfileError(f"GPU profile {source}: {what}")


def _float_array(value: Any, source: str, where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise _fail(source, f"{where} must be a list of numbers") from None
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise _fail(source, f"{where} must be a non-empty list of finite numbers")
    return arr


def parse_profile(data: Any, source: str = "<dict>") -> GpuProfile:
    """Validate a profile mapping (the parsed JSON) and build a :class:`GpuProfile`.

    Raises:
        ProfileError: naming the first problem (wrong schema or version, a missing key, a table
            whose shape, ordering or values are wrong, an unknown family).
    """
    if not isinstance(data, Mapping):
        raise _fail(source, f"must be a JSON object, got {type(data).__name__}")
    if data.get("schema") != SCHEMA:
        raise _fail(source, f"is not an ndpsched GPU profile (schema {data.get('schema')!r}, expected {SCHEMA!r})")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise _fail(source, f"has schema_version {version!r}; this ndpsched reads version {SCHEMA_VERSION} "
                            f"(re-run `ndpsched calibrate gpu`)")
    for key in ("gpu", "provenance", "families"):
        if not isinstance(data.get(key), Mapping):
            raise _fail(source, f"lacks the '{key}' object")
    gpu = data["gpu"]
    if not isinstance(gpu.get("name"), str) or not gpu["name"]:
        raise _fail(source, "gpu.name must be a non-empty string")
    tables: dict[str, Table] = {}
    for name, fam in data["families"].items():
        if name not in FAMILIES:
            raise unknown_name(f"family in GPU profile {source}", name, FAMILIES)
        where = f"family '{name}'"
        if not isinstance(fam, Mapping):
            raise _fail(source, f"{where} must be an object")
        for key in ("x_name", "x", "batch", "time_us"):
            if key not in fam:
                raise _fail(source, f"{where} lacks '{key}'")
        if fam["x_name"] != FAMILIES[name][0]:
            raise _fail(source, f"{where} has x_name {fam['x_name']!r}, expected {FAMILIES[name][0]!r}")
        x = _float_array(fam["x"], source, f"{where} x")
        batch = _float_array(fam["batch"], source, f"{where} batch")
        t = _float_array(fam["time_us"], source, f"{where} time_us")
        if x.ndim != 1 or batch.ndim != 1:
            raise _fail(source, f"{where}: x and batch must be flat lists")
        if t.shape != (batch.size, x.size):
            raise _fail(source, f"{where}: time_us has shape {t.shape}, expected (len(batch), len(x)) = "
                                f"({batch.size}, {x.size})")
        if np.any(x <= 0) or np.any(np.diff(x) <= 0):
            raise _fail(source, f"{where}: x must be positive and strictly increasing")
        if np.any(batch < 1) or np.any(np.diff(batch) <= 0):
            raise _fail(source, f"{where}: batch must be >= 1 and strictly increasing")
        if np.any(t <= 0):
            raise _fail(source, f"{where}: time_us must be positive")
        if name == "prefill" and fam.get("prompt_tokens") != PREFILL_PROMPT_TOKENS:
            raise _fail(source, f"{where}: prompt_tokens must be {PREFILL_PROMPT_TOKENS}, got {fam.get('prompt_tokens')!r}")
        tables[name] = Table(x_name=fam["x_name"], x=x, batch=batch, time_us=t, impl=str(fam.get("impl", "")))
    launch: dict[str, float] = {}
    if "launch" in data:
        raw = data["launch"]
        if not isinstance(raw, Mapping):
            raise _fail(source, "launch must be an object")
        for key in LAUNCH_KEYS:
            value = raw.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise _fail(source, f"launch.{key} must be a positive number, got {value!r}")
            launch[key] = float(value)
    return GpuProfile(gpu_name=gpu["name"], preset=str(gpu.get("preset") or ""), tables=tables, launch=launch,
                      provenance=dict(data["provenance"]), source=source)


#: folder of the profiles shipped in the package
SHIPPED_DIR = "data"


def shipped_profiles() -> list[str]:
    """File names of the profiles shipped under ``ndpsched/data/`` (``*.gpuprofile.json``)."""
    folder = resources.files("ndpsched").joinpath(SHIPPED_DIR)
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".gpuprofile.json"))


@functools.lru_cache(maxsize=16)
def load_profile(name_or_path: str) -> GpuProfile:
    """Load and validate a profile: a shipped file name (see :func:`shipped_profiles`) or a path.

    Cached: the cost model asks for the same file once per run.

    Raises:
        ProfileError: the file is missing, not JSON, or not a valid profile.
    """
    shipped = resources.files("ndpsched").joinpath(SHIPPED_DIR, name_or_path)
    if "/" not in name_or_path and shipped.is_file():
        text, source = shipped.read_text(), f"'{name_or_path}' (shipped)"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            valid = ", ".join(shipped_profiles()) or "none"
            raise ProfileError(f"GPU profile '{name_or_path}' is not a file nor a shipped profile ({valid})")
        source = f"'{path}'"
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileError(f"GPU profile {source} cannot be read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"GPU profile {source} is not valid JSON: {exc}") from None
    return parse_profile(data, source)


def profile_for(gpu: GpuSpec) -> GpuProfile | None:
    """The profile a GPU spec names (``GpuSpec.profile``), checked against its preset; None if none."""
    if not gpu.profile:
        return None
    prof = load_profile(gpu.profile)
    prof.check_gpu(gpu.name)
    return prof


# ---- the roofline the cost model falls back to, per family ---------------------------------------
#: kernels the cost model charges per family (CostParams defaults: QKV 1, FFN 2; prefill 6 per layer)
ROOFLINE_KERNELS = {"dense_gemv": 1, "gather_gemv": 1, "sparse_ffn": 2, "attention": 1, "prefill": 6, "h2d": 0}


def roofline_s(family: str, gpu: GpuSpec, pcie: PcieSpec, x, batch=1.0) -> np.ndarray:
    """The roofline time (s) the cost model uses for ``family`` at size ``x`` and ``batch``.

    The same formulas as :class:`ndpsched.costmodel.CostModel` (a test keeps them equal):
    ``max(bytes / (peak bw x efficiency), FLOPs / (peak x compute_efficiency)) + kernels x overhead``;
    a weight byte is half an fp16 weight, so a GEMV does ``bytes x batch`` FLOPs (2 per weight).
    """
    x = np.asarray(x, dtype=np.float64)
    b = np.asarray(batch, dtype=np.float64)
    flops_rate = gpu.fp16_tflops * 1e12 * gpu.compute_efficiency
    kernel_s = ROOFLINE_KERNELS[family] * gpu.kernel_overhead_us * 1e-6
    if family == "dense_gemv":
        bw = gpu.memory_bw_gbps * GB * gpu.dense_bw_efficiency
        return np.maximum(x / bw, x * b / flops_rate) + kernel_s
    if family == "attention":
        # x = K+V bytes of one sequence, each sequence reads its own: memory bound (the dense
        # baselines' GPU layer prices the KV read the same way, ndpsched.baselines._Dense)
        return x * b / (gpu.memory_bw_gbps * GB * gpu.dense_bw_efficiency) + kernel_s
    if family in ("gather_gemv", "sparse_ffn"):
        bw = gpu.memory_bw_gbps * GB * gpu.sparse_bw_efficiency
        return np.maximum(x / bw, x * b / flops_rate) + kernel_s
    if family == "prefill":
        # x = weight bytes of one layer; 2 FLOPs per weight per token (attention's share at 128
        # tokens is < 0.3 % and left out here; CostModel.prefill_cost counts it)
        return x * PREFILL_PROMPT_TOKENS * b / flops_rate + kernel_s
    if family == "h2d":
        return x / (pcie.bw_gbps * GB)
    raise unknown_name("GPU profile family", family, FAMILIES)


def compare_profile(profile: GpuProfile, gpu: GpuSpec, pcie: PcieSpec) -> list[dict[str, Any]]:
    """Per family: median and worst relative error of the roofline against the measured table.

    Error = (roofline - measured) / measured, over every grid point; ``worst`` is the point with
    the largest absolute error (signed: negative = the roofline is too optimistic).
    """
    rows = []
    for name in FAMILIES:
        table = profile.tables.get(name)
        if table is None:
            continue
        bb, xx = np.meshgrid(table.batch, table.x, indexing="ij")
        meas = table.time_us * 1e-6
        roof = roofline_s(name, gpu, pcie, xx, bb)
        err = (roof - meas) / meas
        k = int(np.argmax(np.abs(err)))
        rows.append({
            "family": name, "points": int(err.size),
            "median_abs_err": float(np.median(np.abs(err))), "median_err": float(np.median(err)),
            "worst_err": float(err.flat[k]), "worst_x": float(xx.flat[k]), "worst_batch": int(bb.flat[k]),
            "x_name": table.x_name, "x_range": [float(table.x[0]), float(table.x[-1])],
        })
    if profile.launch:
        meas = profile.launch["device_us"]
        rows.append({"family": "launch", "points": 1, "median_abs_err": abs(gpu.kernel_overhead_us - meas) / meas,
                     "median_err": (gpu.kernel_overhead_us - meas) / meas,
                     "worst_err": (gpu.kernel_overhead_us - meas) / meas, "worst_x": 0.0, "worst_batch": 1,
                     "x_name": "kernel_overhead_us", "x_range": [meas, meas]})
    return rows


def fit_roofline(profile: GpuProfile, gpu: GpuSpec, pcie: PcieSpec) -> dict[str, float]:
    """Roofline parameters that best reproduce the measured tables (least squares in log time).

    Fits, at batch 1 (memory bound): ``time = overhead + bytes / bw`` on ``dense_gemv`` (giving
    ``kernel_overhead_us`` and ``dense_bw_efficiency``) and ``time = kernels x overhead + bytes / bw``
    on ``gather_gemv`` and ``sparse_ffn`` together (giving ``sparse_bw_efficiency``); ``compute_efficiency`` from the prefill points
    (achieved FLOP/s over peak, median of the largest half); PCIe ``efficiency`` from the largest
    ``h2d`` copies. Only families present in the profile contribute.
    """
    from scipy.optimize import least_squares

    out: dict[str, float] = {}

    def fit_line(table: Table, fixed_overhead_s: float | None = None) -> tuple[float, float]:
        x, t = table.x, table.time_us[0] * 1e-6

        def resid(p):
            ov = fixed_overhead_s if fixed_overhead_s is not None else np.exp(p[1])
            return np.log(ov + x / np.exp(p[0])) - np.log(t)

        p0 = [np.log(x[-1] / t[-1]), np.log(max(t[0], 1e-7))]
        res = least_squares(resid, p0 if fixed_overhead_s is None else p0[:1])
        bw = float(np.exp(res.x[0]))
        ov = fixed_overhead_s if fixed_overhead_s is not None else float(np.exp(res.x[1]))
        return bw, ov

    peak_bw = gpu.memory_bw_gbps * GB
    overhead_s = None
    if "dense_gemv" in profile.tables:
        bw, overhead_s = fit_line(profile.tables["dense_gemv"])
        out["dense_bw_efficiency"] = bw / peak_bw
        out["kernel_overhead_us"] = overhead_s * 1e6
    sparse = [(profile.tables[f], ROOFLINE_KERNELS[f]) for f in ("gather_gemv", "sparse_ffn") if f in profile.tables]
    if sparse:
        # one bandwidth for both sparse families (the cost model has one sparse_bw_efficiency),
        # each with its kernel count at the dense fit's per-kernel overhead
        ov = overhead_s if overhead_s is not None else gpu.kernel_overhead_us * 1e-6

        def resid(p):
            return np.concatenate([np.log(n * ov + t.x / np.exp(p[0])) - np.log(t.time_us[0] * 1e-6)
                                   for t, n in sparse])

        res = least_squares(resid, [np.log(0.7 * peak_bw)])
        out["sparse_bw_efficiency"] = float(np.exp(res.x[0])) / peak_bw
    if "prefill" in profile.tables:
        tab = profile.tables["prefill"]
        bb, xx = np.meshgrid(tab.batch, tab.x, indexing="ij")
        achieved = np.sort((xx * PREFILL_PROMPT_TOKENS * bb / (tab.time_us * 1e-6)).ravel())
        out["compute_efficiency"] = float(np.median(achieved[len(achieved) // 2:])) / (gpu.fp16_tflops * 1e12)
    if "h2d" in profile.tables:
        tab = profile.tables["h2d"]
        big = tab.x >= 2**26
        if big.any():
            out["pcie_efficiency"] = float(np.median(tab.x[big] / (tab.time_us[0][big] * 1e-6))) / (pcie.peak_bw_gbps * GB)
    return out
