"""Strict JSON for ``.nzrt`` headers, and the typed field checks every header goes through.

Plain ``json.loads`` is too lenient for a file format read from untrusted sources: it keeps
the last of duplicate keys, accepts ``NaN``/``Infinity``, recurses without a bound, and leaves
``True`` or ``0.5`` where an integer belongs. Here every one of those is a ``FormatError``:

* the header is at most ``MAX_HEADER_BYTES`` of UTF-8, nested at most ``MAX_DEPTH`` deep;
* no duplicate keys in any object (``object_pairs_hook``), no ``NaN``/``Infinity``/``-Infinity``,
  no float that overflows to infinity;
* integer fields are ``int`` (never ``bool``, never float), inside a stated range; bool fields
  are ``bool``; objects have exactly the keys the format defines (none missing, none unknown).
"""
from __future__ import annotations

import json
import math

from ..kernels.spec import FormatError

MAX_HEADER_BYTES = 256 << 20
MAX_DEPTH = 64


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise FormatError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _no_constant(name):
    raise FormatError(f"{name} is not allowed in a header")


def _finite_float(text):
    v = float(text)
    if not math.isfinite(v):
        raise FormatError(f"number {text[:40]} overflows to {v}")
    return v


def _depth(obj) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion to exhaust)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                break
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def loads(raw: bytes) -> dict:
    """The header object of ``raw`` (UTF-8 JSON), or a FormatError saying what is wrong."""
    if len(raw) > MAX_HEADER_BYTES:
        raise FormatError(f"header of {len(raw)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    try:
        text = bytes(raw).decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                         parse_float=_finite_float)
    except FormatError as e:
        raise FormatError(f"header is not strict JSON: {e}") from None
    except RecursionError:
        raise FormatError(f"header nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, too many int digits
        raise FormatError(f"header is not valid JSON ({e})") from None
    if type(obj) is not dict:
        raise FormatError(f"header is a JSON {type(obj).__name__}, not an object")
    if _depth(obj) > MAX_DEPTH:
        raise FormatError(f"header nests deeper than {MAX_DEPTH} levels")
    return obj


def dumps(obj) -> str:
    """The canonical JSON text of ``obj`` (sorted keys, no spaces): what checksums cover."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False)


def expect_keys(d, required, what: str, optional=()) -> dict:
    """``d`` must be an object with every ``required`` key and no key outside ``optional``."""
    if type(d) is not dict:
        raise FormatError(f"malformed header: {what} is a {type(d).__name__}, not an object")
    missing = [k for k in required if k not in d]
    if missing:
        raise FormatError(f"malformed header: {what} lacks field {missing[0]!r}")
    unknown = [k for k in d if k not in required and k not in optional]
    if unknown:
        raise FormatError(f"malformed header: {what} has unknown field {unknown[0]!r}")
    return d


def as_int(v, name: str, lo: int, hi: int) -> int:
    if type(v) is not int:
        raise FormatError(f"{name} must be an integer, got {type(v).__name__} {_show(v)}")
    if not lo <= v <= hi:
        raise FormatError(f"{name} {_show(v)} is out of range {lo}..{hi}")
    return v


def as_ints(v, name: str, lo: int, hi: int, max_len: int) -> tuple[int, ...]:
    if type(v) not in (list, tuple):
        raise FormatError(f"{name} must be a list of integers, got {type(v).__name__} {_show(v)}")
    if len(v) > max_len:
        raise FormatError(f"{name} has {len(v)} entries, at most {max_len} allowed")
    return tuple(as_int(x, f"{name}[{i}]", lo, hi) for i, x in enumerate(v))


def as_bool(v, name: str) -> bool:
    if type(v) is not bool:
        raise FormatError(f"{name} must be true or false, got {type(v).__name__} {_show(v)}")
    return v


def as_str(v, name: str, choices=None) -> str:
    if type(v) is not str:
        raise FormatError(f"{name} must be a string, got {type(v).__name__} {_show(v)}")
    if choices is not None and v not in choices:
        raise FormatError(f"{name} {_show(v)} is not one of {', '.join(sorted(choices))}")
    return v


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."
