"""nzrt.osmem: file pages of a memory-mapped tensor really leave RSS; anonymous memory is never
touched; the values stay readable (re-read from the file). Each case in its own process."""
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise are Linux's")

CHILD = textwrap.dedent("""
    import sys, torch
    from nzrt import osmem
    path, n = sys.argv[1], int(sys.argv[2])
    t = torch.from_file(path, shared=False, size=n, dtype=torch.uint8)
    want = int(t.sum())                          # every page read: file-backed RSS
    before = osmem.rss()["file"]
    assert osmem.is_file_backed(t)
    anon = torch.arange(n // 8, dtype=torch.int64)
    assert not osmem.is_file_backed(anon)
    assert osmem.release_file_pages(anon) == 0   # anonymous memory: left alone
    assert torch.equal(anon, torch.arange(n // 8, dtype=torch.int64))
    advised = osmem.release_file_pages(t)
    after = osmem.rss()["file"]
    assert int(t.sum()) == want                  # still the same values, read again from the file
    print(advised, before - after)
""")


def test_release_file_pages_drops_file_backed_rss(tmp_path):
    n = 64 << 20
    f = tmp_path / "blob.bin"
    with open(f, "wb") as out:
        out.write(bytes(range(256)) * (n // 256))
    r = subprocess.run([sys.executable, "-c", CHILD, str(f), str(n)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    advised, dropped = map(int, r.stdout.split())
    assert advised >= n - 8192
    assert dropped >= n * 3 // 4, f"only {dropped} of {n} file-backed bytes left RSS"


def test_trim_and_rss_answer():
    from nzrt import osmem

    r = osmem.rss()
    assert r["rss"] > 0 and r["anon"] is not None and r["file"] is not None
    osmem.trim()  # must not raise
    assert osmem.release_file_pages(None) == 0


READONLY_CHILD = textwrap.dedent("""
    import ctypes, mmap, sys, torch
    from nzrt import osmem
    from nzrt.format.checkpoint import _map_readonly
    path, n = sys.argv[1], int(sys.argv[2])
    ro = _map_readonly(path, n)
    rw = torch.from_file(path, shared=False, size=n, dtype=torch.uint8)
    maps = osmem.file_mappings(readonly=True)
    assert osmem.in_readonly_file_mapping(ro, maps)
    assert not osmem.in_readonly_file_mapping(rw, maps)            # writable: could hold a written page
    assert not osmem.in_readonly_file_mapping(torch.zeros(n // 8, dtype=torch.int64), maps)
    want = int(ro.sum())
    before = osmem.rss()["file"]
    advised = osmem.unmap_file_pages(ro)
    after = osmem.rss()["file"]
    # still in the page cache: a fresh map of the file finds every page resident (mincore)
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), n, prot=mmap.PROT_READ)
    import numpy as np
    base = np.frombuffer(m, dtype=np.uint8).ctypes.data
    pages = (n + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert libc.mincore(base, n, vec) == 0, ctypes.get_errno()
    cached = sum(v & 1 for v in vec)
    assert int(ro.sum()) == want                  # the same values, mapped again
    print(advised, before - after, cached, pages)
""")


def test_unmap_file_pages_leaves_rss_but_keeps_the_page_cache(tmp_path):
    """The disk tier reads a .nzrt's blobs (a read-only map) every pass: after each read their
    pages leave the process (RSS falls) but stay in the page cache, so the next pass maps them
    again without reading the disk (MADV_PAGEOUT would have evicted them)."""
    n = 64 << 20
    f = tmp_path / "blob.bin"
    with open(f, "wb") as out:
        out.write(bytes(range(256)) * (n // 256))
    r = subprocess.run([sys.executable, "-c", READONLY_CHILD, str(f), str(n)], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    advised, dropped, cached, pages = map(int, r.stdout.split())
    assert advised >= n - 8192
    assert dropped >= n * 3 // 4, f"only {dropped} of {n} file-backed bytes left RSS"
    assert cached >= pages * 3 // 4, f"only {cached} of {pages} pages still cached"
