"""The forwards the runtime wraps: one pass at a time, weights bound to dense slots inside.

Every module that owns a managed weight gets an instance-level ``forward`` that makes its
weights dense (the scheduler's slots), binds them to the parameters, runs the original forward
and unbinds in a ``finally`` -- so an exception of any kind, KeyboardInterrupt included, leaves
no parameter bound and no pass half open (forward hooks would not: ``nn.Module`` calls
``always_call`` hooks on ``Exception`` only). The root module's forward brackets a pass.

With autograd on, ``nzrt.runtime.saved`` keeps what the graph saves of a weight as a token that
the backward decodes again (the slot is reused by the next layer).

Passes are serialised: a re-entrant lock is held from a module's entry to its exit, so two
threads calling one managed model run one forward at a time and each gets exact outputs.
"""
from __future__ import annotations

import functools

import threading

import torch

from .. import osmem
from .fused import wants_fused_pass
from .saved import weight_hooks
from .weight import set_data


class PassLock:
    """A re-entrant lock that knows its owner (``RLock`` does not say who holds it)."""

    def __init__(self):
        self._lock = threading.RLock()
        self.owner = None
        self.count = 0

    def acquire(self) -> None:
        self._lock.acquire()
        self.owner = threading.get_ident()
        self.count += 1

    def release(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.owner = None
        self._lock.release()

    def __enter__(self) -> "PassLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def held_here(self) -> bool:
        """Whether the calling thread holds the lock (inside a pass)."""
        return self.owner == threading.get_ident()


def bind(mp, buf) -> None:
    if mp.binds == 0:
        set_data(mp.param, buf.view(mp.shape))
        mp.bind_thread = threading.get_ident()
    mp.binds += 1


def unbind(mp) -> None:
    mp.binds -= 1
    if mp.binds <= 0:
        mp.binds = 0
        mp.bind_thread = None
        set_data(mp.param, mp.placeholder)


def unit_forward(shared, unit, bindings, inner):
    """``bindings``: [(Param, key)] of the module's own weights."""
    lock = shared.lock

    def forward(*args, **kwargs):
        with lock:
            s = shared.scheduler
            bufs = s.enter(unit)
            bound = []
            try:
                for mp, key in bindings:
                    bind(mp, bufs[key])
                    bound.append(mp)
                if torch.is_grad_enabled():  # autograd keeps tokens of the slots, not the slots
                    with weight_hooks(bound):
                        return inner(*args, **kwargs)
                return inner(*args, **kwargs)
            finally:
                for mp in bound:
                    unbind(mp)
                s.exit(unit)
    return forward


def root_forward(shared, inner):
    lock = shared.lock

    # wraps: callers that inspect the forward's signature see the model's own (transformers'
    # generate passes ``logits_to_keep=1`` only to a forward that declares it; without it the
    # prompt's head runs over every position, another GEMM shape, and the last row's bits differ)
    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with lock:
            if shared.fused is not None:
                if shared.fused_pass:  # the root called again inside a fused pass
                    return inner(*args, **kwargs)
                if wants_fused_pass(shared, args, kwargs):
                    return fused_pass(shared, inner, args, kwargs)
            s = shared.scheduler
            s.begin_pass()
            ok = False
            try:
                out = inner(*args, **kwargs)
                ok = True
                return out
            finally:
                s.end_pass(ok)
                if s.depth == 0:
                    snap = shared.tracker.sample()
                    if not s.cuda:
                        _trim_if_grown(shared, snap.get("host_rss") or 0)
                    if torch.is_grad_enabled() and not s.cuda:
                        # the backward decodes each weight afresh: the pool's idle slots would
                        # sit beside those copies until the next pass (on a GPU a freed slot
                        # may still be read by the side stream; the caching allocator keeps it)
                        s.pool.clear()
    return forward


TRIM_GROWTH = 8 << 20  # RSS grown since the last trim that makes a pass end with one


def _trim_if_grown(shared, now: int) -> None:
    """At the end of an outermost pass on the CPU: when RSS grew by ``TRIM_GROWTH`` since the last
    trim (a prefill's activations, say), the freed temporaries leave glibc's arenas, where they
    would sit beside the compressed model; a 1-token step seldom grows it, so seldom pays the
    trim (milliseconds on a fragmented heap). ``now``: this process's RSS."""
    last = shared.rss_after_trim
    if now > last + TRIM_GROWTH or now < last:
        osmem.trim()
        shared.rss_after_trim = osmem.rss().get("rss") or 0


def fused_pass(shared, inner, args, kwargs):
    """A pass with few rows under ``policies.Fused`` (see ``runtime/fused.py``): out of the
    scheduler's trace, its prefetched copies let go; the lock is held by the caller."""
    s = shared.scheduler
    s.drop_idle()
    shared.fused_pass = True
    try:
        return inner(*args, **kwargs)
    finally:
        shared.fused_pass = False
        shared.fused_stats.passes += 1
        if s.depth == 0:
            shared.tracker.sample()
