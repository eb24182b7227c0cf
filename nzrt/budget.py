"""Memory budgets: bytes, "6GiB", "512 MB", "80%" (of what is free on the device)."""
from __future__ import annotations

import math
import numbers
import re

_UNITS = {
    "": 1, "b": 1,
    "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9, "gb": 10 ** 9,
    "t": 10 ** 12, "tb": 10 ** 12,
    "ki": 2 ** 10, "kib": 2 ** 10, "mi": 2 ** 20, "mib": 2 ** 20, "gi": 2 ** 30, "gib": 2 ** 30,
    "ti": 2 ** 40, "tib": 2 ** 40,
}
# a number (signed, "inf" and "nan" too, so that they get a precise message), then a unit
_RE = re.compile(r"^\s*([+-]?(?:[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?|(?:inf(?:inity)?|nan)(?![a-z])))\s*([a-zA-Z%]*)\s*$",
                 re.IGNORECASE)
MAX_BUDGET = 2 ** 63 - 1  # bytes; beyond this no counter (numpy, torch, NVML) holds it
ACCEPTED = ("a positive number of bytes (e.g. 6000000000), a size like '6GiB', '1.5 GB' or '512MiB', "
            "or a percentage of the free memory like '80%'")


class InvalidBudgetError(ValueError):
    """A budget nzrt cannot read; the message says what was given and what is accepted."""


class BudgetTypeError(InvalidBudgetError, TypeError):
    """A budget of the wrong type (a bool, a list, ...); also a TypeError."""


def _bad(budget, why: str, cls=InvalidBudgetError):
    shown = repr(budget)
    if len(shown) > 40:
        shown = shown[:20] + "..." + shown[-8:]
    if not isinstance(budget, str):
        shown += f" ({type(budget).__name__})"
    return cls(f"budget {shown} {why}; give {ACCEPTED}")


def _bytes(budget, value) -> int:
    """``value`` (an int or a float) bytes as an int: finite, >= one byte, <= MAX_BUDGET."""
    if isinstance(value, float):
        if math.isnan(value):
            raise _bad(budget, "is not a number")
        if math.isinf(value):
            raise _bad(budget, "is infinite")
    if value <= 0:
        raise _bad(budget, "is not positive")
    if value > MAX_BUDGET:
        raise _bad(budget, f"is more than {MAX_BUDGET} bytes")
    out = int(value)
    if out < 1:
        raise _bad(budget, "is less than one byte")
    return out


def _read(budget):
    """("bytes", n) or ("percent", p): the budget checked, without the free memory."""
    if isinstance(budget, bool) or not isinstance(budget, (numbers.Real, str)):
        raise _bad(budget, "has the wrong type", BudgetTypeError)
    if isinstance(budget, numbers.Integral):
        return "bytes", _bytes(budget, int(budget))
    if isinstance(budget, numbers.Real):
        return "bytes", _bytes(budget, float(budget))
    m = _RE.match(budget)
    if not m:
        raise _bad(budget, "cannot be read")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "%":
        if not 0 < value <= 100:  # NaN too
            raise _bad(budget, "is not a percentage in (0, 100]")
        return "percent", value
    if unit not in _UNITS:
        raise _bad(budget, f"has an unknown unit {m.group(2)!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return "bytes", _bytes(budget, value * _UNITS[unit])


def check_budget(budget) -> int | str | None:
    """``budget`` checked without resolving percentages: None, its bytes (int), or the percentage
    string as given. Raises InvalidBudgetError (a ValueError) with a one-line message."""
    if budget is None:
        return None
    kind, value = _read(budget)
    return value if kind == "bytes" else budget


def parse_budget(budget, free_bytes=None) -> int | None:
    """Bytes from ``budget``: None (no limit), an int, a float of bytes, "6GiB", "1.5 GB", "800MiB",
    or "80%" of ``free_bytes`` (an int, or a callable returning one, called only for percentages).

    Raises InvalidBudgetError (a ValueError; BudgetTypeError, also a TypeError, for a bool or
    another type) for anything else: NaN, infinities ("1e400" too), zero, negatives, unknown units."""
    if budget is None:
        return None
    kind, value = _read(budget)
    if kind == "bytes":
        return value
    free = free_bytes() if callable(free_bytes) else free_bytes
    if free is None:
        raise InvalidBudgetError(f"budget {budget!r} is relative, but the free memory is unknown; "
                                 f"give an absolute size like '6GiB'")
    out = int(free * value / 100)
    if out < 1:
        raise InvalidBudgetError(f"budget {budget!r} of {free} free bytes is less than one byte")
    return out


def format_bytes(n: float | None, up: bool = False) -> str:
    """``n`` bytes as "12 B", "1.35 GiB". ``up``: rounded up, never below ``n``: the text read back
    with ``parse_budget`` is at least ``n`` bytes (for a smallest budget that has to work:
    1.351 GiB prints as "1.36 GiB", never "1.35 GiB")."""
    if n is None:
        return "-"
    if up:
        return _format_up(n)
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def _format_up(n) -> str:
    need = math.ceil(n)
    if need < 1024:
        return f"{max(need, 0)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size = _UNITS[unit.lower()]
        if need < 1024 * size or unit == "TiB":
            break
    hundredths = -(-need * 100 // size)  # exact integer ceiling of need / size, in hundredths
    while True:  # the float parse_budget reads may fall a byte short: bump until it does not
        text = f"{hundredths // 100}.{hundredths % 100:02d} {unit}"
        if parse_budget(text) >= need:
            return text
        hundredths += 1
