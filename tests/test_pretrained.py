"""nzrt.from_pretrained: a transformers directory or a .nzrt to a managed model, bit-identical to
transformers' own loading, never dense as a whole; report/release/garbage collection end it."""
import gc
import os
import threading
import weakref

import pytest
import torch

import nzrt
from nzrt.cli import model_arg
from nzrt.loading.compress import compress_model
from nzrt.loading.entries import MODEL_META_KEY
from nzrt.loading.errors import ModelError
from nzrt.loading.gguf import load_gguf
from nzrt.loading.open_model import open_model
from nzrt.runtime.handle import handle_of

transformers = pytest.importorskip("transformers")

TOKENS = 64


def _save_llama(path, *, tied: bool, hidden=1024, layers=2, vocab=4096):
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2816, num_hidden_layers=layers,
                                   num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                                   vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=512)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    m.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def llama_dir(request, tmp_path_factory):
    return _save_llama(tmp_path_factory.mktemp("llama") / "m", tied=request.param)


def _ids(vocab=4096, n=TOKENS):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(1))


def _plain(path):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    return m.eval()


def _same(a, b):
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16))


def test_from_pretrained_dir_matches_transformers_bit_for_bit(llama_dir):
    ids = _ids()
    plain = _plain(llama_dir)
    with torch.no_grad():
        want = plain(ids).logits
    want_gen = plain.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
    del plain
    model = nzrt.from_pretrained(llama_dir)
    try:
        assert type(model).__name__ == "LlamaForCausalLM"
        with torch.no_grad():
            got = model(ids).logits
        assert _same(got, want)
        assert torch.equal(model.generate(ids[:, :8], max_new_tokens=4, do_sample=False), want_gen)
        rep = nzrt.report(model)
        assert rep.passes >= 1 and rep.weights_compressed_bytes < rep.weights_dense_bytes
        # weights were read from the file into the runtime: nothing of them is memory-mapped
        assert rep.held["compressed_mapped"] == 0
    finally:
        nzrt.release(model)
    # built from a checkpoint: the parameters go back to the meta device
    assert all(p.device.type == "meta" for p in model.parameters())
    with pytest.raises(ValueError, match="not managed"):
        nzrt.report(model)


def test_from_pretrained_nzrt_keeps_blobs_in_the_file_map(llama_dir, tmp_path):
    out = tmp_path / "m.nzrt"
    compress_model(str(llama_dir), out)
    ids = _ids()
    plain = _plain(llama_dir)
    with torch.no_grad():
        want = plain(ids).logits
    del plain
    model = nzrt.from_pretrained(out)
    try:
        with torch.no_grad():
            got = model(ids).logits
        assert _same(got, want)
        held = nzrt.report(model).held
        assert held["compressed_mapped"] > 0 and held["compressed_device"] == 0  # no copy in RAM
    finally:
        nzrt.release(model)


def test_a_budget_too_small_for_a_nzrt_is_refused_before_any_blob_is_read(llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "m.nzrt"
    compress_model(str(llama_dir), out)
    from nzrt.format import CompressedTensor

    def no_read(self):  # reading a blob (its checksum) before the budget check fails the test
        raise AssertionError("a blob was read before the budget was checked")

    monkeypatch.setattr(CompressedTensor, "verify", no_read)
    with pytest.raises(nzrt.managed.__globals__["BudgetError"]) as e:
        nzrt.from_pretrained(out, policy="resident", budget=4096)
    assert e.value.needed > 4096


def test_lossy_from_pretrained_restores_nothing_into_ram(llama_dir):
    model = nzrt.from_pretrained(llama_dir, mantissa_bits=3)
    try:
        with torch.no_grad():
            model(_ids())
        held = nzrt.report(model).held
        assert held["restore_copies_on_disk"] == 0  # a meta model has nothing to restore
    finally:
        nzrt.release(model)


def test_lossy_managed_keeps_restore_copies_on_disk_and_restores_exactly(llama_dir):
    model = _plain(llama_dir)
    with torch.no_grad():
        for p in model.parameters():  # in anonymous memory, not the checkpoint's file map
            p.data = p.data.clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with nzrt.managed(model, policy="resident", mantissa_bits=3) as run:
        with torch.no_grad():
            model(_ids())
        held = run.held_bytes()
        assert held["restore_copies_on_disk"] > 0
    for n, p in model.named_parameters():
        assert _same(p.detach(), before[n]), n


def _decode_threads():
    return sum(1 for t in threading.enumerate() if t.name == "nzrt-decode" and t.is_alive())


def test_an_unreleased_model_is_freed_by_garbage_collection(llama_dir):
    gc.collect()
    threads = _decode_threads()
    model = nzrt.from_pretrained(llama_dir, policy="resident")
    with torch.no_grad():
        model(_ids(n=8))
    run = weakref.ref(handle_of(model))
    ref = weakref.ref(model)
    assert _decode_threads() == threads + 1
    del model
    for _ in range(100):  # a prefetch still in flight holds the runtime until it has finished
        gc.collect()
        if ref() is None:
            break
        threading.Event().wait(0.05)
    assert ref() is None and run() is None
    for _ in range(100):  # the finalizer asked the decode thread to stop
        if _decode_threads() == threads:
            break
        threading.Event().wait(0.05)
    assert _decode_threads() == threads


def test_from_pretrained_refuses_what_is_not_a_model(tmp_path):
    with pytest.raises(TypeError):
        nzrt.from_pretrained(123)
    with pytest.raises(ModelError, match="no such file"):
        nzrt.from_pretrained(str(tmp_path / "missing"))
    bad = tmp_path / "bad.nzrt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError):
        nzrt.from_pretrained(bad)


def test_renamed_checkpoint_keys_fall_back_to_transformers_loading(tmp_path, llama_dir):
    """A checkpoint whose names are not the model's (transformers renames while loading) is
    loaded by transformers and then managed: still exact."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "renamed"
    d.mkdir()
    for f in os.listdir(llama_dir):
        if f != "model.safetensors":
            (d / f).write_bytes((llama_dir / f).read_bytes())
    sd = load_file(str(llama_dir / "model.safetensors"))
    save_file({"transformer." + k: v for k, v in sd.items()},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    lm = open_model(str(d), lazy=True)
    assert lm.compressed is None  # the fallback loaded it dense


def test_a_memory_mapped_original_is_kept_and_given_back_without_a_copy(llama_dir):
    """transformers maps safetensors: entry reclaims the original's file pages and keeps it;
    exit points each parameter back at its own storage (lossy mode needs no restore file)."""
    model = _plain(llama_dir)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    with nzrt.managed(model, policy="resident", mantissa_bits=3) as run:
        with torch.no_grad():
            model(_ids())
        assert run.held_bytes()["restore_copies_on_disk"] == 0
    for n, p in model.named_parameters():
        assert _same(p.detach(), want[n]), n
        if p.numel() >= 2048:
            assert p.data_ptr() == ptrs[n], n


def test_a_lookup_only_embedding_stays_in_its_file_map_on_the_cpu(tmp_path):
    """Only the looked-up rows' pages are ever read, as with plain PyTorch; compressing it would
    hold all of it. A tied embedding (also the head, a GEMM) is compressed as usual."""
    from nzrt import osmem

    for tied in (False, True):
        d = _save_llama(tmp_path / f"m{tied}", tied=tied)
        model = nzrt.from_pretrained(d)
        try:
            run = handle_of(model)
            emb = model.model.embed_tokens.weight
            if tied:
                assert run.kept_mapped == [] and type(emb).__name__ == "ManagedParameter"
            else:
                assert run.kept_mapped == ["model.embed_tokens.weight"]
                assert type(emb) is torch.nn.Parameter and osmem.is_file_backed(emb.detach())
            ids = _ids()
            with torch.no_grad():
                got = model(ids).logits
            plain = _plain(d)
            with torch.no_grad():
                assert _same(got, plain(ids).logits)
        finally:
            nzrt.release(model)


def test_a_lookup_only_embedding_is_stored_in_row_chunks_and_read_chunk_by_chunk(tmp_path):
    from nzrt.format import rowchunks
    from nzrt.format import FormatError

    d = _save_llama(tmp_path / "m", tied=False)
    out = tmp_path / "m.nzrt"
    compress_model(str(d), out)
    entries = nzrt.load(out, verify=False)
    name = "model.embed_tokens.weight"
    parts = sorted(k for k in entries if k.startswith(name + rowchunks.SEP))
    assert name not in entries and len(parts) >= 2
    spans = nzrt.load_metadata(out)[MODEL_META_KEY][rowchunks.META_KEY][name]
    assert spans[0][0] == 0 and spans[-1][1] == 4096
    lm = open_model(str(out))
    assert isinstance(lm.compressed[name], rowchunks.RowChunks)
    plain = _plain(d)
    assert _same(nzrt.decompress(lm.compressed[name]), plain.model.embed_tokens.weight.detach())
    # the runtime takes the chunks as they are: one unit per chunk, all in the file map
    model = nzrt.from_pretrained(out)
    try:
        run = handle_of(model)
        keys = [k for k in run.tensors if k.startswith(name)]
        assert len(keys) == len(parts) and all(run.tensors[k].on_disk for k in keys)
        ids = _ids()
        with torch.no_grad():
            assert _same(model(ids).logits, plain(ids).logits)
    finally:
        nzrt.release(model)
    # compressing the .nzrt again keeps the chunks as they are
    again = tmp_path / "again.nzrt"
    compress_model(open_model(str(out)), again)
    e2 = nzrt.load(again, verify=False)
    assert sorted(k for k in e2 if k.startswith(name)) == parts
    assert all(torch.equal(e2[k].data, entries[k].data) for k in parts)
    # a file whose metadata names chunks it lacks is refused with a clear message
    meta = nzrt.load_metadata(out)
    meta[MODEL_META_KEY][rowchunks.META_KEY][name].append([4096, 4352])
    broken = tmp_path / "broken.nzrt"
    nzrt.save(broken, dict(entries), meta)
    with pytest.raises(FormatError, match="row chunks"):
        open_model(str(broken))


def test_from_pretrained_gguf_matches_the_dense_model_it_compresses():
    """A GGUF goes through transformers (de-quantized, dense) and is compressed on entry."""
    path = model_arg.package_dir(model_arg.EMBEDDED["smollm2"][0]) / model_arg.SMOLLM2_GGUF
    plain = load_gguf(path).model
    ids = torch.randint(0, 49152, (1, TOKENS), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = plain(ids).logits
    del plain
    model = nzrt.from_pretrained(path)
    try:
        assert handle_of(model) is not None and nzrt.report(model).weights_compressed_bytes > 0
        with torch.no_grad():
            assert _same(model(ids).logits, want)
    finally:
        nzrt.release(model)
    # a loaded model gets its dense weights back (not the meta device)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_from_pretrained_opens_an_embedded_model_by_name():
    """``"smollm2"`` names the trained model that ships inside a package (as the CLI's MODEL does):
    the same logits, bit for bit, as that model loaded plainly."""
    from nzrt.loading.embedded import load_embedded

    plain = load_embedded("smollm2", torch.bfloat16)
    ids = (torch.arange(64) * 37 % 4000 + 100).reshape(1, 64)
    with torch.no_grad():
        want = plain.model(input_ids=ids).logits
    del plain
    model = nzrt.from_pretrained("SmolLM2")
    try:
        with torch.no_grad():
            got = model(input_ids=ids).logits
    finally:
        nzrt.release(model)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("source", ["dir", "nzrt_disk_tier"])
def test_generate_gives_plain_logits_at_every_step(llama_dir, tmp_path, source):
    """transformers' generate passes ``logits_to_keep=1`` to a forward that declares it: the
    managed root forward must show the model's signature, or the prompt's head runs over every
    position (another GEMM) and the logits generate returns differ in their last bits. Every
    step's logits, from a 64-token prompt, bit for bit; also from a .nzrt on the disk tier."""
    import inspect

    ids = _ids()
    kw = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    plain = _plain(llama_dir)
    want = plain.generate(ids, **kw)
    del plain
    if source == "dir":
        model = nzrt.from_pretrained(llama_dir)
    else:
        out = tmp_path / "m.nzrt"
        compress_model(str(llama_dir), out)
        model = nzrt.from_pretrained(out, budget="24MiB")
    try:
        assert "logits_to_keep" in inspect.signature(model.forward).parameters
        got = model.generate(ids, **kw)
        assert torch.equal(got.sequences, want.sequences)
        assert len(got.logits) == len(want.logits) == 4
        for g, w in zip(got.logits, want.logits):
            assert _same(g, w)
        if source != "dir":
            assert nzrt.report(model).plan.startswith("auto") and "disk" in nzrt.report(model).plan
    finally:
        nzrt.release(model)


def _cached_fraction(path) -> float:
    """The fraction of ``path``'s pages in the page cache (mincore over a fresh read-only map)."""
    import ctypes
    import mmap

    import numpy as np
    n = os.path.getsize(path)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), n, prot=mmap.PROT_READ)
    pages = (n + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert libc.mincore(np.frombuffer(m, dtype=np.uint8).ctypes.data, n, vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) / pages


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="mincore and /proc are Linux's")
def test_the_disk_tier_reads_the_file_each_pass_and_leaves_it_in_the_page_cache(llama_dir, tmp_path):
    """On the disk tier a .nzrt's blobs are read from the file every pass: their pages leave the
    process after each read (the file's RSS stays far below its size) but stay in the page cache,
    so the next pass does not read the disk again (MADV_PAGEOUT used to evict them)."""
    from nzrt import osmem

    out = tmp_path / "m.nzrt"
    compress_model(str(llama_dir), out)
    model = nzrt.from_pretrained(out, budget="24MiB")
    try:
        with torch.no_grad():
            for _ in range(3):
                model(_ids())
        rep = nzrt.report(model)
        assert "disk" in rep.plan and rep.held["compressed_mapped"] > 0
        mapped = [t for n, t in _file_rss_by_path().items() if n == str(out)]
        size = os.path.getsize(out)
        assert mapped and mapped[0] < size // 2, (mapped, size)
        assert _cached_fraction(out) >= 0.9
    finally:
        nzrt.release(model)


def _file_rss_by_path() -> dict:
    """Resident bytes of each mapped file of this process (``/proc/self/smaps``)."""
    out, cur = {}, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                cur = head[5] if len(head) > 5 else None
            elif head and head[0] == "Rss:" and cur:
                out[cur] = out.get(cur, 0) + int(head[1]) * 1024
    return out
