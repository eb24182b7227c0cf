"""What the numba CPU kernels (the modules of ``nzrt.kernels.cpu``) share, in one place:
compile options, the sizes of the per-level tables, the error flags a decode kernel returns (and
their messages), and when a call goes parallel. No kernels; importing it imports numba (which
``import nzrt`` never does).

Table sizes follow the cascade of ``spec``: ``_NLEV`` levels (``spec.MAX_LEVELS`` coded ones
plus the raw one), each indexed by a code of at most 8 bits (``_NCODE`` = 256: the widest level
is the raw exponent byte), so a level's table row is ``level * _NCODE + code``. The error flags
are bits of one int, OR-ed over tiles: a kernel never raises, ``decode_into`` turns the flags
into one ``FormatError`` naming each.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba

from .. import spec


def _drop_stale_cache() -> None:
    """numba's disk cache checks only the file that defines a compiled function, not the modules
    whose intrinsics, constants and callees it compiled in. One stamp over every kernel source:
    when any of them changed, the cached machine code of all of them is dropped (recompiled on
    first use). Only numba's default place (``__pycache__`` beside the sources) is handled."""
    here = Path(__file__).parent
    cache = here / "__pycache__"
    if os.environ.get("NUMBA_CACHE_DIR") or not os.access(cache if cache.is_dir() else here, os.W_OK):
        return
    h = hashlib.sha256()
    for src in sorted(here.glob("*.py")) + sorted(here.parent.glob("*.py")):  # + spec, references
        h.update(str(src.relative_to(here.parent)).encode() + b"\0" + src.read_bytes())
    stamp = cache / "numba-sources.sha256"
    digest = h.hexdigest()
    try:
        cache.mkdir(exist_ok=True)  # a fresh install: stamp it before anything is compiled
        if stamp.is_file() and stamp.read_text() == digest:
            return
        for f in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            f.unlink(missing_ok=True)
        stamp.write_text(digest)
    except OSError:  # a read-only or shared install: numba's own checks are all there is
        pass


_drop_stale_cache()

_OPTS = dict(cache=True, nogil=True, error_model="numpy", boundscheck=False)
_NLEV = spec.MAX_LEVELS + 1  # coded levels plus the raw one
_NCODE = 256  # widest level: the raw exponent byte

ERR_ESCAPES = 1  # a tile holds more escapes than its offsets allow
ERR_CODE = 2  # a code names no symbol
ERR_OFFSETS = 4  # offsets decrease or point past a stream
ERR_PATCH = 8  # a patch index out of range
ERR_SHORT = 16  # a stream shorter than the header implies

_ERRORS = [
    (ERR_OFFSETS, "tile offsets are inconsistent or point past a level's stream"),
    (ERR_ESCAPES, "a tile holds more escapes than its offsets allow"),
    (ERR_CODE, "a code names no symbol"),
    (ERR_PATCH, "a patch index is out of range"),
    (ERR_SHORT, "a stream is shorter than the header implies"),
]


PARALLEL_MIN_TILES = 8  # below this a parallel region costs more than it saves


def _parallel(tiles: int) -> bool:
    return tiles >= PARALLEL_MIN_TILES and numba.get_num_threads() > 1
