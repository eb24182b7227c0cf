"""Memory at the shape most people run: a tied, large vocabulary. transformers' Gemma3 at
Gemma3-270M's table (262,144 x 640, tied; 4 layers here, so the table is ~80% of the weights),
written with save_pretrained; each case in its own process; RSS grown over a baseline taken after
the imports and before nzrt's codec loads (the codec is nzrt's cost); a 64-token forward and 4
greedy tokens. nzrt below plain, peak and steady, bit-identical; lossy never above lossless.
The full table (SmolLM2-, Gemma3-270M- and 1.1B-shaped) is tools/bench_memory.py's."""
import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS from /proc")

CHILD = r'''
import hashlib, json, os, sys, gc
import torch, transformers, nzrt
import transformers.models.gemma3.modeling_gemma3, transformers.generation.utils
from nzrt import osmem
from nzrt.cli.profile_child import DeviceMemory, Sampler
mode, path = sys.argv[1], sys.argv[2]
gc.collect(); osmem.trim()
sampler = Sampler(DeviceMemory("cpu"))
base = osmem.rss(); osmem.reset_peak()
sampler.start()
ids = torch.randint(0, 262144, (1, 64), generator=torch.Generator().manual_seed(0))
if mode == "plain":
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
else:
    m = nzrt.from_pretrained(path, **({"mantissa_bits": 3} if mode == "lossy" else {}))
with torch.no_grad():
    logits = m(ids).logits
    h = hashlib.sha256(logits.view(torch.int16).numpy().tobytes()).hexdigest()
    del logits
    m.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
steady = osmem.rss()["rss"] - base["rss"]
sampler.stop()
peak = max(sampler.peak["rss"], osmem.rss()["peak"]) - base["rss"]
print(json.dumps({"peak": peak, "steady": steady, "hash": h}))
'''


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                           max_position_embeddings=512, sliding_window=512)
    model = Gemma3ForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():  # std-0.02 weights (norms as initialised)
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    d = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(d)
    return str(d)


def _run(mode, path):
    r = subprocess.run([sys.executable, "-c", CHILD, mode, path], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_tied_large_vocabulary_below_plain_and_lossy_not_above_lossless(gemma_dir):
    plain, nz, lossy = (_run(m, gemma_dir) for m in ("plain", "nzrt", "lossy"))
    assert nz["hash"] == plain["hash"]  # lossless: the logits' bits
    assert nz["peak"] < plain["peak"] and nz["steady"] < plain["steady"], (plain, nz)
    assert lossy["peak"] <= nz["peak"] and lossy["steady"] <= nz["steady"], (nz, lossy)
    print(f"peak MiB plain {plain['peak'] >> 20}, nzrt {nz['peak'] >> 20}, lossy {lossy['peak'] >> 20}")
