"""tools/bench_e2e_gpu.py, checked on the CPU: --smoke runs every row with tiny Llama shapes."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "bench_e2e_gpu.py")
LABELS = ["(a) plain bf16", "(b) nzrt resident", "(c) nzrt offload", "(e) dense pinned stream",
          "(d) accelerate cpu_offload", "(e') dense pinned stream, per block"]

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _run(*args, timeout=120):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _rows(out: str) -> dict:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| tiny-") and len(cells) == 9:
            rows[(cells[0], cells[1])] = cells
    return rows


def line_of(cells):
    return " | ".join(cells)


def _load():
    spec = importlib.util.spec_from_file_location("bench_e2e_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return mod


def test_smoke_every_row_and_lossless():
    p = _run("--smoke")
    out = p.stdout
    assert p.returncode == 0, out[-3000:] + p.stderr[-3000:]
    rows = _rows(out)
    for size in ("tiny-a", "tiny-b"):
        for label in LABELS:
            cells = rows.get((size, label))
            assert cells is not None, f"no row {size} {label}:\n{out[-3000:]}"
            assert "ERROR" not in line_of(cells) and "skipped" not in line_of(cells), cells
            assert float(cells[3]) > 0  # tokens/s
            assert cells[8].startswith("tokens identical") or cells[8] == "(reference)", cells
        for label in LABELS[2:]:  # c, e, d, e': bytes host -> device per token are counted
            assert rows[(size, label)][6] != "-", rows[(size, label)]
        for label in ("(b) nzrt resident", "(c) nzrt offload"):
            assert re.search(rf"lossless check \[{size}\] {re.escape(label)}: identical to plain: "
                             r"tokens identical \(4/4\), logits bit-identical", out), out[-2000:]
    assert "NOT identical" not in out and "DIFFERENT" not in out
    assert "(forced by --smoke): 4 tokens timed" in out  # (d)'s slow path ran on tiny-b


def test_smoke_deadline_and_cap():
    p = _run("--smoke", "--sizes", "tiny-a", "--methods", "plain", "resident", "--section-cap", "0")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = _rows(p.stdout)
    assert rows[("tiny-a", "(a) plain bf16")][2] == "2" and "cut to 2 tokens" in p.stdout
    assert "identical to plain" in p.stdout
    p = _run("--smoke", "--sizes", "tiny-a", "--methods", "plain", "offload", "--deadline", "0")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = _rows(p.stdout)
    assert "skipped: past --deadline" in rows[("tiny-a", "(c) nzrt offload")][3]
    assert "lossless check [tiny-a] (c) nzrt offload: not run" in p.stdout


def test_guarded_row_keeps_the_error():
    mod = _load()
    row = mod.Row(size="x", method="(z) boom")

    def boom(r):
        raise RuntimeError("kaput | with a pipe")
    mod.guarded(row, boom)
    assert row.error.startswith("RuntimeError: kaput / with a pipe")
    bench = mod.Bench.__new__(mod.Bench)
    bench.rows = [row]
    table = "\n".join(bench.table())
    assert "| x | (z) boom | - | ERROR RuntimeError: kaput" in table


def test_no_cuda_exit_2():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would run the real benchmark")
    p = _run(timeout=60)
    assert p.returncode == 2
    assert "no CUDA device: run this on a GPU machine (or --smoke to check the script on the CPU)" in p.stderr


@pytest.mark.parametrize("by", ["module", "block"])
def test_dense_stream_follows_and_recovers(by):
    """The streamer's trace / follow / divergence logic on the CPU: outputs equal the plain model's
    in every pass, also after the traced order is broken on purpose."""
    import torch
    mod = _load()
    dev = torch.device("cpu")
    shape = mod.SMOKE_SIZES["tiny-a"]
    ids = torch.randint(0, shape["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(3))
    plain = mod.build_model(shape, dev, seed=0)
    want = mod.greedy(plain, ids, 3, dev)
    model = mod.build_model(shape, dev, seed=0)
    st = mod.DenseStream(model, dev, lookahead=2, by=by)
    try:
        got = mod.greedy(model, ids, 3, dev)  # pass 1 traced, then followed
        assert st.mode == "follow" and st.divergences == 0 and st.trace
        assert got[0] == want[0] and torch.equal(got[1], want[1])
        i = len(st.trace) // 2  # the next pass departs from this "trace"
        st.trace[i], st.trace[i + 1] = st.trace[i + 1], st.trace[i]
        got = mod.greedy(model, ids, 3, dev)
        assert st.divergences == 1 and st.mode == "follow"
        assert got[0] == want[0] and torch.equal(got[1], want[1])
        assert not st.bound and len(st.ready) <= st.k
    finally:
        st.close()
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert "forward" not in model.get_input_embeddings().__dict__
