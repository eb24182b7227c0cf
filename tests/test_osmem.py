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
