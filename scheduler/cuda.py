"""The CUDA side stream: decodes issued beside the compute stream, staging for host and disk tiers,
and the timing events folded into each unit's stats.

Apart from ``engine.py`` because it owns the GPU-only state (the side stream, the staging pool of
compressed bytes, the list of timing events) that a CPU run never creates.
"""
from __future__ import annotations

from .pool import SlotPool

TIMING_BACKLOG = 4096  # timing events kept before the finished ones are folded into the stats


class CudaSide:
    """``decoder``: ``decode(ct, buf)`` (a kernel on the current stream) and ``rebased(ct, data)``
    (``ct``'s header over other bytes: the staged copy)."""

    def __init__(self, device, decoder):
        import torch
        self.device = device
        self.decoder = decoder
        self.side = torch.cuda.Stream(device)
        self.stage_pool = SlotPool()  # compressed staging buffers for host/disk tiers
        self.timing: list = []        # (unit, start event, staged event or None, end event)

    def issue(self, unit, items) -> None:
        """Decode ``items`` ([(TensorSlot, dense entry, event the buffer waits for)]) on the side
        stream; each dense entry's ``event`` is recorded after its decode."""
        import torch
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
                    self.decoder.decode(self.decoder.rebased(ct, stage), d.buf)
                    t2 = timed()
                    self.stage_pool.release(sk, stage, t2)
                else:
                    self.decoder.decode(ct, d.buf)
                    t2 = timed()
                d.event = t2
                self.timing.append((unit, t0, t1, t2))

    def fold_times(self, stats: dict, wait: bool = True) -> None:
        """Fold the transfer and decode timings into ``stats`` (unit -> UnitStats). ``wait``:
        synchronise the side stream first (for a report); else fold only the finished ones."""
        if not self.timing:
            return
        if wait:
            self.side.synchronize()
        keep = []
        for entry in self.timing:
            unit, a, b, c = entry
            if not wait and not c.query():
                keep.append(entry)
                continue
            st = stats[unit]
            if b is not None:
                st.transfer_s += a.elapsed_time(b) / 1e3
                st.decode_s += b.elapsed_time(c) / 1e3
            else:
                st.decode_s += a.elapsed_time(c) / 1e3
        self.timing = keep

    def compute_waits_for_side(self) -> None:
        """The compute stream waits for everything queued on the side stream."""
        import torch
        torch.cuda.current_stream(self.device).wait_stream(self.side)
