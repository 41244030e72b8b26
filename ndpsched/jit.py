"""Compiled inner loops (numba), for the few per-window steps that numpy cannot vectorise well.

Most of the execution model is whole-array numpy. A few steps between windows are sparse and
sequential: Hermes' online promotion pairs each stage's best candidates with its lowest-state
GPU neurons, and a window's moved neurons re-count their toggles. In numpy each of them is a
chain of sorts, gathers and bincounts over 10-100 thousand ids, about 20 array passes of 10-150 us
each; a compiled loop does one pass. Measured on relullama-7b with 8 DIMMs, they were most of an
env step (README, Architecture: compiled loops).

:func:`kernel` compiles a plain Python function with ``numba.njit`` on its first call (numba is
imported then, not when ndpsched is), caching the machine code next to the source (``cache``)
so that later processes (Ray workers, test runs) load it instead of compiling; the module's
name then refers to numba's dispatcher itself. The Python function stays reachable as
``.py_func`` (tests run it as the readable reference).
"""
from __future__ import annotations

import functools
from typing import Any, Callable


#: the kernels compiled (or loaded from the cache) in this process, by qualified name
COMPILED: dict[str, Any] = {}


def trailing_zeros(x: int) -> int:
    """Zero bits below the lowest set bit of the unsigned ``x`` > 0. Plain Python here; in a kernel
    it compiles to LLVM's count-trailing-zeros (one instruction), so that a kernel walks the set
    bits of a 64-bit word without testing the others."""
    x = int(x)
    return (x & -x).bit_length() - 1


_OVERLOADS: list[bool] = []


def _register_overloads() -> None:
    """Teach numba the helpers above (once, when the first kernel compiles)."""
    if _OVERLOADS:
        return
    import numpy as np
    from numba.cpython.unsafe.numbers import trailing_zeros as cttz
    from numba.extending import overload

    @overload(trailing_zeros)
    def _trailing_zeros(x):
        return lambda x: np.int64(cttz(x))

    _OVERLOADS.append(True)


def kernel(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled with ``numba.njit(cache=True)`` on first use.

    A kernel may call other kernels of its own module by name: they are compiled first, so that
    numba finds their dispatchers under those names."""
    compiled: Callable[..., Any] | None = None

    def compile_kernel() -> Callable[..., Any]:
        nonlocal compiled
        if compiled is None:
            import numba

            _register_overloads()
            for name in fn.__code__.co_names:
                callee = fn.__globals__.get(name)
                if callee is not call and hasattr(callee, "compile_kernel"):
                    callee.compile_kernel()
            compiled = COMPILED[f"{fn.__module__}.{fn.__qualname__}"] = numba.njit(cache=True, nogil=True)(fn)
            # later calls by name from the kernel's own module (the usual caller) go straight to
            # numba's dispatcher: this wrapper costs about 1 us a call, ~15 calls an env step
            if fn.__globals__.get(fn.__name__) is call:
                fn.__globals__[fn.__name__] = compiled
        return compiled

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        return (compiled if compiled is not None else compile_kernel())(*args)

    call.py_func = fn                   # type: ignore[attr-defined]
    call.compile_kernel = compile_kernel    # type: ignore[attr-defined]
    return call
