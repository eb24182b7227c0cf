"""SlotPool: dense buffers reused across layers, keyed by (device, dtype, numel).

After the plan is known, ``reserve`` sizes the pool to the most buffers of each kind the plan
ever holds at once and frees the rest, so without a cap the steady state allocates nothing. With a byte
``cap`` (the plan's dense peak; the CPU sets it) the pool never holds more than that: the most
buffers of each kind are not all needed at the same time, and keeping them all would hold more
than the plan counts, so before an allocation would pass the cap free buffers (the largest
first) are freed, and a pass re-makes a few buffers (measured: about one per kind). Buffers released
on a CUDA device carry the event after which the compute stream is done with them; the next
writer waits on it (no host synchronisation).
"""
from __future__ import annotations

from collections import defaultdict


_OWN_MAP_BYTES = 1 << 20


def _mapped_buffer(numel: int, dtype):
    """A CPU buffer in an anonymous memory map of its own: freeing it unmaps it, so the memory
    goes back to the operating system at once (from malloc, glibc would keep it in its arenas
    and a pool that frees buffers to stay under its cap would not shrink the process)."""
    import mmap

    import torch
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(m, dtype=dtype, count=numel)  # the tensor keeps the map alive


class SlotPool:
    def __init__(self):
        self._free: dict = defaultdict(list)   # key -> [(tensor, ready_event|None, release stamp)]
        self.allocations = 0                    # buffers ever allocated
        self.allocated_bytes = 0                # bytes ever allocated
        self.held_bytes = 0                     # bytes of buffers that exist (free or in use)
        self.peak_bytes = 0
        self.in_use = 0
        self.cap: int | None = None             # bytes held at most (free and busy), when set
        self._stamp = 0

    @staticmethod
    def key(device, dtype, numel: int):
        return (str(device), dtype, int(numel))

    @staticmethod
    def _nbytes(key) -> int:
        import torch
        return int(key[2]) * torch.empty(0, dtype=key[1]).element_size()

    def _make_room(self, need: int) -> None:
        """Free free buffers, the largest first (then the one released longest ago), until
        ``need`` more bytes fit under the cap (or nothing free is left). Largest first: the
        large kinds are few (an output head) and the small ones many and soon needed again, so
        this frees the fewest buffers and re-makes the fewest later."""
        while self.cap is not None and self.held_bytes + need > self.cap:
            best = None
            for key, bufs in self._free.items():
                for i, (t, _, stamp) in enumerate(bufs):
                    rank = (-t.numel() * t.element_size(), stamp)
                    if best is None or rank < best[2]:
                        best = (key, i, rank)
            if best is None:
                return
            t, _, _ = self._free[best[0]].pop(best[1])
            self.held_bytes -= t.numel() * t.element_size()

    def _alloc(self, key):
        import torch
        self._make_room(self._nbytes(key))
        device, dtype, numel = key
        with torch.inference_mode(False), torch.no_grad():
            if device == "cpu" and self._nbytes(key) >= _OWN_MAP_BYTES:
                t = _mapped_buffer(numel, dtype)
            else:
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
            t, ev, _ = free.pop()
            return t, ev
        return self._alloc(key), None

    def release(self, key, tensor, event=None) -> None:
        self.in_use -= 1
        self._stamp += 1
        self._free[key].append((tensor, event, self._stamp))
        self._make_room(0)  # over the cap (the busy buffers exceeded it): give free ones back

    def reserve(self, counts: dict) -> None:
        """Hold exactly ``counts[key]`` free-or-busy buffers of each kind the plan uses: allocate
        the missing ones now and free surplus free ones (they come back to the allocator)."""
        for key, bufs in list(self._free.items()):
            keep = counts.get(key, 0)
            while len(bufs) > keep:
                t, _, _ = bufs.pop()
                self.held_bytes -= t.numel() * t.element_size()
        for key, n in counts.items():  # under a cap: only what fits now, the rest when needed
            while len(self._free[key]) < n and (self.cap is None or
                                                self.held_bytes + self._nbytes(key) <= self.cap):
                self._stamp += 1
                self._free[key].append((self._alloc(key), None, self._stamp))

    def free_count(self) -> int:
        return sum(len(v) for v in self._free.values())

    def clear(self) -> None:
        for bufs in self._free.values():
            for t, _, _ in bufs:
                self.held_bytes -= t.numel() * t.element_size()
        self._free.clear()
