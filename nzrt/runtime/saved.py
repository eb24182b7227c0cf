"""Autograd through managed weights: what the graph keeps of a weight is a token, not its slot.

Inside a module's forward a managed weight's data is the scheduler's dense slot, and that slot is
handed to the next layer as soon as the forward returns. Autograd saves the weight (or a view of
it, e.g. ``weight.t()`` for the GEMM behind ``F.linear``) for the backward, so it would read
whatever the slot holds by then. ``weight_hooks`` installs ``saved_tensors_hooks`` around the
forward: a saved tensor that lies in a bound slot is packed as (parameter, geometry, version) and
unpacked by decoding the weight again, exact, into a fresh tensor viewed with the same sizes,
strides and offset, so the backward computes with bit-identical operands and the same layout as
plain PyTorch's. Every other saved tensor goes to the hooks that were active outside the
forward (non-reentrant activation checkpointing installs its own), or is kept as autograd would.

The backward runs the forward's layers in reverse, so unpacking one weight starts the decode of
the weight saved just before it (on the CPU decode worker), and that weight's unpack usually
finds it done: decode overlaps the backward's compute and the optimizer steps. A guess that
misses costs one decode and is dropped; the values never depend on it.

A weight updated after its forward (the optimizer step in the backward) and unpacked later
raises as PyTorch does for a saved tensor modified in place, instead of computing with the new
values.
"""
from __future__ import annotations

import contextlib
import weakref

import torch


class _Saved:
    __slots__ = ("mp", "size", "stride", "offset", "version", "prev", "ahead", "__weakref__")

    def __init__(self, mp, size, stride, offset, version, prev):
        self.mp = mp
        self.size = size
        self.stride = stride
        self.offset = offset
        self.version = version
        self.prev = prev      # weakref to the _Saved packed before this one (the backward's next)
        self.ahead = None     # (job, dense, version): its decode, started by the unpack before


def _prefetch(h) -> None:
    """Start decoding ``h``'s weight on the scheduler's CPU decode worker (nothing on a GPU)."""
    mp = h.mp
    shared = mp.manager
    if h.ahead is not None or not mp.active or shared.scheduler is None or not shared.scheduler.decodes_ahead:
        return
    dense = torch.empty(mp.shape, dtype=mp.dtype)
    job = shared.scheduler.submit([(mp, dense)], shared.dense_into)
    if job is not None:
        h.ahead = (job, dense, mp.version)


def _decoded(h) -> torch.Tensor:
    """``h``'s weight, dense: the decode started ahead if it is of this version, else now."""
    mp = h.mp
    ahead, h.ahead = h.ahead, None
    if ahead is not None:
        job, dense, version = ahead
        job.wait()
        if version == mp.version:
            return dense
    return mp.dense_copy()


class _Outer:
    __slots__ = ("unpack", "packed")

    def __init__(self, unpack, packed):
        self.unpack = unpack
        self.packed = packed


def _spans(bound) -> list:
    """[(first byte address, end address, Param)] of the slots bound now."""
    out = []
    for mp in bound:
        d = _data_of(mp)
        n = d.numel() * d.element_size()
        if n:
            out.append((d.data_ptr(), d.data_ptr() + n, mp))
    return out


def _data_of(mp) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return mp.param.data


@contextlib.contextmanager
def weight_hooks(bound):
    """Saved-tensor hooks for the forward of a module whose weights ``bound`` (Params) are bound
    to dense slots now."""
    spans = _spans(bound)
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)

    def pack(t):
        if spans and t.device.type != "meta" and t.numel():
            p = t.data_ptr()
            for start, end, mp in spans:
                if start <= p < end:
                    item = t.element_size()
                    if t.dtype != mp.dtype or (p - start) % item:
                        return t.clone()  # another reading of the slot's bytes: a copy, exact
                    shared = mp.manager
                    h = _Saved(mp, tuple(t.shape), tuple(t.stride()), (p - start) // item, mp.version,
                               shared.last_saved)
                    shared.last_saved = weakref.ref(h)  # weak: no chain of graphs kept alive
                    return h
        if outer is not None:
            return _Outer(outer[1], outer[0](t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        yield


def _unpack(h):
    if isinstance(h, _Saved):
        mp = h.mp
        if mp.version != h.version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: nzrt's managed weight {mp.names[0]!r} was updated (version "
                f"{mp.version}, saved at version {h.version}) after a forward that saved it")
        if not mp.active:
            from .weight import _stale_error
            raise _stale_error()
        dense = _decoded(h)
        prev = h.prev() if h.prev is not None else None
        if prev is not None and prev.mp is not mp:
            _prefetch(prev)  # the backward's next weight, most likely
        trainer = mp.manager.trainer
        if trainer is not None:  # its optimizer step, right after this node, reuses the decode
            trainer.remember_unpacked(mp, dense)
        return dense.as_strided(h.size, h.stride, h.offset)
    if isinstance(h, _Outer):
        return h.unpack(h.packed)
    return h
