"""``nzrt profile`` measures each run in a child process of its own: per-run peak and steady RSS
above a baseline (anonymous and file-backed apart), bit identity against the plain run, the
runtime's fixed overhead apart; on a small transformers Llama saved with save_pretrained."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from nzrt.cli import profile as prof  # noqa: E402

MiB = 2**20


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A 2-layer Llama with hidden size 1024 (bf16, random weights), saved as a transformers directory."""
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    d = tmp_path_factory.mktemp("llama")
    model.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def lossless(llama_dir):
    return prof.profile(llama_dir, policies=list(prof.available_policies()), device="cpu", tokens=32,
                        repeats=1, gen_tokens=2)


def test_every_lossless_policy_is_bit_identical(lossless):
    rows = {r.run: r for r in lossless.rows}
    assert list(rows) == ["plain", *prof.available_policies()]
    assert all(r.ok for r in rows.values())
    for run, r in rows.items():
        if run != "plain":
            assert r.exact is True and r.mismatches == 0, run
            assert r.output_sha256 == rows["plain"].output_sha256, run
    table = prof.format_table(lossless)
    assert " exact" in table and " yes" in table and "runtime fixed overhead" in table
    assert "after a 16-token prompt" in table and lossless.prompt_tokens == 16
    assert all(r.prompt_tokens == 16 and r.tokens_per_s for r in rows.values())


def test_memory_is_per_run(lossless, llama_dir):
    rows = {r.run: r for r in lossless.rows}
    det = lossless.details
    # each run in its own process, measured against that process's own baseline
    assert len({d["pid"] for d in det.values()}) == len(rows)
    for run, r in rows.items():
        base = det[run]["baseline"]
        assert 0 < r.peak_host_bytes < base["rss"], run  # a figure above the baseline, not the process's RSS
        assert r.steady_host_bytes <= r.peak_host_bytes + MiB, run
        assert r.peak_anon_bytes is not None and r.peak_file_bytes is not None, run
        assert r.peak_anon_bytes <= r.peak_host_bytes + MiB and r.peak_file_bytes <= r.peak_host_bytes + MiB, run
        # anonymous + file-backed = RSS (shared memory aside)
        assert abs(r.steady_anon_bytes + r.steady_file_bytes - r.steady_host_bytes) < 4 * MiB, run
    # the plain model's weights are there: at least the dense bytes, file-backed (transformers maps them)
    assert rows["plain"].peak_host_bytes >= 0.9 * lossless.dense_bytes
    # a managed row measured after the plain one is the same as one measured without it (the old
    # in-process figure was the process's peak so far: never below the plain row's)
    alone = prof.profile(llama_dir, policies=["resident"], device="cpu", tokens=32, repeats=1, gen_tokens=2,
                         plain=False, overhead=False)
    a, b = alone.rows[0].peak_host_bytes, rows["resident"].peak_host_bytes
    assert abs(a - b) <= 0.15 * max(a, b) + 8 * MiB, (a / MiB, b / MiB)
    assert alone.rows[0].exact is None  # nothing to compare with
    # the runtime's fixed overhead: measured once, in a child of its own, in no row
    fo = lossless.fixed_overhead
    assert fo and fo["rss"] > 10 * MiB and fo["anon"] is not None and fo["file"] is not None


def test_lossy_is_not_exact(llama_dir):
    res = prof.profile(llama_dir, policies=["resident"], device="cpu", mantissa_bits=3, tokens=32, repeats=1,
                       gen_tokens=0, overhead=False)
    plain, lossy = res.rows
    assert plain.run == "plain" and lossy.run == "resident" and lossy.ok
    assert lossy.exact is False and lossy.mismatches > 0
    assert lossy.bits_per_weight < 9
    line = next(ln for ln in prof.format_table(res).splitlines() if ln.startswith("resident "))
    assert line.split()[-1] == "no", line
    assert '"exact": false' in res.to_json()
