"""The codec's fixed cost: LLVM's code pages idle after numba's cached codec loaded go back to the
operating system (``osmem.release_idle_code``), only clean read-only pages are dropped, and the
codec works as before afterwards, also where it must load more code. Each case in a child process
(RSS is the process's)."""
import json
import re
import subprocess
import sys

CHILD = r'''
import json, re, torch, nzrt
from nzrt import osmem

def lib_rss(name):
    kib, cur = 0, False
    for line in open("/proc/self/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            cur = name in line
        elif cur and line.startswith("Rss:"):
            kib += int(line.split()[1])
    return kib * 1024

def same(a, b):
    return torch.equal(a.view(torch.int16), b.view(torch.int16))

base = osmem.rss()
x = torch.randn(100_000).mul(0.02).to(torch.bfloat16)
assert same(nzrt.decompress(nzrt.compress(x)), x)
loaded = osmem.rss()["rss"] - base["rss"]
llvm_before = lib_rss("libllvmlite")
ranges = osmem._clean_readonly_mappings(osmem.IDLE_CODE_LIBRARIES)
advised = osmem.release_idle_code()
osmem.trim()
settled = osmem.rss()["rss"] - base["rss"]
llvm_after = lib_rss("libllvmlite")
ok = same(nzrt.decompress(nzrt.compress(x)), x)
y = torch.randn(50_000).half()   # another dtype: numba loads more code, through the dropped pages
ok = ok and same(nzrt.decompress(nzrt.compress(y)), y)
print(json.dumps({"loaded": loaded, "settled": settled, "llvm_before": llvm_before, "llvm_after": llvm_after,
                  "advised": advised, "ranges": ranges, "ok": ok}))
'''


def test_idle_llvm_pages_go_back_and_the_codec_still_works(tmp_path):
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ok"]
    assert res["advised"] > 0 and res["llvm_before"] > 32 << 20, res   # the pages were there ...
    assert res["llvm_after"] < 8 << 20, res                              # ... and are gone
    assert res["settled"] <= 60 << 20 < res["loaded"], res               # the codec's fixed cost


def test_only_clean_read_only_mappings_are_chosen():
    """Every range ``release_idle_code`` would advise is a whole mapping of the named library,
    not writable, with no anonymous (written) page, as /proc/self/smaps says now."""
    from nzrt import osmem

    import numba  # noqa: F401 - loads libllvmlite (its RELRO and data mappings are written ones)

    chosen = set(osmem._clean_readonly_mappings(("libllvmlite",)))
    seen_written = False
    cur = None
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split(None, 5)
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                cur = ((lo, hi), parts[1], len(parts) > 5 and "libllvmlite" in parts[5])
            elif cur and line.startswith("Anonymous:"):
                rng, perms, ours = cur
                written = "w" in perms or int(line.split()[1]) > 0
                if ours and written:
                    seen_written = True
                    assert rng not in chosen, (rng, perms)
                if rng in chosen:
                    assert ours and not written
    assert chosen and seen_written  # both kinds exist: the test can fail
