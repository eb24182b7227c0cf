"""tools/bench_fused.py runs end to end at a toy size and prints its two tables (the numbers are
the benchmark's business, not a test's: only that every row and ratio is there)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_fused.py"


def test_bench_fused_smoke():
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, str(TOOL), "--shapes", "tiny", "--batches", "1,3", "--reps", "3",
                        "--bits", "minilm", "--e2e", "smollm2", "--rounds", "1", "--new", "2", "--prompts", "1"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    rows = [ln for ln in out.splitlines() if ln.startswith("tiny ")]
    assert len(rows) == 2 and all(re.search(r"\d+\.\d+x$", ln) for ln in rows), out
    assert all(re.search(r"\d+\.\d+x \| +\d+\.\d+ +\d+\.\d+ +\d+\.\d+ \| +\d+\.\d+x$", ln) for ln in rows), out
    bits = [ln for ln in out.splitlines() if ln.startswith("minilm ")]
    assert len(bits) == 1 and re.search(r"\d+\.\d+ +\d+\.\d+ \| +\d\.\d+x$", bits[0]), out
    e2e = [ln for ln in out.splitlines() if ln.startswith("smollm2 ")]
    assert len(e2e) == 1 and re.search(r"\d+\.\d+x .* prompts? identical", e2e[0]), out
