"""tools/bench_train.py on a tiny Llama, 2 steps: nzrt's training rows must lose exactly what plain's do."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "bench_train.py")

pytest.importorskip("transformers")


def test_tiny_rows_bit_identical(tmp_path):
    rows = ["adamw", "nzrt_adamw"]
    if importlib.util.find_spec("peft") is not None:
        rows += ["lora", "nzrt_lora"]
    out = tmp_path / "r.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    p = subprocess.run([sys.executable, SCRIPT, "--sizes", "tiny", "--steps", "2", "--rows", ",".join(rows),
                        "--no-overhead-row",
                        "--workdir", str(tmp_path), "--json", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "LOSSES DIFFER" not in p.stdout and "identical losses at every step" in p.stdout
    got = {r["mode"]: r for r in json.loads(out.read_text())["sizes"]["tiny"]}
    assert set(got) == set(rows) and not any("error" in r for r in got.values())
    assert got["nzrt_adamw"]["losses"] == got["adamw"]["losses"]
    assert got["adamw"]["losses"][0] != got["adamw"]["losses"][1]  # the step changed the weights
    comp, dense = got["nzrt_adamw"]["state_bytes"]
    assert 0 < comp and dense < comp  # the AdamW states are held compressed
    if "lora" in got:
        assert got["nzrt_lora"]["losses"] == got["lora"]["losses"]
        assert got["lora"]["losses"][0] != got["lora"]["losses"][1]
