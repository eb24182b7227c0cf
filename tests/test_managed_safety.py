"""Never wrong, never a crash: reads and writes of managed parameters anywhere, two threads on
one model, exceptions and Ctrl-C at every step of entry and exit, and exactness at real widths
under every oneDNN ISA cap this CPU supports. Each case runs in a child process
(tests/_safety_child.py), so a segfault fails the test instead of killing the suite."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("_safety_child.py")
POLICIES = ["resident", "offload", "belady", "lru", "auto"]


def child(*args, env=None, timeout=900):
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_WAIT_POLICY="PASSIVE")
    e.update(env or {})
    r = subprocess.run([sys.executable, str(CHILD), *map(str, args)], capture_output=True, text=True,
                       env=e, timeout=timeout)
    assert r.returncode == 0, f"child exited with {r.returncode} (negative: killed by a signal)\n{r.stderr[-3000:]}"
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("policy", POLICIES)
def test_reads_exact_and_writes_refused_outside_forward(policy):
    res = child("rw", policy)
    bad_reads = {k: v for k, v in res["reads"].items() if v is not True}
    assert not bad_reads, bad_reads
    assert len(res["reads"]) >= 17
    bad_writes = {k: v for k, v in res["writes"].items() if v != "ManagedError"}
    assert not bad_writes, bad_writes
    assert res["after_writes_exact"] and res["forward_exact"] and res["restored"]
    before, after = res["dense_after_reads"]
    assert after == before  # reads decode into temporaries: nothing is kept dense


@pytest.mark.parametrize("policy", POLICIES)
def test_two_threads_share_a_model_exactly(policy):
    res = child("threads", policy)
    assert res["errors"] == [] and res["bad"] == 0 and res["calls"] == 80, res


@pytest.mark.parametrize("exc", ["KeyboardInterrupt", "MemoryError", "SIGINT"])
def test_interrupt_at_every_step_of_entry_and_exit(exc):
    res = child("inject", "resident", exc)
    for phase in ("entry", "exit"):
        steps = res[phase]
        assert steps[-1]["hit"] is None  # the loop went past the last step
        hit = {s["hit"] for s in steps[:-1]}
        assert "decode_into" in hit if phase == "exit" else "compress" in hit, hit
        if phase == "exit":
            assert "build_report" in hit
        bad = [s for s in steps if not (s["restored"] and s["again"] is True)]
        assert not bad, bad[:3]
    # what reached the caller: the injected interrupt (after the model was made whole), never a crash
    raised = {s["raised"] for s in res["entry"][:-1]}
    assert raised <= {exc if exc != "SIGINT" else "KeyboardInterrupt", None}, raised
    assert exc == "SIGINT" or raised == {exc}
    if exc in ("KeyboardInterrupt", "SIGINT"):  # an interrupt during exit is raised once restored
        assert "KeyboardInterrupt" in {s["raised"] for s in res["exit"]}


def _isa_caps():
    """The ONEDNN_MAX_CPU_ISA caps this CPU supports (each one changes which kernels oneDNN picks)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    caps = ["DEFAULT"]
    if "avx2" in flags:
        caps.append("AVX2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        caps.append("AVX512_CORE")
        if "avx512_vnni" in flags:
            caps.append("AVX512_CORE_VNNI")
        if "avx512_bf16" in flags:
            caps.append("AVX512_CORE_BF16")
        if {"amx_tile", "amx_bf16"} <= flags:
            caps.append("AVX512_CORE_AMX")
    return caps


@pytest.mark.parametrize("cap", _isa_caps())
def test_real_width_llama_bit_identical_under_each_isa_cap(cap):
    """hidden 1024, 128 tokens, an 8192 x 1024 head (row-chunked before: not split-invariant
    under AMX), every policy, three passes each (traced, planned, steady)."""
    env = {} if cap == "DEFAULT" else {"ONEDNN_MAX_CPU_ISA": cap}
    for policy in POLICIES:
        res = child("exact", policy, 1024, 128, env=env)
        assert res["exact"] == [True, True, True], (cap, policy, res)
