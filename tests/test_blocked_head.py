"""A large frozen output head (tied or not) in row chunks: the lookup reads the chunks of its ids,
the head multiplies block by block through a small slot, and the result is plain's, bit for bit,
on every machine -- because the blocked path runs only where a probe of the same shapes showed
that this machine's matmul gives the whole product's bits (nzrt/runtime/blocked.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nzrt.runtime import blocked
from nzrt.runtime.params import HEAD_BLOCK_ROWS, HEAD_CHUNK_BYTES, chunkable_head, head_spans

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib
from test_managed_safety import _isa_caps  # noqa: E402

CHILD = Path(__file__).with_name("_blocked_child.py")


def _split_invariant(x, w):
    """Each output on its own in float64, rounded once: the same bits however the rows split."""
    return (x.double() @ w.double().T).to(x.dtype)


def _split_dependent(x, w):
    """A matmul whose result depends on how many output rows it was given (as oneDNN's AMX
    kernels do for ~0.01% of outputs): the probe must see it."""
    y = x.float() @ w.float().T
    return (y + (w.shape[0] % 3) * 2.0 ** -10).to(x.dtype)


@pytest.mark.parametrize("rows", [1, 64])
def test_probe_tells_both_branches(rows):
    assert blocked.blocked_equals_whole(rows, 256, 512, 512, torch.bfloat16, "cpu", linear=_split_invariant)
    assert not blocked.blocked_equals_whole(rows, 256, 512, 300, torch.bfloat16, "cpu", linear=_split_dependent)


def test_never_mode_is_the_differs_branch(monkeypatch):
    monkeypatch.setenv("NZRT_BLOCKED_MATMUL", "never")
    assert not blocked.blocked_exact(1, 64, 256, 256, torch.bfloat16, "cpu")
    monkeypatch.setenv("NZRT_BLOCKED_MATMUL", "sometimes")
    with pytest.raises(ValueError, match="NZRT_BLOCKED_MATMUL"):
        blocked.mode()


def test_which_weights_are_chunked_as_a_head():
    emb, head = nn.Embedding(16384, 1024), nn.Linear(1024, 16384, bias=False)
    shape, owners = (16384, 1024), [(emb, "weight"), (head, "weight")]
    assert chunkable_head(shape, 2, owners, set(), requires_grad=False)           # tied
    assert chunkable_head(shape, 2, [(head, "weight")], {id(head)}, False)      # untied, the model's head
    assert not chunkable_head(shape, 2, [(head, "weight")], set(), False)       # another Linear
    assert not chunkable_head(shape, 2, owners, set(), requires_grad=True)      # trained: multiplied whole
    assert not chunkable_head((4096, 1024), 2, owners, set(), False)            # one block: nothing to split
    biased = nn.Linear(1024, 16384)
    assert not chunkable_head(shape, 2, [(emb, "weight"), (biased, "weight")], set(), False)
    spans = head_spans((262144, 640), 2)
    assert spans[0] == (0, spans[0][1]) and spans[-1][1] == 262144
    assert all(b - a == spans[0][1] for a, b in spans[:-1]) and spans[0][1] % HEAD_BLOCK_ROWS == 0
    assert spans[0][1] * 640 * 2 <= max(HEAD_CHUNK_BYTES, HEAD_BLOCK_ROWS * 640 * 2)


def _child(hidden, vocab, tokens, env=None, arch="llama"):
    e = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    e.pop("ONEDNN_MAX_CPU_ISA", None)
    e.update(env or {})
    r = subprocess.run([sys.executable, str(CHILD), arch, str(hidden), str(vocab), str(tokens)], capture_output=True,
                       text=True, env=e, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cap", _isa_caps())
def test_tied_head_bit_identical_under_each_isa_cap(cap):
    """hidden 1024, a 16384 x 1024 tied table (4 chunks), a 64-token prompt and 4 greedy tokens:
    plain's bits whichever path the probe chose on this machine under this cap."""
    res = _child(1024, 16384, 64, None if cap == "DEFAULT" else {"ONEDNN_MAX_CPU_ISA": cap})
    assert res["exact"] and res["tokens_equal"] and res["restored"], res
    assert res["chunks"] == 4 and res["blocked"] + res["whole"] == 5, res
    if res["blocked"]:  # no dense copy of the table: at most two chunk slots (one prefetched),
        # beside the buffers of the layers too small for a slot (each < 1 MiB)
        assert res["pool_peak"] - res["pool_small_bytes"] <= 2 * HEAD_CHUNK_BYTES < res["table_bytes"], res
        assert res["pool_small_bytes"] < HEAD_CHUNK_BYTES // 2, res


def test_forced_differs_branch_multiplies_whole_and_stays_exact():
    res = _child(1024, 16384, 64, {"NZRT_BLOCKED_MATMUL": "never"})
    assert res["exact"] and res["tokens_equal"] and res["restored"], res
    assert res["blocked"] == 0 and res["whole"] == 5, res


def test_gemma3_tied_table():
    """transformers' Gemma3 at its tied large-vocabulary shape (262,144 x 640, the table 63% of a
    Gemma3-270M; its scaled embedding has a forward of its own): logits and greedy tokens
    bit-identical; where the blocked path runs, no buffer of the scheduler near the table's size."""
    res = _child(640, 262144, 64, arch="gemma3")
    assert res["exact"] and res["tokens_equal"], res
    assert res["chunks"] == len(head_spans((262144, 640), 2)) > 2
    assert res["blocked"] + res["whole"] == 5, res
    if res["blocked"]:
        assert res["pool_peak"] <= 4 * HEAD_CHUNK_BYTES < res["table_bytes"] // 8, res


@pytest.mark.parametrize("dtype,kw", [(torch.bfloat16, {}), (torch.bfloat16, {"mantissa_bits": 3}),
                                      (torch.float16, {}), (torch.float32, {})])
def test_lookups_decode_only_tiles_and_give_the_decoded_rows(dtype, kw):
    """A chunked table's lookup on the CPU reads rows straight from the compressed chunk
    (``FusedWeight.rows``): the decoded weight's rows, bit for bit, NaN payloads and inf included,
    ids repeated and out of order, a chunk not a multiple of the tile."""
    import nzrt
    from nzrt.kernels.cpu.fused import FusedWeight

    g = torch.Generator().manual_seed(7)
    w = torch.randn(5003, 640, generator=g).mul(0.02).to(dtype)
    w.view(-1)[::997] = float("nan")
    w.view(-1)[5] = float("inf")
    ct = nzrt.compress(w, **kw)
    dense = nzrt.decompress(ct)
    ids = torch.cat([torch.randint(0, 5003, (300,), generator=g), torch.tensor([5002, 0, 0, 5002])])
    ints = {2: torch.int16, 4: torch.int32}[dense.element_size()]
    assert torch.equal(FusedWeight(ct).rows(ids).view(ints), dense[ids].view(ints))


def test_a_nzrt_file_keeps_the_head_in_row_chunks(tmp_path):
    """`nzrt compress` writes a large tied head as row chunks and `from_pretrained(FILE)` keeps them
    (no whole decode at load): logits bit-identical to plain's, the head's calls ran through chunks."""
    import nzrt
    from nzrt.loading.compress import compress_model
    from nzrt.runtime import handle_of
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=16384, hidden_size=1024, intermediate_size=2048, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    plain = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval().requires_grad_(False)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.02)
    plain.save_pretrained(tmp_path / "dir")
    compress_model(str(tmp_path / "dir"), tmp_path / "m.nzrt")
    ids = torch.randint(0, 16384, (1, 64), generator=torch.Generator().manual_seed(3))
    model = nzrt.from_pretrained(tmp_path / "m.nzrt")
    try:
        with torch.no_grad():
            ref, out = plain(ids).logits, model(ids).logits
        run = handle_of(model)
        heads = [mp for mp in run.params if mp.chunked and any(isinstance(m, nn.Linear) for m, _ in mp.owners)]
        assert len(heads) == 1 and len(heads[0].keys) == len(head_spans((16384, 1024), 2))
        assert torch.equal(ref.view(torch.int16), out.view(torch.int16))
        assert run.blocked_stats["blocked"] + run.blocked_stats["whole"] == 1
    finally:
        nzrt.release(model)
