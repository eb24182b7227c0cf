"""FSDP2 under nzrt.managed: 2 processes, gloo, on the CPU (tests/_fsdp_child.py is one rank).

Each rank keeps its local shards compressed and all-gathers compressed bytes; the losses of every
step and the final shards must equal plain FSDP2's bit for bit on both ranks (AdamW and SGD with
momentum stepped in the backward, activation checkpointing, gradient accumulation with
``run.step()``); ``run.save`` must write the file a single process writes for the same weights;
``run.state_dict()`` must go through torch.distributed.checkpoint and back; an entry that fails
half-way and writes into a compressed shard must leave the model as it was; a rank that raises
must leave no peer hung. Each case runs its own pair of processes in a temporary working directory
(never the project root: see DESIGN.md).
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("_fsdp_child.py")
TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _isa_caps() -> list:
    """DEFAULT, and AVX2 where this CPU has more (oneDNN's kernels differ by ISA)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return ["DEFAULT", "AVX2"] if "avx512" in flags else ["DEFAULT"]


def _launch(case: str, tmp_path, cap: str = "DEFAULT"):
    """Both ranks of ``case``; returns ([returncode], [stderr], [result or None]), killing both
    if either is still running after TIMEOUT seconds (a hang fails the test, never the suite)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ONEDNN_MAX_CPU_ISA")}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    if cap != "DEFAULT":
        env["ONEDNN_MAX_CPU_ISA"] = cap
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(CHILD), str(r), "2", port, case, str(tmp_path)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    deadline = time.monotonic() + TIMEOUT
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"FSDP2 case {case!r}: a rank still ran after {TIMEOUT} s (hung)")
        errs.append(err)
    results = []
    for r in range(2):
        f = Path(tmp_path, f"rank{r}.json")
        results.append(json.loads(f.read_text()) if f.exists() else None)
    return [p.returncode for p in procs], errs, results


def _check_identical(rcs, errs, results, compressed=16):
    assert rcs == [0, 0], "\n".join(e[-3000:] for e in errs)
    for rank, res in enumerate(results):
        plain, nz = res["plain"], res["nzrt"]
        assert len(nz["compressed"]) == compressed, f"rank {rank}: compressed shards {nz['compressed']}"
        assert nz["losses"] == plain["losses"], f"rank {rank}: losses differ"
        assert nz["shards"] == plain["shards"], f"rank {rank}: final shards differ"
        assert nz["inside"] == nz["shards"], f"rank {rank}: reads inside the block differ from the shards"
        assert nz["moved"] >= compressed, f"rank {rank}: training changed only {nz['moved']} shards"
        assert nz["after_exit_local"] == ["Tensor"], "exit must leave dense local shards"
        assert nz["eval_after"] == plain["eval_after"], "FSDP2's own all-gather after exit differs"
        assert nz["eval_before"] == plain["eval_before"], "an inference-only block differs from plain FSDP2"
        assert nz["eval_compressed"] == compressed
        # compressed bytes went through the all-gathers: about 2/3 of the dense bytes
        assert 0 < nz["sent"] <= 0.72 * nz["sent_dense"], (nz["sent"], nz["sent_dense"])
        assert "all-gathers sent" in nz["report"] and nz["report"] in nz["summary"]
        assert "training:" in nz["summary"] and "0 B dense" not in nz["summary"], nz["summary"]


@pytest.mark.parametrize("cap", _isa_caps())
def test_adamw_in_backward_bit_identical(tmp_path, cap):
    _check_identical(*_launch("adamw", tmp_path, cap))


def test_sgd_momentum_with_activation_checkpointing(tmp_path):
    _check_identical(*_launch("sgd", tmp_path))


def test_gradient_accumulation_run_step_and_uneven_shards_kept_dense(tmp_path):
    results = _launch("accumulate", tmp_path)
    _check_identical(*results, compressed=14)  # vocab 8193: the embedding and the head stay dense
    for res in results[2]:
        uneven = [w for w in res["nzrt"]["warnings"] if "unevenly" in w]
        assert len(uneven) == 2 and all("kept dense under FSDP2" in w for w in uneven), res["nzrt"]["warnings"]
        assert len(res["nzrt"]["warnings"]) == 2, res["nzrt"]["warnings"]  # one note each, nothing else


def test_mixed_precision_fp32_weights_bf16_compute(tmp_path):
    """MixedPrecisionPolicy(param_dtype=bf16) over fp32 weights: the gathers carry the shards cast
    to bf16 (what plain FSDP2 gathers), compressed; the fp32 shards stay exact for the steps."""
    rcs, errs, results = _launch("mixed", tmp_path)
    assert rcs == [0, 0], "\n".join(e[-3000:] for e in errs)
    for res in results:
        plain, nz = res["plain"], res["nzrt"]
        assert len(nz["compressed"]) == 16
        assert nz["losses"] == plain["losses"] and nz["shards"] == plain["shards"]
        assert nz["eval_before"] == plain["eval_before"] and nz["eval_after"] == plain["eval_after"]
        assert nz["warnings"] == []
        # plain gathers bf16 (half of the fp32 bytes); nzrt about 2/3 of those
        assert 0 < nz["sent"] <= 0.72 * 0.5 * nz["sent_dense"], (nz["sent"], nz["sent_dense"])


def test_save_equals_single_process_and_dcp_round_trip(tmp_path):
    rcs, errs, results = _launch("save", tmp_path)
    assert rcs == [0, 0], "\n".join(e[-3000:] for e in errs)
    r0 = results[0]["nzrt"]
    assert r0["save_entries"] >= 20 and r0["save_diffs"] == [], r0["save_diffs"]
    assert r0["save_metadata_equal"]
    for res in results:
        nz = res["nzrt"]
        assert nz["dcp_tensors"] >= 60
        assert nz["dcp_moved"] >= 40, "the step after the save must change what the load restores"
        assert nz["dcp_restored"], "DCP load + run.load_state_dict must restore every weight and state"


def test_a_rank_that_raises_leaves_no_hung_peer(tmp_path):
    t0 = time.monotonic()
    rcs, errs, _ = _launch("raise", tmp_path)
    assert rcs[1] != 0 and "a deliberate failure on this rank" in errs[1]
    assert rcs[0] != 0, "rank 0 cannot finish: its peer is gone"
    assert time.monotonic() - t0 < TIMEOUT


def test_failed_entry_and_refused_writes_leave_the_model_as_it_was(tmp_path):
    rcs, errs, results = _launch("misuse", tmp_path)
    assert rcs == [0, 0], "\n".join(e[-3000:] for e in errs)
    for res in results:
        nz = res["nzrt"]
        assert nz["entry_error"] == "injected failure at entry" and "entered" not in nz
        assert nz["after_failed_entry"] and nz["locals_after_failed_entry"] == ["Tensor"]
        assert nz["eval_after_failed_entry"], "FSDP2's own all-gather after a rolled-back entry differs"
        assert [nz[f"write_{k}"] for k in ("add_", "data.mul_", "copy_")] == ["refused"] * 3
        assert nz["after_refused_writes"] and nz["eval_after_refused_writes"]
