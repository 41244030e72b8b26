"""Built-in scheduling policies of ndpsched (installed as ``ndpsched.policies``).

Importing this package registers every built-in policy. Third-party packages register theirs
the same way, through the ``ndpsched.policies`` entry-point group.
"""
from __future__ import annotations

from . import balancer, partition, predictor, rl  # noqa: F401  (import registers the policies)
