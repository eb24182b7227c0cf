"""The CPU decode worker: one daemon thread that runs decode jobs in order, beside the model's compute.

Apart from the scheduler's policy-following (``engine.py``) because its concern is a thread's life:
jobs, their errors handed to the waiting thread, and a clean stop at the session's end or at
interpreter exit. ``Job`` is public: the runtime's autograd path (``nzrt.runtime.saved``) submits
its own decode ahead through ``Scheduler.submit``.
"""
from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref


class Job:
    """Decode ``items`` ([(compressed, dense buffer)]) with ``decode(compressed, buffer)``; ``unit``:
    whose stats its seconds go to (None: nobody's). ``wait()`` re-raises the job's error."""

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

    def submit(self, job: Job) -> None:
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
