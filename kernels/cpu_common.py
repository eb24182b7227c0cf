"""What the numba CPU kernels (the ``cpu_*`` modules behind ``numba_cpu``) share, in one place:
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

import numba

from . import spec

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
