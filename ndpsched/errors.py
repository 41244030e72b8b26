"""Exception hierarchy of ndpsched.

Every error a user can cause (a bad name, a bad value, a bad file) is an ``NdpschedError``;
the CLI prints its message as one line and exits with status 2.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class NdpschedError(Exception):
    """Base class of all errors caused by user input."""


class ConfigError(NdpschedError, ValueError):
    """A configuration value or key is invalid."""


class UnknownNameError(NdpschedError, KeyError):
    """A name (model, GPU, policy, parameter) is not known."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else ""


class CapacityError(NdpschedError, ValueError):
    """A placement or model does not fit the memory of a device."""


class TraceError(NdpschedError, ValueError):
    """An activation trace is corrupt or does not match the model."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> UnknownNameError:
    """Build an error for an unknown ``name`` of ``kind`` listing the valid names.

    Suggests the closest valid name (difflib), as Gymnasium's registry does.
    """
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UnknownNameError(f"unknown {kind} '{name}'.{hint} Valid: {', '.join(valid)}")


class ProfileError(NdpschedError, ValueError):
    """A measured GPU profile is missing, corrupt, of another schema, or for another GPU."""
