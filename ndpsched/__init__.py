"""ndpsched: scheduling-policy framework and execution model for LLM decode on a GPU + NDP-DIMMs.

The core (this package) needs only numpy, scipy and PyYAML. Heavy libraries (gymnasium, torch,
ray, optuna) are imported inside the functions that need them.
"""
from __future__ import annotations

__version__ = "0.1.0"
