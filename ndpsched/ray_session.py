"""Starting Ray for ndpsched's parallel work (sweep trials, training seeds): local Ray by default,
an existing cluster given its address; one BLAS/OpenMP thread per worker process and malloc settings
that keep many concurrent numpy-heavy workers from contending on page faults."""
from __future__ import annotations

import os

THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "NUMEXPR_NUM_THREADS": "1"}

# glibc malloc in worker processes: large arrays come from the heap, and freed memory stays there.
# A trace-mode trial allocates and frees tens of MB of short-lived (N,) arrays; with glibc's
# defaults each is a fresh mmap whose pages fault in: relullama-7b, ~13,700 page faults a trial,
# ~360 with these; on the 16-core device one worker's trial went from 1.26 to 1.12 s.
MALLOC_MMAP_THRESHOLD_BYTES = 32 * 2**20     # glibc's maximum on 64-bit
MALLOC_TRIM_THRESHOLD_BYTES = 2**30
MALLOC_TOP_PAD_BYTES = 64 * 2**20
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD_BYTES),
              "MALLOC_TRIM_THRESHOLD_": str(MALLOC_TRIM_THRESHOLD_BYTES),
              "MALLOC_TOP_PAD_": str(MALLOC_TOP_PAD_BYTES)}
#: environment of every Ray worker process ndpsched starts
WORKER_ENV = {**THREAD_ENV, **MALLOC_ENV}


def tune_malloc() -> bool:
    """Apply the MALLOC_ENV settings to this running process (glibc's ``mallopt``), for workers
    that were started without them (a fork pool, a cluster's existing workers). False where the
    C library is not glibc, or with ``NDPSCHED_MALLOC=default`` in the environment (glibc's
    defaults kept)."""
    import ctypes
    import ctypes.util

    if os.environ.get("NDPSCHED_MALLOC") == "default":     # opt out (and the scaling script's reference)
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3      # <malloc.h>
    return all(mallopt(param, value) == 1 for param, value in (
        (m_mmap_threshold, MALLOC_MMAP_THRESHOLD_BYTES), (m_trim_threshold, MALLOC_TRIM_THRESHOLD_BYTES),
        (m_top_pad, MALLOC_TOP_PAD_BYTES)))


def init_ray(workers: int | None, address: str | None) -> bool:
    """Start local Ray with ``workers`` CPUs (or connect to ``address``); True if this call started it.

    Worker processes get one BLAS/OpenMP thread each and heap-friendly malloc settings
    (WORKER_ENV in their runtime environment).
    """
    import ray

    if ray.is_initialized():
        return False
    for key, value in THREAD_ENV.items():
        os.environ.setdefault(key, value)
    runtime_env = {"env_vars": dict(WORKER_ENV)}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=workers or os.cpu_count(), include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=False)
    return True
