"""Every process that used nzrt exits with status 0, whatever it forgot to release.

A session left open (``from_pretrained`` without ``release``, ``managed()`` never exited, training,
fused generation) may still have a decode in flight on its worker thread when the script ends; a
daemon thread inside numba's or torch's OpenMP pool while the process tears the pools down aborts
with ``terminate called without an active exception`` (status 134). Each case runs 20 times, each
time a fresh child process, two at a time (timing-dependent crashes need repetitions)."""
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

CHILD = Path(__file__).parent / "_exit_child.py"
RUNS = 20


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("llama4")
    LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).save_pretrained(d)
    return str(d)


def _run(args):
    p = subprocess.run([sys.executable, str(CHILD), *args], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout.strip(), p.stderr.strip()[-400:]


@pytest.mark.parametrize("case", ["from_pretrained", "managed_open", "managed_closed", "training_open",
                                  "fused_open"])
def test_process_exits_cleanly_without_cleanup(case, llama_dir):
    args = [case, llama_dir] if case == "from_pretrained" else [case]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(_run, [args] * RUNS))
    bad = [(rc, err) for rc, out, err in results if rc != 0 or out != "ok"]
    assert not bad, f"{len(bad)} of {RUNS} runs ended badly; first: status {bad[0][0]}: {bad[0][1]}"
