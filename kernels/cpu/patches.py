"""The end of every numba decode: the error flags of its tiles into one, and the patches
(``patch_idx`` / ``patch_val``: values the stream cannot carry, written over the result last)."""
from __future__ import annotations

from numba import njit

from .common import _OPTS, ERR_CODE, ERR_ESCAPES, ERR_OFFSETS, ERR_PATCH


@njit(**_OPTS)
def _finish(n, out, pidx, pval, e_esc, e_code, e_off):
    err = 0
    if e_esc:
        err |= ERR_ESCAPES
    if e_code:
        err |= ERR_CODE
    if e_off:
        err |= ERR_OFFSETS
    for p in range(len(pidx)):
        j = pidx[p]
        if j < 0 or j >= n:
            err |= ERR_PATCH
        else:
            out[j] = pval[p]
    return err
