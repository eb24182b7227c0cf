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

import atexit
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field

from .pool import SlotPool
from .trace import TraceRecorder

RECORD, FOLLOW, ONDEMAND = "record", "follow", "on-demand"


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
    job: object = None        # CPU: the _Job writing buf
    event: object = None      # CUDA: event recorded after the decode on the side stream
    pinned: bool = False      # dense tier: never released


class _Job:
    __slots__ = ("items", "unit", "done", "error", "seconds", "decode")

    def __init__(self, items, unit, decode):
        self.items = items
        self.unit = unit
        self.done = threading.Event()
        self.error = None
        self.seconds = 0.0
        self.decode = decode

    def run(self):
        t0 = time.perf_counter()
        try:
            for ct, buf in self.items:
                self.decode(ct, buf)
        except BaseException as e:  # re-raised in the thread that waits
            self.error = e
        finally:
            self.seconds = time.perf_counter() - t0
            self.done.set()

    def wait(self):
        self.done.wait()
        if self.error is not None:
            raise self.error


_LIVE_WORKERS: "weakref.WeakSet[CpuWorker]" = weakref.WeakSet()


@atexit.register
def _stop_live_workers() -> None:
    """At interpreter exit, before daemon threads are abandoned: let each worker finish its job and
    end. A session left open (``from_pretrained`` without ``release``) may still be decoding a
    prefetch; a daemon thread inside numba's or torch's OpenMP pool while the process tears those
    pools down aborts it (``terminate called without an active exception``, exit status 134)."""
    for worker in list(_LIVE_WORKERS):
        worker.stop()


class CpuWorker:
    """One daemon thread running decode jobs in order. The numba decoder releases the GIL, so
    decoding overlaps the model's compute. After ``stop`` (the session's end, or interpreter exit)
    a submitted job runs in the caller's thread, so nothing waits on a thread that is gone."""

    def __init__(self, threads: int | None = None):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = threads
        self._stopped = False
        self._lock = threading.Lock()  # a job is queued before the stop mark, or runs in its caller
        self._thread = threading.Thread(target=self._loop, name="nzrt-decode", daemon=True)
        self._thread.start()
        _LIVE_WORKERS.add(self)

    def _loop(self):
        if self._threads:
            try:  # numba's thread count is per calling thread: this one only
                import numba
                numba.set_num_threads(min(self._threads, numba.config.NUMBA_NUM_THREADS))
            except Exception:
                pass
        while True:
            job = self._q.get()
            if job is None:
                return
            job.run()
            # while blocked in get() the last job must not stay referenced from this frame: it
            # refers to the runtime (its decode), which refers to the model, which could then
            # never be garbage-collected
            del job

    def submit(self, job: _Job) -> None:
        with self._lock:
            if not self._stopped:
                self._q.put(job)
                return
        job.run()

    @property
    def alive(self) -> bool:
        return not self._stopped and self._thread.is_alive()

    def stop(self, wait: bool = True) -> None:
        """End the thread after the jobs already queued; ``wait``: join it (never from itself)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._q.put(None)
        _LIVE_WORKERS.discard(self)
        if wait and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)


class Scheduler:
    """``units``: name -> tuple of tensor keys; ``tensors``: key -> TensorSlot.
    ``planner(trace, seconds) -> Plan`` is called after every recorded pass (the runtime binds the
    policy, layer sizes, budget and costs into it); ``place(plan)`` moves tensors to the plan's
    tiers (the runtime's job too)."""

    def __init__(self, units: dict, tensors: dict, device, *, planner, place, decode, prefetch: bool = True,
                 decode_threads: int | None = None):
        import torch
        self.units = units
        self.tensors = tensors
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.planner = planner
        self.place = place
        self.decode = decode
        self.prefetch_enabled = prefetch
        self.pool = SlotPool()
        self.stage_pool = SlotPool()  # compressed staging buffers for host/disk tiers on CUDA
        if self.device.type != "cuda":  # before a plan: one unit at a time (on demand), so its size
            self.pool.cap = self._largest_unit_bytes()
        self.store: dict = {}         # key -> _Dense
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
        self._cuda_timing: list = []  # (unit, start event, end event)
        self._worker = None
        if self.cuda:
            self.side = torch.cuda.Stream(self.device)
        elif prefetch:
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
        if self.cuda and len(self._cuda_timing) > 4096:
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
            if t == "dense":
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
        """Size the pool from the plan: the most buffers of each kind held at once."""
        if self.cuda:  # buffers about to be freed may still be written by the side stream
            import torch
            torch.cuda.current_stream(self.device).wait_stream(self.side)
        held = set(plan.initial_dense) if self.prefetch_enabled else set()
        tiers = plan.tier_of
        pinned = {u for u, t in tiers.items() if t == "dense"}
        pinned_keys = {k for u in pinned for k in self.units[u]}
        best: dict = {}
        peak = [0]  # the most dense bytes held at once: the pool's cap on the CPU

        def count(units):
            keys = {k for u in units for k in self.units[u]} - pinned_keys
            c: dict = {}
            for k in keys:
                s = self.tensors[k]
                pk = SlotPool.key(self.device, s.dtype, s.numel)
                c[pk] = c.get(pk, 0) + 1
            for pk, n in c.items():
                best[pk] = max(best.get(pk, 0), n)
            peak[0] = max(peak[0], sum(self.tensors[k].dense_bytes for k in keys))

        if self.prefetch_enabled:
            for _ in range(2):
                for s in plan.steps:
                    held |= set(s.prefetch)
                    count(held | ({s.unit} - pinned))
                    held -= set(s.release)
        else:
            for s in plan.steps:
                count({s.unit} - pinned)
        # on the CPU the pool holds no more than the plan's dense peak (a buffer freed there is
        # gone at once; on a GPU a freed buffer may still be read by the other stream)
        if not self.cuda:
            self.pool.cap = max(peak[0], self._largest_unit_bytes(skip=pinned))
        self.pool.reserve(best)

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
        return bool(self.plan) and self.plan.tier_of.get(unit) == "dense"

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
            d = self.store.get(key)
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
            self.store[key] = d
            items.append((s, d, ev))
        if not items:
            return
        st = self.stats[unit]
        st.decodes += 1
        if self.cuda:
            self._issue_cuda(unit, items)
            return
        job = _Job([(s.ct, d.buf) for s, d, _ in items], unit, self.decode)
        for _, d, _ in items:
            d.job = job
        if inline or self._worker is None:
            job.run()
            st.decode_s += job.seconds
            job.unit = None
            job.wait()
        else:
            self._worker.submit(job)

    def _issue_cuda(self, unit, items) -> None:
        import torch
        from nzrt.format import CompressedTensor
        side = self.side

        def timed():
            e = torch.cuda.Event(enable_timing=True)
            e.record(side)
            return e

        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(side):
            for s, d, ev in items:
                if ev is not None:
                    side.wait_event(ev)  # the compute stream is done with this buffer
                else:
                    # a buffer never released yet was allocated on the compute stream: the caching
                    # allocator may have handed it memory that kernels queued there still use
                    side.wait_stream(compute)
                ct = s.ct
                t0 = timed()
                t1 = None
                if ct.device.type != "cuda":  # host or disk tier: stream the compressed bytes
                    n = ct.data.numel()
                    sk = SlotPool.key(self.device, torch.uint8, n)
                    stage, sev = self.stage_pool.acquire(sk)
                    if sev is not None:
                        side.wait_event(sev)  # the previous decode from this staging buffer is done
                    # host tier: pinned once at placement; disk tier: through a pinned bounce
                    # buffer (the caching host allocator keeps it alive until the copy is done)
                    src = ct.data if ct.data.is_pinned() else ct.data.pin_memory()
                    stage.copy_(src, non_blocking=True)
                    t1 = timed()
                    ct = CompressedTensor(ct.header, stage, verified=True)
                    self.decode(ct, d.buf)
                    t2 = timed()
                    self.stage_pool.release(sk, stage, t2)
                else:
                    self.decode(ct, d.buf)
                    t2 = timed()
                d.event = t2
                self._cuda_timing.append((unit, t0, t1, t2))

    def _wait(self, unit: str) -> dict:
        out = {}
        t0 = None
        for key in self.units[unit]:
            d = self.store[key]
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
            d = self.store.get(key)
            if d is None:
                continue
            d.refs.discard(unit)
            if d.refs:
                continue
            del self.store[key]
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
        d = self.store.get(key)
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
        held = self.pool.held_bytes + self.stage_pool.held_bytes
        held += sum(d.buf.numel() * d.buf.element_size() for d in self.store.values() if d.pinned)
        self.runtime_peak = max(self.runtime_peak, held)

    def dense_bytes_held(self) -> int:
        return self.pool.held_bytes + self.stage_pool.held_bytes + sum(
            d.buf.numel() * d.buf.element_size() for d in self.store.values() if d.pinned)

    def cuda_times(self, wait: bool = True) -> None:
        """Fold the CUDA transfer and decode timings into the stats. ``wait``: synchronise the
        side stream first (for a report); else fold only the finished ones (no host sync)."""
        if not self._cuda_timing:
            return
        if wait:
            self.side.synchronize()
        keep = []
        for entry in self._cuda_timing:
            unit, a, b, c = entry
            if not wait and not c.query():
                keep.append(entry)
                continue
            st = self.stats[unit]
            if b is not None:
                st.transfer_s += a.elapsed_time(b) / 1e3
                st.decode_s += b.elapsed_time(c) / 1e3
            else:
                st.decode_s += a.elapsed_time(c) / 1e3
        self._cuda_timing = keep

    def shutdown(self) -> None:
        """Wait for every decode in flight, drop every dense copy, stop the worker."""
        for d in list(self.store.values()):
            if d.job is not None:
                try:
                    d.job.wait()
                except BaseException:
                    pass
        if self.cuda:
            self.cuda_times()
            import torch
            torch.cuda.current_stream(self.device).wait_stream(self.side)
        self.stack.clear()
        for u in list(self.held):
            self.held.discard(u)
        self.store.clear()
        self.pool.clear()
        self.stage_pool.clear()
        if self._worker is not None:
            self._worker.stop()
            self._worker = None


ONDEMAND_STEADY = "on-demand (steady)"
