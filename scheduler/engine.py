"""The scheduler: makes units dense just before they run, following a policy's plan.

Mechanism only; the decisions come from a policy (``nzrt.policies``). One pass = one forward of
the root module. The first pass is recorded (units decoded on demand, one at a time); then the
policy plans from the trace and the measured costs, and later passes follow the plan: before a
unit runs, the scheduler issues the decodes the plan prefetches at that step (to a CPU worker
thread, or on a CUDA side stream), waits only for the unit's own decode, and after the unit ran
drops the dense copies the plan releases. A pass that departs from the trace (a unit skipped, run
twice, other control flow) is detected at the first unit that differs: the rest of that pass is
decoded on demand and the next pass is traced again, so results never depend on the trace.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..policies.plan import Tier
from .cuda import TIMING_BACKLOG, CudaSide
from .pool import SlotPool
from .trace import TraceRecorder
from .worker import CpuWorker, Job

RECORD, FOLLOW, ONDEMAND = "record", "follow", "on-demand"
ONDEMAND_STEADY = "on-demand (steady)"  # a plan without prefetch (prefetch=False): on demand for good


@dataclass
class TensorSlot:
    """One compressed tensor. ``ct``: where it lives now (its tier); ``home``: the copy it was
    created as (host memory or a memory-mapped file), kept for moving between tiers."""

    key: str
    ct: object
    shape: tuple
    dtype: object
    numel: int
    home: object = None
    on_disk: bool = False

    @property
    def dense_bytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def _itemsize(dtype) -> int:
    import torch
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class UnitStats:
    decodes: int = 0
    decode_s: float = 0.0
    transfer_s: float = 0.0
    stall_s: float = 0.0
    hits: int = 0      # the unit was dense (or its decode already issued) when it was needed
    misses: int = 0    # decoded on demand
    runs: int = 0


@dataclass
class _Dense:
    buf: object
    pool_key: tuple
    refs: set = field(default_factory=set)
    job: object = None        # CPU: the Job writing buf
    event: object = None      # CUDA: event recorded after the decode on the side stream
    pinned: bool = False      # dense tier: never released


class Scheduler:
    """``units``: name -> tuple of tensor keys; ``tensors``: key -> TensorSlot.
    ``planner(trace, seconds) -> Plan`` is called after every recorded pass (the runtime binds the
    policy, layer sizes, budget and costs into it); ``place(plan)`` moves tensors to the plan's
    tiers (the runtime's job too); ``decoder``: ``decode(ct, buf)`` writes a compressed tensor's
    values into a flat dense buffer, ``rebased(ct, data)`` is ``ct`` over other bytes (CUDA staging)."""

    def __init__(self, units: dict, tensors: dict, device, *, planner, place, decoder, prefetch: bool = True,
                 decode_threads: int | None = None):
        import torch
        self.units = units
        self.tensors = tensors
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.planner = planner
        self.place = place
        self.decoder = decoder
        self.prefetch_enabled = prefetch
        self.pool = SlotPool()
        if self.device.type != "cuda":  # before a plan: one unit at a time (on demand), so its size
            self.pool.cap = self._largest_unit_bytes()
        self._store: dict = {}         # key -> _Dense
        self.held: set = set()        # units the scheduler holds dense (by plan or on demand)
        self.stats = {u: UnitStats() for u in units}
        self.recorder = TraceRecorder()
        self.plan = None
        self.trace: tuple = ()
        self.mode = RECORD
        self.pos = 0
        self.depth = 0                # nesting of root passes
        self.stack: list = []         # (unit, step index or None) of units running now
        self.passes = 0
        self.divergences = 0
        self.replans = 0
        self.runtime_peak = 0
        self._worker = None
        self._cuda = CudaSide(self.device, decoder) if self.cuda else None
        if not self.cuda and prefetch:
            self._worker = CpuWorker(decode_threads)

    # -- pass boundaries ----------------------------------------------------------------------
    def begin_pass(self) -> None:
        self.depth += 1
        if self.depth > 1:
            return
        if self.mode == RECORD:
            self.recorder.start()
        elif self.mode == FOLLOW and self.trace and self.pos % len(self.trace):
            self._diverge()

    def end_pass(self, ok: bool = True) -> None:
        self.depth -= 1
        if self.depth > 0:
            return
        self.passes += 1
        if self.cuda and len(self._cuda.timing) > TIMING_BACKLOG:
            self.cuda_times(wait=False)  # keep the list of timing events bounded
        if not ok:  # an exception inside the forward: drop everything, trace again
            self.recorder.active = False
            self._drop_all()
            self.mode = RECORD
            self.pos = 0
            return
        if self.mode == RECORD:
            trace = self.recorder.finish()
            self._install(trace, self.recorder.seconds)
        elif self.mode == FOLLOW:
            if self.trace and self.pos % len(self.trace):
                self.divergences += 1  # the pass ended early: a unit was skipped at the end
                self._drop_all()
                self.mode = RECORD
                self.pos = 0
        elif self.mode == ONDEMAND:
            self._drop_all()
            self.mode = RECORD
            self.pos = 0

    def _install(self, trace: tuple, seconds: dict) -> None:
        self._drop_all(include_pinned=True)  # the new plan may pin other units
        plan = self.planner(trace, seconds)
        self.replans += 1
        self.place(plan)
        self.plan = plan
        self.trace = trace
        self.pos = 0
        tiers = plan.tier_of
        for u, t in tiers.items():
            if t == Tier.DENSE:
                self._issue(u, pinned=True)
        if trace and plan.steps:
            self._reserve(plan)
            self.mode = FOLLOW if self.prefetch_enabled else ONDEMAND_STEADY
            if self.mode == FOLLOW:
                for u in sorted(plan.initial_dense):
                    self._issue(u)
        else:
            self.mode = RECORD  # nothing ran in that pass: trace the next one

    def _largest_unit_bytes(self, skip=()) -> int:
        return max((sum(self.tensors[k].dense_bytes for k in keys) for u, keys in self.units.items()
                    if u not in skip), default=0)

    def _reserve(self, plan) -> None:
        """Size the pool from the plan: the buffers it holds at once, step by step (``SlotPool.fit``)."""
        if self.cuda:  # buffers about to be freed may still be written by the side stream
            self._cuda.compute_waits_for_side()
        pinned = {u for u, t in plan.tier_of.items() if t == Tier.DENSE}
        pinned_keys = {k for u in pinned for k in self.units[u]}
        kinds = [[SlotPool.key(self.device, self.tensors[k].dtype, self.tensors[k].numel) for k in keys]
                 for keys in held_sets(plan, self.units, self.prefetch_enabled, pinned, pinned_keys)]
        self.pool.fit(kinds, slots=not self.cuda, floor=self._largest_unit_bytes(skip=pinned))

    # -- per unit -------------------------------------------------------------------------------
    def enter(self, unit: str, traced: bool = True) -> dict:
        """Called right before ``unit`` runs. Returns key -> dense buffer (flat) for its tensors.
        ``traced=False``: a unit whose use depends on the data (an embedding row chunk that only
        some token ids hit): decoded on demand, never part of the trace or the plan."""
        step = None
        if self.depth > 0 and traced:
            if self.mode == FOLLOW:
                s = self.plan.steps[self.pos % len(self.plan.steps)]
                if s.unit != unit:
                    self._diverge()
                else:
                    step = self.pos % len(self.plan.steps)
                    self.pos += 1
                    for p in s.prefetch:
                        if p not in self.held:
                            self._issue(p)
        st = self.stats[unit]
        st.runs += 1
        if unit in self.held:
            st.hits += 1
        else:
            st.misses += 1
            self._issue(unit, inline=True)
        bufs = self._wait(unit)
        if self.depth > 0 and self.mode == RECORD and traced:
            self.recorder.enter(unit)  # after the decode: the recorded time is compute only
        self.stack.append((unit, step))
        return bufs

    def exit(self, unit: str) -> None:
        """Called after ``unit`` ran (also when it raised)."""
        if not self.stack:
            return
        # tolerate exits out of order (an exception unwinding several units at once)
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == unit:
                _, step = self.stack.pop(i)
                break
        else:
            return
        if self.depth > 0 and self.mode == RECORD:
            self.recorder.exit(unit)
        if step is not None and self.mode == FOLLOW:
            for r in self.plan.steps[step].release:
                self._release(r)
        elif not self._pinned(unit):
            self._release(unit)
        self._account()

    # -- mechanism ------------------------------------------------------------------------------
    def drop_idle(self) -> None:
        """Between passes: let go of every dense copy that is not pinned by the plan (prefetched
        for a pass that is not coming next), and on the CPU of the pool's free buffers. The next
        traced pass decodes its first units on demand."""
        if self.depth or self.stack:
            return
        self._drop_all()
        if not self.cuda:
            self.pool.clear()

    def _pinned(self, unit) -> bool:
        return bool(self.plan) and self.plan.tier_of.get(unit) == Tier.DENSE

    def _in_use(self) -> set:
        return {u for u, _ in self.stack}

    def _diverge(self) -> None:
        self.divergences += 1
        busy = self._in_use()
        for u in list(self.held):
            if u not in busy and not self._pinned(u):
                self._release(u)
        self.mode = ONDEMAND
        self.pos = 0

    def _drop_all(self, include_pinned: bool = False) -> None:
        busy = self._in_use()
        for u in list(self.held):
            if u not in busy and (include_pinned or not self._pinned(u)):
                self._release(u)

    def _issue(self, unit: str, *, inline: bool = False, pinned: bool = False) -> None:
        """Start making ``unit`` dense: for each of its tensors not dense yet, take a buffer and
        decode into it (in this thread when ``inline``, else on the worker / side stream)."""
        import torch
        if unit in self.held:
            return
        self.held.add(unit)
        items = []
        for key in self.units[unit]:
            d = self._store.get(key)
            if d is not None:
                d.refs.add(unit)
                d.pinned |= pinned
                continue
            s = self.tensors[key]
            pk = SlotPool.key(self.device, s.dtype, s.numel)
            if pinned:
                with torch.inference_mode(False), torch.no_grad():
                    buf, ev = torch.empty(s.numel, dtype=s.dtype, device=self.device), None
            else:
                buf, ev = self.pool.acquire(pk)
            d = _Dense(buf=buf, pool_key=pk, refs={unit}, pinned=pinned)
            self._store[key] = d
            items.append((s, d, ev))
        if not items:
            return
        st = self.stats[unit]
        st.decodes += 1
        if self.cuda:
            self._cuda.issue(unit, items)
            return
        job = Job([(s.ct, d.buf) for s, d, _ in items], unit, self.decoder.decode)
        for _, d, _ in items:
            d.job = job
        if inline or self._worker is None:
            job.run()
            st.decode_s += job.seconds
            job.unit = None
            job.wait()
        else:
            self._worker.submit(job)

    def _wait(self, unit: str) -> dict:
        out = {}
        t0 = None
        for key in self.units[unit]:
            d = self._store[key]
            if self.cuda:
                if d.event is not None:
                    import torch
                    torch.cuda.current_stream(self.device).wait_event(d.event)
            elif d.job is not None:
                if not d.job.done.is_set():
                    t0 = t0 or time.perf_counter()
                self._finish_job(d)
            out[key] = d.buf
        if t0 is not None:
            self.stats[unit].stall_s += time.perf_counter() - t0
        return out

    def _release(self, unit: str) -> None:
        if unit not in self.held:
            return
        self.held.discard(unit)
        for key in self.units[unit]:
            d = self._store.get(key)
            if d is None:
                continue
            d.refs.discard(unit)
            if d.refs:
                continue
            del self._store[key]
            if d.pinned:
                continue
            ev = None
            if self.cuda:
                import torch
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
            elif d.job is not None:
                self._finish_job(d)  # never hand out a buffer that is still being written
            self.pool.release(d.pool_key, d.buf, ev)

    def refresh(self, key: str, flat) -> None:
        """``key``'s weight changed (a training step): a dense copy held now takes the new values
        (``flat``: the new dense values, flat, on the device). A decode in flight into it finishes
        first; the next decode reads the tensor's new compressed copy."""
        d = self._store.get(key)
        if d is None:
            return
        if self.cuda:
            import torch
            if d.event is not None:
                torch.cuda.current_stream(self.device).wait_event(d.event)
        elif d.job is not None:
            self._finish_job(d)
        import torch
        with torch.no_grad():
            d.buf.copy_(flat)

    def _finish_job(self, d: "_Dense") -> None:
        """Wait for the CPU decode writing ``d.buf``; its time is counted once, to its unit."""
        d.job.wait()
        if d.job.unit is not None:
            self.stats[d.job.unit].decode_s += d.job.seconds
            d.job.unit = None
        d.job = None

    def _account(self) -> None:
        self.runtime_peak = max(self.runtime_peak, self.dense_bytes_held())

    def dense_bytes_held(self) -> int:
        """The pool's buffers, CUDA staging buffers, and the dense tier's pinned copies."""
        staged = self._cuda.stage_pool.held_bytes if self.cuda else 0
        return self.pool.held_bytes + staged + sum(
            d.buf.numel() * d.buf.element_size() for d in self._store.values() if d.pinned)

    def cuda_times(self, wait: bool = True) -> None:
        """Fold the CUDA transfer and decode timings into the stats (see ``CudaSide.fold_times``)."""
        if self.cuda:
            self._cuda.fold_times(self.stats, wait)

    # -- what the runtime asks ------------------------------------------------------------------
    def is_held(self, key: str) -> bool:
        """Whether a dense copy of tensor ``key`` is held now (by plan or on demand)."""
        return key in self._store

    @property
    def decodes_ahead(self) -> bool:
        """Whether a live CPU decode worker takes ``submit``ted jobs (not on a GPU, with prefetch
        off, or after shutdown)."""
        return self._worker is not None and self._worker.alive

    def submit(self, items, decode) -> "Job | None":
        """Run ``decode(source, buffer)`` for ``items`` on the CPU decode worker, ahead of need
        (the backward's next weight); None without one (``decodes_ahead``): the caller decodes
        when it needs the values."""
        if not self.decodes_ahead:
            return None
        job = Job(items, None, decode)
        self._worker.submit(job)
        return job

    def worker_stopper(self):
        """A callable that stops the decode worker without referring to this scheduler (for a
        finalizer of a session collected without detach), or None without a worker."""
        return None if self._worker is None else lambda worker=self._worker: worker.stop(False)

    def shutdown(self) -> None:
        """Wait for every decode in flight, drop every dense copy, stop the worker."""
        for d in list(self._store.values()):
            if d.job is not None:
                try:
                    d.job.wait()
                except BaseException:
                    pass
        if self.cuda:
            self.cuda_times()
            self._cuda.compute_waits_for_side()
        self.stack.clear()
        for u in list(self.held):
            self.held.discard(u)
        self._store.clear()
        self.pool.clear()
        if self.cuda:
            self._cuda.stage_pool.clear()
        if self._worker is not None:
            self._worker.stop()
            self._worker = None



def held_sets(plan, units: dict, prefetch: bool, pinned: set, pinned_keys: set):
    """The sets of tensor keys ``plan`` holds dense at once (the dense tier's aside), step by step:
    with prefetch, what is prefetched and not yet released (two cycles, so the wrap-around is seen)."""
    if not prefetch:
        for s in plan.steps:
            yield set() if s.unit in pinned else set(units[s.unit]) - pinned_keys
        return
    held = set(plan.initial_dense)
    for _ in range(2):
        for s in plan.steps:
            held |= set(s.prefetch)
            yield {k for u in held | ({s.unit} - pinned) for k in units[u]} - pinned_keys
            held -= set(s.release)
