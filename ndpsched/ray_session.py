"""Starting Ray for ndpsched's parallel work (sweep trials, training seeds): local Ray by default,
an existing cluster given its address; one BLAS/OpenMP thread per worker process."""
from __future__ import annotations

import os

THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "NUMEXPR_NUM_THREADS": "1"}


def init_ray(workers: int | None, address: str | None) -> bool:
    """Start local Ray with ``workers`` CPUs (or connect to ``address``); True if this call started it.

    Worker processes get one BLAS/OpenMP thread each (THREAD_ENV in their runtime environment).
    """
    import ray

    if ray.is_initialized():
        return False
    for key, value in THREAD_ENV.items():
        os.environ.setdefault(key, value)
    runtime_env = {"env_vars": dict(THREAD_ENV)}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=workers or os.cpu_count(), include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=False)
    return True
