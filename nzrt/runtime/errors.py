"""The runtime's one error type for misuse."""
from __future__ import annotations


class ManagedError(RuntimeError):
    """Misuse of ``managed`` (entered twice, a missing weight, a write to a managed weight, ...)."""
