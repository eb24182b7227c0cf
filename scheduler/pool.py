"""SlotPool: dense buffers reused across layers, keyed by (device, dtype, numel).

After the plan is known, ``reserve`` sizes the pool to the most buffers of each kind the plan
ever holds at once and frees the rest, so the steady state allocates nothing. Buffers released
on a CUDA device carry the event after which the compute stream is done with them; the next
writer waits on it (no host synchronisation).
"""
from __future__ import annotations

from collections import defaultdict


class SlotPool:
    def __init__(self):
        self._free: dict = defaultdict(list)   # key -> [(tensor, ready_event|None)]
        self.allocations = 0                    # buffers ever allocated
        self.allocated_bytes = 0                # bytes ever allocated
        self.held_bytes = 0                     # bytes of buffers that exist (free or in use)
        self.peak_bytes = 0
        self.in_use = 0

    @staticmethod
    def key(device, dtype, numel: int):
        return (str(device), dtype, int(numel))

    def _alloc(self, key):
        import torch
        device, dtype, numel = key
        with torch.inference_mode(False), torch.no_grad():
            t = torch.empty(numel, dtype=dtype, device=device)
        nbytes = t.numel() * t.element_size()
        self.allocations += 1
        self.allocated_bytes += nbytes
        self.held_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        return t

    def acquire(self, key):
        """A free buffer of this kind (allocated only when none is free) and the event its last
        reader recorded (None on the CPU)."""
        self.in_use += 1
        free = self._free.get(key)
        if free:
            return free.pop()
        return self._alloc(key), None

    def release(self, key, tensor, event=None) -> None:
        self.in_use -= 1
        self._free[key].append((tensor, event))

    def reserve(self, counts: dict) -> None:
        """Hold exactly ``counts[key]`` free-or-busy buffers of each kind the plan uses: allocate
        the missing ones now and free surplus free ones (they come back to the allocator)."""
        for key, bufs in list(self._free.items()):
            keep = counts.get(key, 0)
            while len(bufs) > keep:
                t, _ = bufs.pop()
                self.held_bytes -= t.numel() * t.element_size()
        for key, n in counts.items():
            while len(self._free[key]) < n:
                self._free[key].append((self._alloc(key), None))

    def free_count(self) -> int:
        return sum(len(v) for v in self._free.values())

    def clear(self) -> None:
        for bufs in self._free.values():
            for t, _ in bufs:
                self.held_bytes -= t.numel() * t.element_size()
        self._free.clear()
