"""SlotPool: dense buffers reused across layers.

Two kinds of buffer. A large CPU buffer (>= 1 MiB, at most ``slot_bytes``) is a *slot*: a memory
map of its own, of ``slot_bytes`` capacity (chosen by the scheduler from the plan), that any such
tensor's values may occupy (a view of its first bytes). Slots are written once, then reused pass after pass: a
fresh buffer costs a page fault per 4 KiB page when the decoder first writes it (measured on this
VM: ~40 ms for 22 MiB, ten times the decode itself), and a pool keyed by exact size that frees
buffers to stay under its cap re-made half the layers' buffers every pass. Every other buffer (small,
or on a GPU) is of one kind, keyed by (device, dtype, numel), as the caching allocator is cheap there.

After the plan is known, ``reserve`` sizes the pool to the most buffers the plan ever holds at once
and frees the rest, so the steady state allocates nothing. With a byte ``cap`` (the plan's dense
peak; the CPU sets it) the pool never holds more than that: before an allocation would pass the cap,
free buffers (the largest first) are freed. Buffers released on a CUDA device carry the event after
which the compute stream is done with them; the next writer waits on it (no host synchronisation).
"""
from __future__ import annotations

from collections import defaultdict

SLOT_MIN_BYTES = 1 << 20  # a CPU buffer this large is a slot (a map of its own, reused by any size)


def _mapped_buffer(nbytes: int):
    """A CPU byte buffer in an anonymous memory map of its own: freeing it unmaps it, so the memory
    goes back to the operating system at once (from malloc, glibc would keep it in its arenas
    and a pool that frees buffers to stay under its cap would not shrink the process)."""
    import mmap

    import torch
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes)  # the tensor keeps the map alive


def _nbytes_of(t) -> int:
    return t.numel() * t.element_size()


class SlotPool:
    def __init__(self):
        self._free: dict = defaultdict(list)   # key -> [(tensor, ready_event|None, release stamp)]
        self._slots: list = []                  # free slots: [(uint8 base, None, release stamp)]
        self._busy_slots: dict = {}             # data_ptr of a slot handed out -> its uint8 base
        self.slot_bytes = 0                     # a new slot's capacity (at least the request)
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
    def nbytes(key) -> int:
        import torch
        return int(key[2]) * torch.empty(0, dtype=key[1]).element_size()

    def is_slot(self, key) -> bool:
        """Whether a buffer for ``key`` is a slot: on the CPU, at least 1 MiB and at most
        ``slot_bytes`` (0: no slots; a larger tensor, such as a whole output head, keeps a
        buffer of its own kind rather than making every slot its size)."""
        return bool(self.slot_bytes) and key[0] == "cpu" and SLOT_MIN_BYTES <= self.nbytes(key) <= self.slot_bytes

    def slot_capacity(self, key) -> int:
        """The bytes a buffer for ``key`` holds (a slot: ``slot_bytes``)."""
        return self.slot_bytes if self.is_slot(key) else self.nbytes(key)

    def _free_lists(self):
        yield from self._free.values()
        yield self._slots

    def _make_room(self, need: int) -> None:
        """Free free buffers, the largest first (then the one released longest ago), until
        ``need`` more bytes fit under the cap (or nothing free is left). Largest first: the
        large kinds are few (an output head) and the small ones many and soon needed again, so
        this frees the fewest buffers and re-makes the fewest later."""
        while self.cap is not None and self.held_bytes + need > self.cap:
            best = None
            for bufs in self._free_lists():
                for i, (t, _, stamp) in enumerate(bufs):
                    rank = (-_nbytes_of(t), stamp)
                    if best is None or rank < best[2]:
                        best = (bufs, i, rank)
            if best is None:
                return
            t, _, _ = best[0].pop(best[1])
            self.held_bytes -= _nbytes_of(t)

    def _alloc(self, key):
        import torch
        nbytes = self.slot_capacity(key)
        self._make_room(nbytes)
        device, dtype, numel = key
        with torch.inference_mode(False), torch.no_grad():
            t = _mapped_buffer(nbytes) if self.is_slot(key) else torch.empty(numel, dtype=dtype, device=device)
        self._count(nbytes)
        return t

    def _count(self, nbytes: int) -> None:
        self.allocations += 1
        self.allocated_bytes += nbytes
        self.held_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    @classmethod
    def _view(cls, base, key):
        """``key``'s flat tensor over the first bytes of slot ``base``."""
        return base[:cls.nbytes(key)].view(key[1])

    def _take_slot(self, need: int):
        """The free slot that fits ``need`` bytes most tightly, or None."""
        fits = [(_nbytes_of(t), i) for i, (t, _, _) in enumerate(self._slots) if _nbytes_of(t) >= need]
        return self._slots.pop(min(fits)[1])[0] if fits else None

    def acquire(self, key):
        """A free buffer of this kind (allocated only when none is free) and the event its last
        reader recorded (None on the CPU)."""
        self.in_use += 1
        if self.is_slot(key):
            base = self._take_slot(self.nbytes(key))
            base = base if base is not None else self._alloc(key)
            self._busy_slots[base.data_ptr()] = base
            return self._view(base, key), None
        free = self._free.get(key)
        if free:
            t, ev, _ = free.pop()
            return t, ev
        return self._alloc(key), None

    def release(self, key, tensor, event=None) -> None:
        self.in_use -= 1
        self._stamp += 1
        base = self._busy_slots.pop(tensor.data_ptr(), None)
        if base is not None:
            self._slots.append((base, None, self._stamp))
        else:
            self._free[key].append((tensor, event, self._stamp))
        self._make_room(0)  # over the cap (the busy buffers exceeded it): give free ones back

    def reserve(self, counts: dict, slots: int = 0) -> None:
        """Hold exactly ``counts[key]`` free-or-busy buffers of each kind the plan uses (other than
        slots) and ``slots`` slots of ``slot_bytes``: allocate the missing ones now and free surplus
        free ones and slots too small (they come back to the operating system)."""
        for key, bufs in list(self._free.items()):
            keep = counts.get(key, 0)
            while len(bufs) > keep:
                t, _, _ = bufs.pop()
                self.held_bytes -= _nbytes_of(t)
        other = [s for s in self._slots if _nbytes_of(s[0]) != self.slot_bytes]
        for s in other:
            self._slots.remove(s)
            self.held_bytes -= _nbytes_of(s[0])
        while len(self._slots) > slots:
            self.held_bytes -= _nbytes_of(self._slots.pop()[0])
        # under a cap: only what fits now, the rest when needed
        fits = lambda n: self.cap is None or self.held_bytes + n <= self.cap  # noqa: E731
        while len(self._slots) < slots and self.slot_bytes and fits(self.slot_bytes):
            self._stamp += 1
            self._count(self.slot_bytes)
            self._slots.append((_mapped_buffer(self.slot_bytes), None, self._stamp))
        for key, n in counts.items():
            if self.is_slot(key):
                continue
            while len(self._free[key]) < n and fits(self.nbytes(key)):
                self._stamp += 1
                self._free[key].append((self._alloc(key), None, self._stamp))

    def fit(self, held: list, *, slots: bool, floor: int = 0) -> None:
        """Size the pool for a plan: ``held`` lists the pool keys of the buffers held at once, step
        by step. With ``slots`` (the CPU) large buffers share slots of the one size that makes the
        pool smallest (ties: the larger slot), and the cap is what the pool then keeps (its slots
        and the most buffers of each other kind), at least ``floor`` (the largest unit); without,
        each kind keeps its most buffers at once and the cap is left as it is (a GPU: a freed
        buffer may still be read by the other stream)."""
        sizes = {0} | ({self.nbytes(k) for keys in held for k in keys} if slots else set())
        best = None
        for slot_bytes in sorted(sizes):
            self.slot_bytes = slot_bytes
            counts, n_slots, peak = self._needs(held)
            kept = n_slots * slot_bytes + sum(n * self.nbytes(k) for k, n in counts.items())
            if best is None or kept <= best[0]:
                best = (kept, slot_bytes, counts, n_slots, peak)
        kept, self.slot_bytes, counts, n_slots, peak = best
        if slots:
            self.cap = max(kept, peak, floor)
        self.reserve(counts, slots=n_slots)

    def _needs(self, held: list):
        """For the slot size now: the most buffers of each non-slot kind held at once, the most
        slots held at once, and the most bytes held at once."""
        best: dict = {}
        most_slots = peak = 0
        for keys in held:
            c: dict = {}
            n_slots = 0
            for k in keys:
                if self.is_slot(k):
                    n_slots += 1
                else:
                    c[k] = c.get(k, 0) + 1
            for k, n in c.items():
                best[k] = max(best.get(k, 0), n)
            most_slots = max(most_slots, n_slots)
            peak = max(peak, sum(self.slot_capacity(k) for k in keys))
        return best, most_slots, peak

    def free_count(self) -> int:
        return sum(len(v) for v in self._free_lists())

    def clear(self) -> None:
        for bufs in self._free_lists():
            for t, _, _ in bufs:
                self.held_bytes -= _nbytes_of(t)
            bufs.clear()
        self._free.clear()
