"""Exit's restore: every parameter bit for bit on its device, then what entry moved put back.

Apart from the session (``handle.py``) because it owns what only the restore reads: lossy
mode's exact copies (``spill``, a ``RestoreSpill``) and the log of what entry moved (``moved``).
One weight at a time: restore it, then free its compressed copy. A weight whose decode keeps
failing stays managed (readable, exact) and is reported; a second ``detach()`` retries it.
"""
from __future__ import annotations

import torch

from .decoder import decode_chunks
from .spill import RestoreSpill
from .weight import set_data, unregister

_SPILLED = RestoreSpill.SOURCE


class Restore:
    def __init__(self):
        self.spill = RestoreSpill()  # key -> lossless copy in a temporary file (lossy mode only)
        self.moved: list = []        # (kind, object, name, original): buffers, swaps, moved params

    def restore_params(self, params: list, tensors: dict, decoder, backend, errors: list) -> list:
        """Restore each active Param of ``params`` (its chunks in ``tensors``), freeing the
        compressed copies of those done; returns the ones that could not be restored (their
        errors appended to ``errors``). ``backend``: the session's codec backend."""
        failed = []
        for mp in params:  # one weight at a time: restore it, then free its compressed copy
            if mp.active and not self._restore_with_retry(mp, tensors, decoder, backend, errors):
                failed.append(mp)
            elif not mp.active:
                self._drop_compressed(mp, tensors)
        return failed

    def undo_moves(self) -> None:
        """Buffers, swapped meta parameters and moved parameters back, newest first."""
        for kind, obj, name, orig in reversed(self.moved):
            if kind == "buffer":
                obj._buffers[name] = orig
            elif kind == "swap":
                for module, pname in obj:
                    module._parameters[pname] = orig
            else:
                obj.data = orig
        self.moved.clear()

    def close(self) -> None:
        """The restore copies' file closed; a fresh spill for the next entry."""
        self.spill.close()
        self.spill = RestoreSpill()

    def _drop_compressed(self, mp, tensors) -> None:
        """Free a restored parameter's compressed chunks (and lossy restore copies)."""
        for key in mp.keys:
            s = tensors.pop(key, None)
            if s is not None:
                s.ct = s.home = None
            self.spill.pop(key, None)

    def _restore_with_retry(self, mp, tensors, decoder, backend, errors) -> bool:
        """Restore one parameter; a failed decode is tried once more with the reference backend
        (an interrupt or a transient MemoryError must not leave it half restored)."""
        for b in (backend if backend != "triton" else None, "reference"):
            try:
                self._restore_param(mp, tensors, decoder, b)
                return True
            except BaseException as e:
                errors.append(e)
        return False

    def _restore_param(self, mp, tensors, decoder, backend) -> None:
        p = mp.param
        if mp.file_original is not None:  # its own memory-mapped storage again
            out = mp.file_original
        elif not mp.was_meta:  # a meta parameter's stand-in is dropped with the swaps
            out = torch.empty(mp.shape, dtype=mp.dtype, device="cpu")

            def decode(ct, buf):
                decoder.decode_with(ct, buf, backend)
                if ct.source == _SPILLED:
                    self.spill.release(ct)

            decode_chunks(mp, out, lambda key: self.spill.get(key) if key in self.spill
                          else tensors[key].home, decode)
            if mp.orig_device.type != "cpu":
                out = out.to(mp.orig_device)
        else:
            out = torch.empty(0, dtype=mp.dtype, device=decoder.device)
        unregister(p)
        set_data(p, out)
        p.__class__ = mp.orig_class
        mp.active = False
        mp.file_original = None
