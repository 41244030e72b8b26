"""Measure the GPU side of the execution model on a real GPU (``ndpsched calibrate gpu``).

Every kernel family the cost model prices on the GPU is timed over a grid of sizes and batch
1-16, and written to a profile (schema and interpolation in :mod:`ndpsched.gpuprofile`):

==============  ===================================================================  ==================
family          what runs                                                            table axis x
==============  ===================================================================  ==================
dense_gemv      ``W (n, d) fp16 @ X (d, b)`` with cuBLAS (W_o, LM head), 0.5 MiB-1 GiB   weight bytes
gather_gemv     k gathered rows of W (16384, 4096): ``W[idx] @ X`` (sparse QKV)      gathered bytes
sparse_ffn      one ReLU FFN decode step at llama2-70b width (d 8192, d_ffn 28672):     gathered bytes
                gate/up on the k active rows, ReLU(gate) * up, down on the k columns
attention       decode attention, llama2-70b heads (64 query / 8 KV heads, dim 128)   KV bytes per seq.
prefill         one decoder layer over b prompts of 128 tokens (relullama-7b,          layer weight bytes
                llama2-13b and llama2-70b widths)
h2d             pinned host -> device copy                                            bytes
==============  ===================================================================  ==================

plus the launch latency of a minimal kernel (on the device, back to back; on the host; and
launch + synchronise round trip).

Method (as ``triton.testing.do_bench`` and the CUDA best-practices guide): CUDA events around
each repetition; a ``torch.cuda._sleep`` kernel queued before each repetition so that the host
has enqueued the whole repetition before the GPU reaches it (the events then time the device,
not Python); inputs rotated over enough copies that each repetition reads memory that is not in
L2; warm-up repetitions first; the median over repetitions is stored.

The sparse kernels are Triton kernels (a gathered-row GEMV split over the input dimension, gate
and up in one pass, and a gathered-row transposed GEMV with split-k for the down projection that
applies ReLU(gate) x up on load), checked against a
``torch.index_select`` reference before timing; without Triton, or if the check fails, the
reference itself (gather then GEMM) is timed and the profile says so.

torch (and Triton) are imported inside the functions: the ndpsched core never needs them.
"""
from __future__ import annotations

import datetime
import logging
import math
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import NdpschedError
from .gpuprofile import SCHEMA, SCHEMA_VERSION

log = logging.getLogger(__name__)

#: batch sizes of the decode tables (Hermes evaluates batch 1-16)
BATCHES = (1, 2, 4, 8, 16)
#: fp16 weights and activations throughout (the papers' precision)
ELEM_BYTES = 2


class CalibrationError(NdpschedError, RuntimeError):
    """The calibration cannot run here (no torch, no CUDA device)."""


def _torch():
    try:
        import torch
    except ImportError:
        raise CalibrationError("ndpsched calibrate gpu needs torch with CUDA (pip install torch)") from None
    if not torch.cuda.is_available():
        raise CalibrationError("ndpsched calibrate gpu needs a CUDA GPU; torch.cuda.is_available() is False")
    return torch


def cuda_unavailable_reason() -> str | None:
    """None when the calibration can run here, else why not (used to skip tests)."""
    try:
        _torch()
    except CalibrationError as exc:
        return str(exc)
    return None


# ---- timing -----------------------------------------------------------------------------------
class _Timer:
    """Median device time of a callable with CUDA events, warm-up and a host-lead cushion."""

    def __init__(self, torch, reps: int, warmup: int) -> None:
        self.torch = torch
        self.reps = reps
        self.warmup = warmup
        props = torch.cuda.get_device_properties(0)
        # clock in kHz where torch exposes it; 1.98 GHz (H100 SXM boost) otherwise
        clock_khz = getattr(props, "clock_rate", 0) or 1_980_000
        self.cycles_per_us = clock_khz / 1000.0
        self.has_sleep = hasattr(torch.cuda, "_sleep")

    def cushion(self, us: float) -> None:
        """Queue a spin kernel so the host runs ahead of the device by about ``us``."""
        if self.has_sleep:
            self.torch.cuda._sleep(int(us * self.cycles_per_us))

    def median_us(self, fn: Callable[[int], Any], cushion_us: float = 100.0, reps: int | None = None) -> float:
        """Median over repetitions of the device time of ``fn(i)`` (i = repetition index), in us."""
        torch = self.torch
        reps = reps or self.reps
        for i in range(self.warmup):
            fn(i)
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            self.cushion(cushion_us)
            starts[i].record()
            fn(i)
            ends[i].record()
        torch.cuda.synchronize()
        return float(np.median([s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]))


def _n_copies(nbytes: float, l2_bytes: float, cap: int = 1024) -> int:
    """Copies to rotate so that consecutive repetitions touch 4 x L2 of distinct memory."""
    return int(min(cap, max(2, math.ceil(4 * l2_bytes / max(nbytes, 1)))))


def _geomspace_int(lo: int, hi: int, n: int, multiple: int = 1) -> list[int]:
    vals = np.geomspace(lo, hi, n)
    return sorted({max(multiple, int(round(v / multiple)) * multiple) for v in vals})


# ---- Triton kernels (defined lazily: Triton is optional even where torch is present) ------------
_KERNELS: dict[str, Any] = {}


def _triton_kernels() -> dict[str, Any]:
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def gather_rows(w1_ptr, w2_ptr, idx_ptr, x_ptr, y1_ptr, y2_ptr, k, d, d_per_prog,
                    GATED: tl.constexpr, BP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        # y1[j, :] += W1[idx[j], D] @ X[D, :] over this program's slice D of the input dimension
        # (split-D with fp32 atomics, so that a few active rows still fill the GPU); also y2 with
        # W2 when GATED (gate and up of the same active rows share the loads of X)
        pid = tl.program_id(0)
        pid_d = tl.program_id(1)
        offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k
        rows = tl.load(idx_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
        offs_b = tl.arange(0, BP)
        acc1 = tl.zeros((BLOCK_K, BP), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_K, BP), dtype=tl.float32)
        d_start = pid_d * d_per_prog
        for d0 in range(d_start, d_start + d_per_prog, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_ptr + offs_d[:, None] * BP + offs_b[None, :])
            w = tl.load(w1_ptr + rows[:, None] * d + offs_d[None, :], mask=mask_k[:, None], other=0.0)
            acc1 += tl.dot(w, x)
            if GATED:
                w2 = tl.load(w2_ptr + rows[:, None] * d + offs_d[None, :], mask=mask_k[:, None], other=0.0)
                acc2 += tl.dot(w2, x)
        out = offs_k[:, None] * BP + offs_b[None, :]
        tl.atomic_add(y1_ptr + out, acc1, mask=mask_k[:, None])
        if GATED:
            tl.atomic_add(y2_ptr + out, acc2, mask=mask_k[:, None])

    @triton.jit
    def gather_axpy(wt_ptr, idx_ptr, g_ptr, u_ptr, y_ptr, k, d, k_per_prog,
                    GATED: tl.constexpr, BP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        # y[:, b] += sum_j h[j, b] * WT[idx[j], :] over this program's slice of j (split-k, atomics),
        # h = relu(g) * u computed on load when GATED (the FFN's activation, fused)
        pid_d = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_b = tl.arange(0, BP)
        acc = tl.zeros((BLOCK_D, BP), dtype=tl.float32)
        k_start = pid_k * k_per_prog
        for k0 in range(k_start, k_start + k_per_prog, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k
            rows = tl.load(idx_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
            w = tl.load(wt_ptr + rows[None, :] * d + offs_d[:, None], mask=mask_k[None, :], other=0.0)
            hk = offs_k[:, None] * BP + offs_b[None, :]
            h = tl.load(g_ptr + hk, mask=mask_k[:, None], other=0.0)
            if GATED:
                h = tl.maximum(h, 0.0) * tl.load(u_ptr + hk, mask=mask_k[:, None], other=0.0)
            acc += tl.dot(w, h.to(tl.float16))
        tl.atomic_add(y_ptr + offs_d[:, None] * BP + offs_b[None, :], acc)

    _KERNELS.update(gather_rows=gather_rows, gather_axpy=gather_axpy, triton_version=triton.__version__)
    return _KERNELS


#: Triton tile sizes: BP = batch padded to the smallest tl.dot width
_BP, _BLOCK_K, _BLOCK_D = 16, 32, 128


#: most programs that add into one output tile: more contend on the fp32 atomics (a first H100 run
#: with up to 64 showed 20-200 us medians, bimodal, for a step that reads 6 MB)
_MAX_SPLIT = 8


def _split(n_blocks: int, programs: int, n_sm: int) -> int:
    """Power-of-two split of ``n_blocks`` tiles towards one program per SM, at most :data:`_MAX_SPLIT`."""
    want = max(1, triton_cdiv(n_sm, max(programs, 1)))
    split = 1
    while split * 2 <= min(want, n_blocks, _MAX_SPLIT) and n_blocks % (split * 2) == 0:
        split *= 2
    return split


def _gather_launch(torch, w1, w2, idx, x_pad, y1, y2, n_sm: int) -> None:
    k, d = idx.numel(), w1.shape[1]
    kprog = triton_cdiv(k, _BLOCK_K)
    split = _split(d // _BLOCK_D, kprog, n_sm)
    _triton_kernels()["gather_rows"][(kprog, split)](
        w1, w2 if w2 is not None else w1, idx, x_pad, y1, y2 if y2 is not None else y1, k, d, d // split,
        GATED=w2 is not None, BP=_BP, BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D)


def _gather_gemv(torch, impl: str, w, idx, x_pad, n_sm: int):
    """(k, BP): rows ``idx`` of ``w`` (n, d) times ``x_pad`` (d, BP) -- the sparse QKV stage."""
    if impl == "triton":
        y = torch.zeros((idx.numel(), _BP), device=w.device, dtype=torch.float32)
        _gather_launch(torch, w, None, idx, x_pad, y, None, n_sm)
        return y
    return torch.index_select(w, 0, idx) @ x_pad


def _sparse_ffn_step(torch, impl: str, gate, up, down_t, idx, x_pad, n_sm: int):
    """(d, BP): one sparse ReLU FFN step on the active neurons ``idx``.

    ``gate``, ``up`` (n, d) and ``down_t`` (n, d) (the down matrix stored transposed, so that a
    neuron's down weights are one contiguous row, as PowerInfer stores them).
    """
    k, d = idx.numel(), gate.shape[1]
    if impl == "triton":
        # one memset for every fp32 accumulator, then two kernels
        buf = torch.zeros((2 * k + d) * _BP, device=gate.device, dtype=torch.float32)
        g, u, y = buf[:k * _BP], buf[k * _BP:2 * k * _BP], buf[2 * k * _BP:]
        _gather_launch(torch, gate, up, idx, x_pad, g, u, n_sm)
        n_d = d // _BLOCK_D
        kblocks = triton_cdiv(k, _BLOCK_K)
        splits = max(1, min(kblocks, triton_cdiv(4 * n_sm, n_d)))
        k_per_prog = triton_cdiv(kblocks, splits) * _BLOCK_K
        _triton_kernels()["gather_axpy"][(n_d, triton_cdiv(k, k_per_prog))](
            down_t, idx, g, u, y, k, d, k_per_prog, GATED=True, BP=_BP, BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D)
        return y.view(d, _BP)
    h = torch.relu(torch.index_select(gate, 0, idx) @ x_pad) * (torch.index_select(up, 0, idx) @ x_pad)
    return torch.index_select(down_t, 0, idx).t() @ h


def triton_cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


def _pick_sparse_impl(torch, n_sm: int) -> tuple[str, str]:
    """'triton' if the Triton kernels run and match the torch reference, else 'torch' and why."""
    try:
        _triton_kernels()
    except Exception as exc:  # ImportError, or a Triton too old for this code
        return "torch", f"triton unavailable: {type(exc).__name__}: {exc}"[:200]
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        n, d, k = 1000, 512, 77
        w1, w2, wt = (torch.randn((n, d), device="cuda", dtype=torch.float16, generator=g) / 16 for _ in range(3))
        idx = torch.randperm(n, device="cuda", generator=g)[:k].sort().values
        x = torch.zeros((d, _BP), device="cuda", dtype=torch.float16)
        x[:, :3] = torch.randn((d, 3), device="cuda", dtype=torch.float16, generator=g)
        checks = (("gather", _gather_gemv(torch, "triton", w1, idx.int(), x, n_sm),
                   _gather_gemv(torch, "torch", w1.float(), idx, x.float(), n_sm)),
                  ("ffn", _sparse_ffn_step(torch, "triton", w1, w2, wt, idx.int(), x, n_sm),
                   _sparse_ffn_step(torch, "torch", w1.float(), w2.float(), wt.float(), idx, x.float(), n_sm)))
        for what, got, ref in checks:
            err = float((got.float() - ref).abs().max())
            if not err <= 2e-2 * max(1.0, float(ref.abs().max())):
                return "torch", f"triton {what} kernel disagrees with torch (max err {err:.3g})"
    except Exception as exc:
        return "torch", f"triton kernels failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    return "triton", ""


# ---- families ---------------------------------------------------------------------------------
class _Calibrator:
    def __init__(self, quick: bool, progress: bool, reps: int | None) -> None:
        self.torch = torch = _torch()
        self.quick = quick
        self.reps = reps or (25 if quick else 100)
        self.timer = _Timer(torch, self.reps, warmup=3 if quick else 10)
        props = torch.cuda.get_device_properties(0)
        self.props = props
        self.l2_bytes = float(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
        self.n_sm = int(props.multi_processor_count)
        self.dev = torch.device("cuda")
        self.progress = progress
        self.sparse_impl, self.sparse_impl_note = _pick_sparse_impl(torch, self.n_sm)
        self.gen = torch.Generator(device="cuda").manual_seed(0)

    def _bar(self, total: int, desc: str):
        try:
            from tqdm.auto import tqdm
        except ImportError:     # tqdm is a core dependency, but the calibration may run from a bare checkout
            return _NoBar()
        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)

    def _randn(self, *shape):
        return torch_randn(self.torch, shape, self.gen)

    def _x_pad(self, d: int, b: int, copies: int):
        """Activation vectors (d, BP) with ``b`` live columns, zero padding beyond."""
        xs = []
        for _ in range(copies):
            x = self.torch.zeros((d, _BP), device=self.dev, dtype=self.torch.float16)
            x[:, :b] = self._randn(d, b)
            xs.append(x)
        return xs

    # ---- dense GEMV / small-batch GEMM -----------------------------------------------------
    def dense_gemv(self) -> dict[str, Any]:
        torch = self.torch
        # square matrices up to 8192 x 8192 (W_o of llama2-70b), then 8192 wide and taller (LM heads):
        # 512 x 512 (0.5 MiB) .. 65536 x 8192 (1 GiB), a factor 2 in bytes apart
        shapes = [(2 ** ((p + 1) // 2), 2 ** (p // 2)) for p in range(18, 27)] + [(2 ** p, 8192) for p in range(14, 17)]
        if self.quick:
            shapes = shapes[::2]
        table = np.zeros((len(BATCHES), len(shapes)))
        bar = self._bar(len(shapes) * len(BATCHES), "dense_gemv")
        for j, (n, d) in enumerate(shapes):
            copies = _n_copies(n * d * ELEM_BYTES, self.l2_bytes)
            ws = [self._randn(n, d) for _ in range(copies)]
            for i, b in enumerate(BATCHES):
                xs = [self._randn(d, b) for _ in range(copies)]
                table[i, j] = self.timer.median_us(lambda r: torch.matmul(ws[r % copies], xs[r % copies]))
                bar.update()
            del ws
        bar.close()
        return _family("weight_bytes", [n * d * ELEM_BYTES for n, d in shapes], BATCHES, table,
                       impl="torch.matmul (cuBLAS), W (n, d) fp16 @ X (d, batch); square up to 8192 x 8192, "
                            "then d = 8192 and n up to 65536", shapes=[list(sh) for sh in shapes])

    # ---- gathered-row GEMV -------------------------------------------------------------------
    def gather_gemv(self) -> dict[str, Any]:
        torch, n, d = self.torch, 16384, 4096
        ks = _geomspace_int(32, n, 8 if self.quick else 10, multiple=32)
        copies = _n_copies(n * d * ELEM_BYTES, self.l2_bytes, cap=8)
        ws = [self._randn(n, d) for _ in range(copies)]
        table = np.zeros((len(BATCHES), len(ks)))
        bar = self._bar(len(ks) * len(BATCHES), "gather_gemv")
        for j, k in enumerate(ks):
            idxs = [self._active(n, k) for _ in range(copies)]
            for i, b in enumerate(BATCHES):
                xs = self._x_pad(d, b, copies)
                table[i, j] = self.timer.median_us(
                    lambda r: _gather_gemv(torch, self.sparse_impl, ws[r % copies], idxs[r % copies], xs[r % copies],
                                           self.n_sm))
                bar.update()
        bar.close()
        del ws
        return _family("gathered_bytes", [k * d * ELEM_BYTES for k in ks], BATCHES, table,
                       impl=f"{self.sparse_impl}: k active rows of W ({n}, {d}) fp16 @ X ({d}, batch); "
                            f"k = {ks[0]}..{ks[-1]}", active_rows=ks, total_rows=n)

    def _active(self, n: int, k: int):
        torch = self.torch
        idx = torch.randperm(n, device=self.dev, generator=self.gen)[:k].sort().values
        return idx.to(torch.int32) if self.sparse_impl == "triton" else idx

    # ---- sparse ReLU FFN decode step ------------------------------------------------------
    def sparse_ffn(self) -> dict[str, Any]:
        torch, d, n = self.torch, 8192, 28672           # llama2-70b (HF config.json)
        fracs = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0) if self.quick else (
            0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
        ks = sorted({int(round(f * n / _BLOCK_K)) * _BLOCK_K for f in fracs})
        copies = 2                                       # 2 x 1.4 GB: each far past L2
        mats = [(self._randn(n, d), self._randn(n, d), self._randn(n, d)) for _ in range(copies)]
        table = np.zeros((len(BATCHES), len(ks)))
        bar = self._bar(len(ks) * len(BATCHES), "sparse_ffn")
        impl = self.sparse_impl

        def step(r, idxs, xs):
            gate, up, down_t = mats[r % copies]
            return _sparse_ffn_step(torch, impl, gate, up, down_t, idxs[r % 8], xs[r % copies], self.n_sm)

        for j, k in enumerate(ks):
            idxs = [self._active(n, k) for _ in range(8)]
            for i, b in enumerate(BATCHES):
                xs = self._x_pad(d, b, copies)
                table[i, j] = self.timer.median_us(lambda r: step(r, idxs, xs))
                bar.update()
        bar.close()
        del mats
        return _family("gathered_bytes", [3 * k * d * ELEM_BYTES for k in ks], BATCHES, table,
                       impl=f"{impl}: gated ReLU FFN, d_model {d}, d_ffn {n} (llama2-70b); gate/up rows and down "
                            f"columns of the k active neurons; k = {ks[0]}..{ks[-1]}",
                       active_rows=ks, sparsity=[round(1 - k / n, 4) for k in ks], total_rows=n)

    # ---- decode attention, grouped KV heads ---------------------------------------------------
    def attention(self) -> dict[str, Any]:
        torch = self.torch
        import torch.nn.functional as F

        h, h_kv, hd = 64, 8, 128                        # llama2-70b (HF config.json)
        lens = [128, 512, 2048, 8192, 32768] if self.quick else [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
        gqa_kw = {"enable_gqa": True} if _sdpa_has_gqa(F) else None
        table = np.zeros((len(BATCHES), len(lens)))
        bar = self._bar(len(lens) * len(BATCHES), "attention")
        for i, b in enumerate(BATCHES):
            for j, L in enumerate(lens):
                kv_bytes = 2 * b * h_kv * L * hd * ELEM_BYTES
                copies = _n_copies(kv_bytes, self.l2_bytes, cap=64)
                ks = [self._randn(b, h_kv, L, hd) for _ in range(copies)]
                vs = [self._randn(b, h_kv, L, hd) for _ in range(copies)]
                q = self._randn(b, h, 1, hd)
                if gqa_kw is not None:
                    fn = lambda r: F.scaled_dot_product_attention(q, ks[r % copies], vs[r % copies], **gqa_kw)
                else:                                     # grouped heads by reshaping q: K/V read once
                    qg = q.view(b, h_kv, h // h_kv, hd)
                    fn = lambda r: torch.softmax(qg @ ks[r % copies].transpose(-1, -2) / hd ** 0.5, -1) @ vs[r % copies]
                table[i, j] = self.timer.median_us(fn)
                del ks, vs
                bar.update()
        bar.close()
        impl = "F.scaled_dot_product_attention(enable_gqa=True)" if gqa_kw else "matmul-softmax-matmul, q grouped"
        return _family("kv_bytes_per_seq", [2 * h_kv * L * hd * ELEM_BYTES for L in lens], BATCHES, table,
                       impl=f"{impl}; {h} query heads, {h_kv} KV heads, head dim {hd} (llama2-70b); "
                            f"kv_len = {lens[0]}..{lens[-1]}", kv_len=lens)

    # ---- prefill of one layer ----------------------------------------------------------------
    def prefill(self) -> dict[str, Any]:
        torch = self.torch
        import torch.nn.functional as F

        shapes = {  # name: d_model, d_ffn, heads, kv heads (HF config.json of each model)
            "relullama-7b": (4096, 11008, 32, 32),
            "llama2-13b": (5120, 13824, 40, 40),
            "llama2-70b": (8192, 28672, 64, 8),
        }
        prompt = 128
        gqa = _sdpa_has_gqa(F)
        table = np.zeros((len(BATCHES), len(shapes)))
        x_bytes = []
        bar = self._bar(len(shapes) * len(BATCHES), "prefill")
        for j, (name, (d, f, h, hkv)) in enumerate(shapes.items()):
            hd = d // h
            qkv_out = d + 2 * hkv * hd
            n_params = d * qkv_out + d * d + 3 * d * f
            copies = _n_copies(n_params * ELEM_BYTES, self.l2_bytes, cap=4)
            x_bytes.append(n_params * ELEM_BYTES)
            layers = [dict(wqkv=self._randn(qkv_out, d), wo=self._randn(d, d), wg=self._randn(f, d),
                           wu=self._randn(f, d), wd=self._randn(d, f)) for _ in range(copies)]
            for i, b in enumerate(BATCHES):
                x = self._randn(b, prompt, d)

                def layer(r, x=x, b=b, d=d, h=h, hkv=hkv, hd=hd):
                    w = layers[r % copies]
                    y = F.rms_norm(x, (d,)) if hasattr(F, "rms_norm") else F.layer_norm(x, (d,))
                    qkv = y @ w["wqkv"].t()
                    q, k, v = qkv.split([d, hkv * hd, hkv * hd], dim=-1)
                    q = q.view(b, prompt, h, hd).transpose(1, 2)
                    k = k.view(b, prompt, hkv, hd).transpose(1, 2)
                    v = v.view(b, prompt, hkv, hd).transpose(1, 2)
                    if gqa:
                        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != h)
                    else:
                        rep = h // hkv
                        a = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                           is_causal=True)
                    x2 = x + a.transpose(1, 2).reshape(b, prompt, d) @ w["wo"].t()
                    y2 = F.rms_norm(x2, (d,)) if hasattr(F, "rms_norm") else F.layer_norm(x2, (d,))
                    return x2 + (torch.relu(y2 @ w["wg"].t()) * (y2 @ w["wu"].t())) @ w["wd"].t()

                table[i, j] = self.timer.median_us(layer, cushion_us=500.0, reps=max(10, self.reps // 4))
                bar.update()
            del layers
        bar.close()
        return _family("layer_weight_bytes", x_bytes, BATCHES, table,
                       impl=f"one fp16 decoder layer (RMSNorm, QKV, causal SDPA, W_o, ReLU-gated FFN, residuals) "
                            f"over batch x {prompt}-token prompts, weights resident", prompt_tokens=prompt,
                       models=list(shapes))

    # ---- host -> device -------------------------------------------------------------------
    def h2d(self) -> dict[str, Any]:
        torch = self.torch
        sizes = [2**p for p in range(12, 31, 3 if self.quick else 2)]   # 4 KiB .. 1 GiB
        src = torch.empty(sizes[-1], dtype=torch.uint8, pin_memory=True)
        src.fill_(1)
        dst = torch.empty(sizes[-1], dtype=torch.uint8, device=self.dev)
        times = []
        bar = self._bar(len(sizes), "h2d")
        for n in sizes:
            reps = max(10, self.reps // 4) if n >= 2**27 else self.reps
            times.append(self.timer.median_us(lambda r: dst[:n].copy_(src[:n], non_blocking=True), reps=reps))
            bar.update()
        bar.close()
        del src, dst
        return _family("bytes", sizes, (1,), np.array([times]),
                       impl="tensor.copy_ from pinned host memory, non_blocking, one stream")

    # ---- launch latency --------------------------------------------------------------------
    def launch(self) -> dict[str, float]:
        torch, timer = self.torch, self.timer
        x = torch.zeros(1, device=self.dev)
        n = 200
        for _ in range(50):
            x.add_(1)
        torch.cuda.synchronize()
        # device: n minimal kernels queued behind a cushion long enough for the host to enqueue them
        dev = timer.median_us(lambda r: [x.add_(1) for _ in range(n)], cushion_us=n * 15.0, reps=20) / n
        # host: wall time of enqueuing one launch
        host = []
        for _ in range(20):
            timer.cushion(n * 15.0)
            t0 = time.perf_counter()
            for _ in range(n):
                x.add_(1)
            host.append((time.perf_counter() - t0) / n * 1e6)
            torch.cuda.synchronize()
        # round trip: launch one kernel and wait for it (cudaStreamSynchronize)
        rt = []
        for _ in range(200):
            t0 = time.perf_counter()
            x.add_(1)
            torch.cuda.synchronize()
            rt.append((time.perf_counter() - t0) * 1e6)
        return {"device_us": dev, "host_us": float(np.median(host)), "launch_sync_us": float(np.median(rt)),
                "impl": "torch in-place add on one element (one elementwise kernel)"}


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def torch_randn(torch, shape, gen):
    """fp16 normal values / 16 on the GPU (small, so no overflow in any product)."""
    return (torch.randn(shape, device="cuda", dtype=torch.float16, generator=gen) / 16)


def _sdpa_has_gqa(F) -> bool:
    import inspect

    try:
        return "enable_gqa" in str(inspect.signature(F.scaled_dot_product_attention))
    except (TypeError, ValueError):   # a builtin without a Python signature: try it
        import torch

        q = torch.zeros((1, 4, 1, 8), device="cuda", dtype=torch.float16)
        kv = torch.zeros((1, 2, 2, 8), device="cuda", dtype=torch.float16)
        try:
            F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
            return True
        except TypeError:
            return False


def _family(x_name: str, x: list, batch: tuple | list, table: np.ndarray, impl: str, **extra: Any) -> dict[str, Any]:
    return {"x_name": x_name, "x": [float(v) for v in x], "batch": [int(b) for b in batch],
            "time_us": [[round(float(v), 4) for v in row] for row in table], "impl": impl, **extra}


FAMILY_ORDER = ("launch", "h2d", "dense_gemv", "gather_gemv", "sparse_ffn", "attention", "prefill")


def run_calibration(quick: bool = False, progress: bool = False, reps: int | None = None,
                    families: tuple[str, ...] = FAMILY_ORDER, preset: str | None = None,
                    command: str = "", strict: bool = False) -> dict[str, Any]:
    """Measure the GPU and return a profile as a JSON-ready dict (see :mod:`ndpsched.gpuprofile`).

    Args:
        quick: a coarser size grid and 25 repetitions (about a minute on an H100).
        progress: tqdm progress bars on stderr.
        reps: repetitions per point (median taken); default 100, or 25 with ``quick``.
        families: which families to measure (``launch`` and the table names).
        preset: the GPU preset this profile is for (default: guessed from the device name).
        command: the command line, recorded in the provenance.
        strict: raise on the first family that fails; by default a failing family is recorded in
            ``provenance.failed`` and the others are still measured.
    """
    from .errors import unknown_name

    for f in families:
        if f not in FAMILY_ORDER:
            raise unknown_name("calibration family", f, FAMILY_ORDER)
    t0 = time.perf_counter()
    cal = _Calibrator(quick, progress, reps)
    torch = cal.torch
    out: dict[str, Any] = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION}
    fams: dict[str, Any] = {}
    failed: dict[str, str] = {}
    launch = None
    for name in families:
        log.info("measuring %s", name)
        try:
            if name == "launch":
                launch = cal.launch()
            else:
                fams[name] = getattr(cal, name)()
        except Exception as exc:  # one family failing (e.g. out of memory) must not lose the others
            if strict:
                raise
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            log.warning("family %s failed: %s", name, failed[name])
        torch.cuda.empty_cache()
    props = cal.props
    out["gpu"] = {
        "name": props.name,
        "preset": preset if preset is not None else guess_preset(props.name),
        "memory_bytes": int(props.total_memory),
        "sm_count": cal.n_sm,
        "l2_bytes": int(cal.l2_bytes),
        "compute_capability": f"{props.major}.{props.minor}",
    }
    out["provenance"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "driver": _driver_version(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _KERNELS.get("triton_version", ""),
        "sparse_impl": cal.sparse_impl,
        "sparse_impl_note": cal.sparse_impl_note,
        "reps": cal.reps,
        "quick": quick,
        "statistic": "median of CUDA-event times per repetition, inputs rotated past L2, after warm-up",
        "command": command,
        "wall_s": round(time.perf_counter() - t0, 1),
        "failed": failed,
    }
    if launch is not None:
        out["launch"] = launch
    out["families"] = fams
    return out


def guess_preset(device_name: str) -> str:
    """The GPU preset a CUDA device name corresponds to, '' when none does (e.g. 'H100' -> 'h100')."""
    name = device_name.lower().replace(" ", "")
    for key, preset in (("h200", "h200"), ("h100", "h100"), ("a100", "a100-40gb"), ("4090", "rtx4090"),
                        ("3090", "rtx3090"), ("teslat4", "t4")):
        if key in name:
            return preset
    return ""


def _driver_version() -> str:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


# ---- command line (``ndpsched calibrate gpu``; also ``python -m ndpsched.calibrate``) -------------
def add_gpu_arguments(p) -> None:
    """Flags of ``ndpsched calibrate gpu``."""
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--quick", action="store_true", help="coarser grid, 25 repetitions (about a minute)")
    p.add_argument("--reps", type=int, help="repetitions per point (default 100; 25 with --quick)")
    p.add_argument("--families", default=",".join(FAMILY_ORDER),
                   help=f"comma-separated subset of {','.join(FAMILY_ORDER)}")
    p.add_argument("--preset", help="GPU preset the profile is for (default: guessed from the device name)")
    p.add_argument("--progress", action=argparse_bool(), default=None, help="tqdm progress bars")


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


def cmd_calibrate_gpu(args) -> int:
    """Run the calibration and write the profile; prints a short summary (CLI only)."""
    import json
    import sys
    from pathlib import Path

    if args.reps is not None and args.reps < 3:
        from .errors import ConfigError

        raise ConfigError(f"--reps must be >= 3, got {args.reps}")
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    prof = run_calibration(quick=args.quick, progress=progress, reps=args.reps, families=families,
                           preset=args.preset, command=" ".join(["ndpsched" if "cli" in sys.argv[0] else "python -m ndpsched.calibrate"]
                                                    + sys.argv[1:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(prof, indent=1) + "\n")
    g, pv = prof["gpu"], prof["provenance"]
    print(f"wrote {out}: {g['name']} (preset '{g['preset']}'), driver {pv['driver']}, CUDA {pv['cuda']}, "
          f"torch {pv['torch']}, sparse kernels: {pv['sparse_impl']} {pv['sparse_impl_note']}; {pv['wall_s']} s")
    if "launch" in prof:
        la = prof["launch"]
        print(f"launch: {la['device_us']:.2f} us on the device back to back, {la['host_us']:.2f} us host enqueue, "
              f"{la['launch_sync_us']:.2f} us launch + synchronise")
    for name, why in pv["failed"].items():
        print(f"{name}: FAILED: {why}")
    for name, fam in prof["families"].items():
        t = np.asarray(fam["time_us"])
        print(f"{name:<12} {len(fam['x'])} sizes x {len(fam['batch'])} batches, {fam['x_name']} "
              f"{fam['x'][0]:.3g}..{fam['x'][-1]:.3g}: {t.min():.1f}..{t.max():.1f} us")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ndpsched.calibrate --out FILE``: the calibration without the rest of the CLI."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m ndpsched.calibrate", description=__doc__.splitlines()[0])
    add_gpu_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_calibrate_gpu(args)
    except NdpschedError as exc:
        print(f"ndpsched: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    import sys

    sys.exit(main())


def add_compare_arguments(p) -> None:
    """Flags of ``ndpsched calibrate compare``."""
    p.add_argument("profile", help="profile JSON (a path, or the name of a shipped profile)")
    p.add_argument("--gpu", help="GPU preset whose roofline to compare (default: the profile's preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a GpuSpec field of the preset, e.g. kernel_overhead_us=3 (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_calibrate_compare(args) -> int:
    """Print, per kernel family, the roofline's median and worst relative error against the profile."""
    import json

    from .config import parse_value
    from .errors import ConfigError
    from .gpuprofile import compare_profile, fit_roofline, load_profile
    from .presets import load_hardware

    prof = load_profile(args.profile)
    gpu = args.gpu or prof.preset
    if not gpu:
        raise ConfigError(f"profile {prof.source} names no GPU preset; pass --gpu")
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        overrides[key.strip()] = parse_value(raw.strip())
    # compare the roofline alone: the preset's own profile is irrelevant here
    hw = load_hardware(gpu, overrides={"gpu": {**overrides, "profile": ""}})
    rows = compare_profile(prof, hw.gpu, hw.pcie)
    fit = fit_roofline(prof, hw.gpu, hw.pcie)
    current = {k: getattr(hw.gpu, k) for k in ("dense_bw_efficiency", "sparse_bw_efficiency", "compute_efficiency",
                                              "kernel_overhead_us")}
    current["pcie_efficiency"] = hw.pcie.efficiency
    if args.json:
        print(json.dumps({"profile": prof.source, "gpu_preset": gpu, "rows": rows, "fit": fit, "preset": current},
                         indent=2))
        return 0
    print(f"roofline of GPU preset '{gpu}' vs profile {prof.source} ({prof.gpu_name}, "
          f"{prof.provenance.get('date', '?')}); error = (roofline - measured) / measured")
    print(f"{'family':<12} {'points':>6} {'median |err|':>12} {'median err':>11} {'worst err':>10}  at")
    for r in rows:
        at = "" if r["family"] == "launch" else f"{r['x_name']} {r['worst_x']:.3g}, batch {r['worst_batch']}"
        print(f"{r['family']:<12} {r['points']:>6} {100 * r['median_abs_err']:>11.1f}% {100 * r['median_err']:>+10.1f}% "
              f"{100 * r['worst_err']:>+9.1f}%  {at}")
    print("least-squares roofline parameters for this profile (preset value in brackets):")
    for k, v in fit.items():
        print(f"  {k:<22} {v:8.3f}  ({current[k]:.3f})")
    return 0
