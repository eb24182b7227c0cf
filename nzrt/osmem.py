"""Memory as the operating system sees it: give back what nzrt no longer needs.

Two leaks that no Python-level ``del`` fixes (both measured as process RSS):

* **File-backed pages.** transformers (and ``nzrt.load``) map checkpoints into memory; a page
  that was read stays in the process's RSS while *any* tensor views the same file, even after
  the tensor that read it is freed. ``release_file_pages`` asks the kernel to reclaim the pages
  of one tensor (``madvise(MADV_PAGEOUT)``, Linux >= 5.4). That is safe whatever else views
  them: a clean file page is read again from the file on the next access, and a page that was
  written (copy-on-write, so anonymous) is never dropped -- at worst swapped out. It also evicts
  the pages from the page cache, so the next read goes to the disk: for a mapping that cannot
  have been written (``nzrt.load``'s compressed blobs, mapped read-only and read again every
  pass by the disk tier) ``unmap_file_pages`` uses ``MADV_DONTNEED`` instead: RSS falls as much,
  and the page cache keeps the bytes for the next pass (the OS reclaims them when it needs to).
* **The allocator's arenas.** glibc keeps freed memory for reuse; ``trim`` returns it
  (``malloc_trim(0)``).
* **Idle library code.** Loading numba's cached codec touches ~70-100 MiB of ``libllvmlite.so``
  (LLVM) that sit idle afterwards; ``release_idle_code`` unmaps those clean pages
  (``madvise(MADV_DONTNEED)``), so the codec's fixed cost is what it really uses.

Both are best-effort and silent no-ops where unsupported (other platforms, old kernels).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MADV_DONTNEED = 4
MADV_PAGEOUT = 21
IDLE_CODE_LIBRARIES = ("libllvmlite",)  # LLVM: used to load or compile numba code, idle between
_LIBC = None
_PAGE = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                lib.madvise.restype = ctypes.c_int
                _LIBC = lib
            except (OSError, AttributeError):  # pragma: no cover
                _LIBC = False
    return _LIBC


def page_size() -> int:
    global _PAGE
    if _PAGE is None:
        _PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    return _PAGE


def file_mappings(readonly: bool = False) -> list[tuple[int, int]]:
    """[(start, end)] of this process's mappings that are backed by a file (not anonymous,
    not the heap or stack), from ``/proc/self/maps``; empty where that file does not exist.
    ``readonly``: only those mapped without write permission (no page of them can be dirty)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 6 or parts[4] == "0":  # inode 0: anonymous
                    continue
                path = parts[5].strip()
                if not path.startswith("/"):  # [heap], [stack], [vdso] ...
                    continue
                if readonly and "w" in parts[1]:
                    continue
                lo, hi = parts[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    out.sort()
    return out


def _inside(maps, lo: int, hi: int) -> bool:
    for a, b in maps:
        if a <= lo and hi <= b:
            return True
        if a > lo:
            break
    return False


def is_file_backed(tensor, maps=None) -> bool:
    """Whether ``tensor``'s bytes lie in a file mapping (e.g. transformers' memory-mapped
    safetensors), not in anonymous memory."""
    if tensor is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    lo = tensor.data_ptr()
    return _inside(file_mappings() if maps is None else maps, lo, lo + tensor.numel() * tensor.element_size())


def _page_range(tensor):
    """[lo, hi): the whole pages inside ``tensor``'s bytes (a CPU tensor), or None."""
    if tensor is None or tensor.device.type != "cpu":
        return None
    nbytes = tensor.numel() * tensor.element_size()
    page = page_size()
    addr = tensor.data_ptr()
    lo = (addr + page - 1) // page * page
    hi = (addr + nbytes) // page * page
    return (lo, hi) if nbytes > 0 and hi > lo else None


def release_file_pages(tensor, maps=None, *, trusted: bool = False) -> int:
    """Reclaim the whole pages of ``tensor``'s bytes if they lie in a file mapping; returns the
    bytes advised (0 when the tensor is not file-backed, on a GPU, or nothing could be done).
    ``maps``: ``file_mappings()`` taken once for many calls; ``trusted``: the caller knows the
    tensor views a file mapping (``nzrt.load``), skip the check."""
    lib, span = _libc(), _page_range(tensor)
    if not lib or span is None:
        return 0
    lo, hi = span
    if not trusted:
        if maps is None:
            maps = file_mappings()
        if not _inside(maps, lo, hi):
            return 0
    if lib.madvise(lo, hi - lo, MADV_PAGEOUT) != 0:
        return 0
    return hi - lo


def in_readonly_file_mapping(tensor, maps=None) -> bool:
    """Whether ``tensor``'s bytes lie in a file mapping without write permission (``maps``:
    ``file_mappings(readonly=True)`` taken once for many calls)."""
    span = _page_range(tensor)
    if span is None:
        return False
    return _inside(file_mappings(readonly=True) if maps is None else maps, *span)


def unmap_file_pages(tensor) -> int:
    """Take the whole pages of ``tensor``'s bytes out of this process (``MADV_DONTNEED``): RSS
    falls, the page cache keeps them, the next access maps them again (a minor fault, no disk
    read while the OS has the memory). Only for a tensor in a read-only file mapping (see
    ``in_readonly_file_mapping``): on a writable private mapping it would discard what was
    written. Returns the bytes advised."""
    lib, span = _libc(), _page_range(tensor)
    if not lib or span is None:
        return 0
    lo, hi = span
    return hi - lo if lib.madvise(lo, hi - lo, MADV_DONTNEED) == 0 else 0


def _clean_readonly_mappings(names) -> list[tuple[int, int]]:
    """[(start, end)] of the mappings of files whose name contains one of ``names`` that are not
    writable and hold no anonymous (copy-on-write) page, from ``/proc/self/smaps``."""
    out, cur = [], None
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 5)
                if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's first line
                    path = head[5].strip() if len(head) > 5 else ""
                    perms = head[1]
                    cur = None
                    if "w" not in perms and any(n in os.path.basename(path) for n in names):
                        lo, hi = head[0].split("-")
                        cur = [int(lo, 16), int(hi, 16)]
                        out.append(cur)
                elif cur is not None and line.startswith("Anonymous:") and int(head[1]) != 0:
                    out.remove(cur)  # a page was written (relocations): never drop such a page
                    cur = None
    except (OSError, ValueError, IndexError):
        return []
    return [tuple(m) for m in out]


def release_idle_code(names=IDLE_CODE_LIBRARIES) -> int:
    """Unmap this process's pages of the named shared libraries' read-only, unwritten mappings
    (``madvise(MADV_DONTNEED)``); returns the bytes advised. Safe whenever the code runs again: a
    clean page of a file mapping is faulted back in from the page cache or the file, unchanged.
    Writable mappings and any holding a copy-on-write page are left alone."""
    lib = _libc()
    if not lib:
        return 0
    done = 0
    for lo, hi in _clean_readonly_mappings(tuple(names)):
        if lib.madvise(lo, hi - lo, MADV_DONTNEED) == 0:
            done += hi - lo
    return done


def settle() -> None:
    """After a phase that allocated and compiled (compression, a traced pass): the allocator's
    free memory and idle library code go back to the operating system."""
    trim()
    release_idle_code()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def set_mmap_threshold(nbytes: int) -> bool:
    """Make glibc serve every block of at least ``nbytes`` from its own memory map, so that a
    freed block leaves the process at once (``mallopt(M_MMAP_THRESHOLD)``). Process-wide; it
    also turns off glibc's adaptive threshold, which otherwise rises to 32 MiB as large blocks are
    freed and lets them pile up in the arenas. False where there is no glibc."""
    lib = _libc()
    if not lib:
        return False
    try:
        return bool(lib.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except AttributeError:  # musl and others
        return False


def trim() -> bool:
    """Give the allocator's free memory back to the operating system (glibc's ``malloc_trim``)."""
    lib = _libc()
    if not lib:
        return False
    try:
        return bool(lib.malloc_trim(0))
    except AttributeError:  # musl and others
        return False


def reset_peak() -> bool:
    """Reset VmHWM (the peak RSS) to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss() -> dict:
    """This process's memory now, in bytes: ``rss``, ``anon``, ``file``, ``peak`` (VmHWM)."""
    keys = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "VmHWM": "peak"}
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[keys[k]] = int(v.split()[0]) * 1024
    except OSError:  # pragma: no cover
        pass
    if "rss" not in out:  # not Linux: psutil
        import psutil

        mi = psutil.Process().memory_info()
        out = {"rss": mi.rss, "anon": None, "file": None, "peak": getattr(mi, "peak_wset", None)}
    return out
