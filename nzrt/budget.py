"""Memory budgets: bytes, "6GiB", "512 MB", "80%" (of what is free on the device)."""
from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9, "gb": 10 ** 9,
    "t": 10 ** 12, "tb": 10 ** 12,
    "ki": 2 ** 10, "kib": 2 ** 10, "mi": 2 ** 20, "mib": 2 ** 20, "gi": 2 ** 30, "gib": 2 ** 30,
    "ti": 2 ** 40, "tib": 2 ** 40,
}
_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z%]*)\s*$")


def parse_budget(budget, free_bytes=None) -> int | None:
    """Bytes from ``budget``: None (no limit), an int, a float of bytes, "6GiB", "1.5 GB", "800MiB",
    or "80%" of ``free_bytes`` (an int, or a callable returning one, called only for percentages)."""
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise TypeError("budget must be bytes, a size string like '6GiB', or a percentage like '80%'")
    if isinstance(budget, (int, float)):
        if budget <= 0:
            raise ValueError(f"budget must be positive, got {budget}")
        return int(budget)
    if not isinstance(budget, str):
        raise TypeError(f"budget must be bytes, a size string or a percentage, got {type(budget).__name__}")
    m = _RE.match(budget)
    if not m:
        raise ValueError(f"cannot read budget {budget!r}; write bytes, '6GiB', '512MB' or '80%'")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "%":
        if not 0 < value <= 100:
            raise ValueError(f"a percentage budget must be in (0, 100], got {budget!r}")
        free = free_bytes() if callable(free_bytes) else free_bytes
        if free is None:
            raise ValueError(f"budget {budget!r} is relative, but the free memory is unknown")
        return int(free * value / 100)
    if unit not in _UNITS:
        raise ValueError(f"unknown unit {m.group(2)!r} in budget {budget!r}; use B, KB, MB, GB, KiB, MiB, GiB")
    out = int(value * _UNITS[unit])
    if out <= 0:
        raise ValueError(f"budget must be positive, got {budget!r}")
    return out


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover
