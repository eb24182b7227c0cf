"""Every ``NZRT_*`` environment variable: the one place they are named, documented and read.

It sits at the bottom of the house (``nzrt.kernels``, standard library only) so that the kernels'
compile-time switches and everything above them read the same table; nothing else calls
``os.environ`` for an ``NZRT_*`` name (a test pins that). Values are read when asked, never
cached here, so a test or a child process may set them.
"""
from __future__ import annotations

import os

# name -> (default, what it does); a default of None means "unset"
VARIABLES = {
    "NZRT_BACKEND": (None, "codec backend: reference | numba | triton (default: the best for the device)"),
    "NZRT_BLOCKED_MATMUL": ("probe", "probe | never: may a large output head be multiplied in row blocks"),
    "NZRT_DECODE_THREADS": (None, "numba threads of the CPU decode worker (default: numba's)"),
    "NZRT_TMPDIR": (None, "folder of lossy mode's lossless spill file (default: the system's temp dir)"),
    "NZRT_CACHE_DIR": (None, "cache of the CLI's embedded models (default: $XDG_CACHE_HOME/nzrt)"),
    "NZRT_DEBUG": (None, "CLI: any value prints tracebacks instead of one-line errors"),
    "NZRT_PROGRESS": (None, "CLI: any value shows progress bars even when not on a terminal"),
    "NZRT_NUMBA_NO_AVX512": (None, "1 compiles the portable CPU paths (tests; use a fresh NUMBA_CACHE_DIR)"),
    "NZRT_TRITON_BLOCK": (None, "Triton decode block size (default 1024; 65536 under TRITON_INTERPRET)"),
    "NZRT_TRITON_WARPS": ("4", "Triton decode warps"),
}


def get(name: str, default: str | None = None) -> str | None:
    """The variable's value, else ``default``, else its documented default ('' counts as unset)."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not an nzrt setting; known: {', '.join(sorted(VARIABLES))}")
    value = os.environ.get(name)
    if value is None or value == "":
        return default if default is not None else VARIABLES[name][0]
    return value


def flag(name: str) -> bool:
    """True when the variable is set to anything but '', '0', 'false', 'no' or 'off'."""
    value = get(name)
    return value is not None and value.strip().lower() not in ("", "0", "false", "no", "off")
