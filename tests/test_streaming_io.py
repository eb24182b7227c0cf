"""Streaming I/O: our own safetensors reader (validated header, no mmap, one tensor at a time),
the streaming .nzrt Writer, and `nzrt compress` of a transformers directory tensor by tensor.

Bit-identity is checked on integer views; memory is measured as the RSS of a child process."""
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nzrt
from nzrt.format import checkpoint
from nzrt.loading import safetensors_io as sio
from nzrt.loading.compress import compress_model, compress_transformers_dir
from nzrt.loading.loaded import LoadedModel
from nzrt.loading.open_model import open_model
from nzrt.format import FormatError

safetensors_torch = pytest.importorskip("safetensors.torch")
ROOT = Path(__file__).resolve().parents[1]
INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
       torch.float64: torch.int64, torch.bool: torch.uint8}


def bits(t):
    t = t.contiguous()
    return t.view(INT[t.dtype]) if t.dtype in INT else t


def same(a, b) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(bits(a), bits(b))


def raw_file(path, header: dict, data: bytes = b"", hlen: int | None = None) -> Path:
    """A safetensors file with exactly this header and data (no checks: for malformed inputs)."""
    text = json.dumps(header).encode()
    path = Path(path)
    path.write_bytes(struct.pack("<Q", len(text) if hlen is None else hlen) + text + data)
    return path


@pytest.fixture
def no_data_reads(monkeypatch):
    """Any read of tensor data fails the test: errors must come from the header alone."""
    def boom(*a, **k):
        raise AssertionError("a data byte was read before the header was refused")
    monkeypatch.setattr(sio, "_read_entry", boom)


# -- header validation --------------------------------------------------------------------------
def _two(a_off, b_off, a_shape=(2, 2), dtype="F32"):
    return {"a": {"dtype": dtype, "shape": list(a_shape), "data_offsets": list(a_off)},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": list(b_off)}}


@pytest.mark.parametrize("case,header,data,hlen,needle", [
    ("truncated", _two((0, 16), (16, 24)), bytes(20), None, "'b'"),
    ("out of bounds", _two((0, 16), (16, 4000)), bytes(24), None, "out of bounds"),
    ("overlap", _two((0, 16), (8, 16)), bytes(24), None, "overlap"),
    ("wrong nbytes", _two((0, 12), (12, 20)), bytes(20), None, "imply 16"),
    ("unknown dtype", _two((0, 16), (16, 24), dtype="F8_E4M3"), bytes(24), None, "F8_E4M3"),
    ("huge header", _two((0, 16), (16, 24)), bytes(24), 1 << 62, "header length"),
    ("header past end", _two((0, 16), (16, 24)), bytes(24), 10_000, "truncated"),
    ("hole", _two((0, 16), (20, 28)), bytes(28), None, "hole"),
    ("trailing", _two((0, 16), (16, 24)), bytes(30), None, "trailing"),
    ("negative dim", _two((0, 16), (16, 24), a_shape=(-2, -2)), bytes(24), None, "shape"),
    ("bad metadata", dict(_two((0, 16), (16, 24)), __metadata__={"x": 1}), bytes(24), None, "__metadata__"),
])
def test_header_refused_whole_before_any_data(tmp_path, no_data_reads, case, header, data, hlen, needle):
    f = raw_file(tmp_path / "model.safetensors", header, data, hlen)
    for call in (lambda: sio.SafetensorsDir(tmp_path), lambda: sio.iter_tensors(tmp_path),
                 lambda: sio.SafetensorsDir(f)):
        with pytest.raises(FormatError) as ei:
            call()
        msg = str(ei.value)
        assert str(f) in msg and needle in msg, (case, msg)
        assert isinstance(ei.value, ValueError)  # FormatError is a ValueError


def test_header_errors_name_the_tensor(tmp_path, no_data_reads):
    raw_file(tmp_path / "model.safetensors", _two((0, 12), (12, 20)), bytes(20))
    with pytest.raises(sio.SafetensorsError, match=r"tensor 'a'.*imply 16"):
        sio.SafetensorsDir(tmp_path)


def test_duplicate_keys_and_not_json_refused(tmp_path, no_data_reads):
    text = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + b"\0")
    with pytest.raises(FormatError, match="duplicate"):
        sio.SafetensorsDir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 3) + b"{x}")
    with pytest.raises(FormatError, match="JSON"):
        sio.SafetensorsDir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\1\2")
    with pytest.raises(FormatError, match="too short"):
        sio.SafetensorsDir(tmp_path)


def test_valid_raw_header_reads(tmp_path):
    """The crafted layout above is right when the numbers are: the refusals are not blanket."""
    data = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    raw_file(tmp_path / "model.safetensors", dict(_two((0, 16), (16, 24)), __metadata__={"format": "pt"}), data)
    st = sio.SafetensorsDir(tmp_path)
    assert list(st) == ["a", "b"] and st.metadata == {"format": "pt"}
    assert torch.equal(st["a"], torch.arange(4.0).reshape(2, 2)) and torch.equal(st["b"], torch.tensor([4.0, 5.0]))


def test_file_shrunk_after_validation_is_an_error(tmp_path):
    f = tmp_path / "model.safetensors"
    safetensors_torch.save_file({"w": torch.randn(64, 64)}, str(f))
    st = sio.SafetensorsDir(tmp_path)
    os.truncate(f, f.stat().st_size - 100)
    with pytest.raises(sio.SafetensorsError, match=r"tensor 'w'.*ended"):
        st["w"]


# -- round trips ---------------------------------------------------------------------------------
def _all_dtypes():
    g = torch.Generator().manual_seed(1)
    out = {}
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        x = torch.randn(33, 17, generator=g).to(dt)
        x.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-30]).to(dt)
        out[f"f.{str(dt)[6:]}"] = x
    for dt in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        info = torch.iinfo(dt)
        out[f"i.{str(dt)[6:]}"] = torch.randint(info.min, info.max, (5, 7), generator=g, dtype=dt)
    out["bool"] = torch.rand(9, generator=g) > 0.5
    out["scalar"] = torch.tensor(3.5, dtype=torch.bfloat16)
    out["empty"] = torch.empty(0, 5, dtype=torch.float16)
    return out


def test_roundtrip_all_dtypes_bit_identical(tmp_path):
    ts = _all_dtypes()
    safetensors_torch.save_file(ts, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    st = sio.SafetensorsDir(tmp_path)
    assert set(st) == set(ts) and len(st) == len(ts)
    assert st.total_bytes() == sum(t.numel() * t.element_size() for t in ts.values())
    for name, t in ts.items():
        assert st.info(name) == (t.dtype, tuple(t.shape), t.numel() * t.element_size())
        a, b = st[name], st[name]
        assert same(a, t), name
        assert a.data_ptr() != b.data_ptr() or a.numel() == 0  # fresh memory each call
    seen = []
    for name, t in sio.iter_tensors(tmp_path / "model.safetensors"):
        assert same(t, ts[name]), name
        seen.append(name)
    # file order = data order
    begins = {n: e.begin for n, e in sio.read_header(tmp_path / "model.safetensors")[0].items()}
    assert seen == sorted(seen, key=begins.get) and set(seen) == set(ts)
    with pytest.raises(KeyError):
        st["nope"]


def _sharded(tmp_path, ts, split):
    names = list(ts)
    wm = {}
    for i, part in enumerate((names[:split], names[split:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        safetensors_torch.save_file({n: ts[n] for n in part}, str(tmp_path / fname))
        wm.update(dict.fromkeys(part, fname))
    (tmp_path / sio.INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    return wm


def test_sharded_directory(tmp_path):
    ts = _all_dtypes()
    wm = _sharded(tmp_path, ts, 5)
    st = sio.SafetensorsDir(tmp_path)
    assert set(st) == set(ts) and [f.name for f in st.files] == sorted(set(wm.values()))
    got = dict(sio.iter_tensors(tmp_path))
    assert list(got) == list(st)
    assert all(same(got[n], ts[n]) and same(st[n], ts[n]) for n in ts)
    # the first shard's names come first (file order)
    first = [n for n in st if wm[n].startswith("model-00001")]
    assert list(st)[:len(first)] == first


def test_sharded_index_inconsistent(tmp_path, no_data_reads):
    ts = {"a": torch.zeros(4), "b": torch.ones(4), "c": torch.ones(2)}
    wm = _sharded(tmp_path, ts, 2)
    index = tmp_path / sio.INDEX
    for bad, needle in (({**wm, "a": wm["c"]}, "'a'"), ({**wm, "zz": wm["a"]}, "'zz'"),
                        ({k: v for k, v in wm.items() if k != "b"}, "'b'"),
                        ({**wm, "a": "../evil.safetensors"}, "not a file name"),
                        ({**wm, "a": "model-00009.safetensors"}, "missing")):
        index.write_text(json.dumps({"weight_map": bad}))
        with pytest.raises(FormatError, match=needle):
            sio.SafetensorsDir(tmp_path)
    # a bad second shard is refused before the first shard's data is read
    index.write_text(json.dumps({"weight_map": wm}))
    second = tmp_path / wm["c"]
    second.write_bytes(second.read_bytes()[:-3])
    with pytest.raises(FormatError, match=second.name):
        sio.iter_tensors(tmp_path)


def test_reads_do_not_mmap(tmp_path):
    """Tensors read are anonymous memory: no map of the file stays (or ever appears) in the process."""
    f = tmp_path / "model.safetensors"
    safetensors_torch.save_file({"w": torch.randn(256, 256)}, str(f))
    st = sio.SafetensorsDir(tmp_path)
    t = st["w"]
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(f) not in maps.read_text()
    assert t.untyped_storage().nbytes() == 256 * 256 * 4


# -- Writer ----------------------------------------------------------------------------------------
def _writer_tensors():
    g = torch.Generator().manual_seed(2)
    return {"w": nzrt.compress((torch.randn(128, 96, generator=g) * 0.02).to(torch.bfloat16)),
            "ids": torch.arange(11), "h": torch.randn(3, 5, generator=g).half(), "e": torch.empty(0)}


def test_writer_streams_the_same_bytes_as_save(tmp_path):
    ts = _writer_tensors()
    nzrt.save(tmp_path / "a.nzrt", ts, {"x": 1})
    with checkpoint.Writer(tmp_path / "b.nzrt", {"x": 0}) as w:
        for k, v in ts.items():
            w.add(k, v)
        assert not (tmp_path / "b.nzrt").exists()  # nothing final before close
        assert len(w) == len(ts) and "w" in w
        w.close({"x": 1})  # inside the block: __exit__ then has nothing to do
    assert (tmp_path / "a.nzrt").read_bytes() == (tmp_path / "b.nzrt").read_bytes()
    back = nzrt.load(tmp_path / "b.nzrt")
    assert same(nzrt.decompress(back["w"]), nzrt.decompress(ts["w"])) and same(back["h"], ts["h"])
    assert sorted(os.listdir(tmp_path)) == ["a.nzrt", "b.nzrt"]


def test_writer_metadata_override_and_errors(tmp_path):
    w = checkpoint.Writer(tmp_path / "m.nzrt", {"a": 1})
    w.add("x", torch.ones(3))
    with pytest.raises(ValueError, match="duplicate"):
        w.add("x", torch.ones(3))
    with pytest.raises(TypeError, match="str"):
        w.add(3, torch.ones(3))
    with pytest.raises(TypeError, match="Tensor"):
        w.add("y", [1, 2])
    w.close({"b": 2})
    assert nzrt.load_metadata(tmp_path / "m.nzrt") == {"b": 2}
    with pytest.raises(ValueError, match="closed"):
        w.add("z", torch.ones(1))
    with pytest.raises(TypeError):
        checkpoint.Writer(tmp_path / "n.nzrt", {"bad": object()})
    assert sorted(os.listdir(tmp_path)) == ["m.nzrt"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_writer_abort_leaves_no_files(tmp_path, exc):
    old = tmp_path / "keep.nzrt"
    nzrt.save(old, {"a": torch.ones(2)})
    before = old.read_bytes()
    with pytest.raises(exc):
        with checkpoint.Writer(old) as w:
            w.add("big", torch.randn(1000))
            assert len(os.listdir(tmp_path)) == 2  # the data temporary exists meanwhile
            raise exc()
    assert os.listdir(tmp_path) == ["keep.nzrt"] and old.read_bytes() == before
    w2 = checkpoint.Writer(tmp_path / "new.nzrt")
    w2.add("x", torch.ones(2))
    w2.abort()
    assert os.listdir(tmp_path) == ["keep.nzrt"]
    # a failure inside close (here: the rename) also leaves nothing behind
    w3 = checkpoint.Writer(tmp_path / "new.nzrt")
    w3.add("x", torch.ones(2))
    real = os.replace
    try:
        os.replace = lambda *a: (_ for _ in ()).throw(OSError("disk full"))
        with pytest.raises(OSError, match="disk full"):
            w3.close()
    finally:
        os.replace = real
    assert os.listdir(tmp_path) == ["keep.nzrt"]


def test_writer_copy_fallback(tmp_path, monkeypatch):
    """Without copy_file_range the data is copied by hand, in chunks smaller than a buffer."""
    ts = _writer_tensors()
    nzrt.save(tmp_path / "a.nzrt", ts)
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    monkeypatch.setattr(checkpoint.Writer, "COPY_CHUNK", 1000)
    nzrt.save(tmp_path / "b.nzrt", ts)
    assert (tmp_path / "a.nzrt").read_bytes() == (tmp_path / "b.nzrt").read_bytes()


# -- streaming compress of a transformers directory ------------------------------------------------
transformers = pytest.importorskip("transformers")


def _llama_dir(where: Path, tie: bool, *, layers=2, hidden=1024, inter=1536, vocab=1024, sharded=False):
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=vocab,
                                   max_position_embeddings=256, tie_word_embeddings=tie,
                                   architectures=["LlamaForCausalLM"])
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # trained-looking norms (not all ones) so a swap would show
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    kw = {"max_shard_size": "8MB"} if sharded else {}
    model.save_pretrained(str(where), **kw)
    return where


@pytest.mark.parametrize("tie,sharded", [(True, False), (False, True)])
def test_streamed_compress_matches_from_pretrained(tmp_path, monkeypatch, tie, sharded):
    src = _llama_dir(tmp_path / "src", tie, sharded=sharded)
    assert (src / sio.INDEX).is_file() == sharded
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype="auto")
    calls = []

    def no_dense_load(*a, **k):
        calls.append(a)
        raise AssertionError("the streaming path loaded the dense model")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_dense_load)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_dense_load)
    seen = []
    out = tmp_path / "out.nzrt"
    st = compress_model(src, out, progress=lambda d, t, n: seen.append((d, t, n)))
    monkeypatch.undo()
    assert st.streamed and not calls and st.dtype == "bfloat16"
    ref_params = dict(ref.named_parameters())
    assert st.tensors == len(ref_params) and st.params == sum(p.numel() for p in ref_params.values())
    assert [n for _, _, n in seen] == list(ref_params) and seen[-1][0] == seen[-1][1] == st.params
    lm = open_model(str(out))
    assert lm.on_meta and lm.kind == "causal-lm" and lm.name == "src"
    lm.materialize()
    got = lm.model.state_dict()
    want = ref.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert same(got[name], want[name]), name
    for (n1, b1), (n2, b2) in zip(ref.named_buffers(), lm.model.named_buffers()):
        assert n1 == n2 and same(b1, b2), n1
    assert (lm.model.lm_head.weight is lm.model.model.embed_tokens.weight) == tie
    # the same file content (entries, order, metadata) as the load-then-compress path
    dense = tmp_path / "dense.nzrt"
    compress_model(LoadedModel(ref, None, "causal-lm", name="src", source=str(src)), dense)
    a, b = nzrt.load(out), nzrt.load(dense)
    assert list(a) == list(b)
    assert nzrt.load_metadata(out) == nzrt.load_metadata(dense)
    with torch.no_grad():
        ids = torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(0))
        assert same(lm.model(ids).logits, ref(ids).logits)


def test_streamed_lossy_keeps_small_tensors_exact(tmp_path):
    src = _llama_dir(tmp_path / "src", True, layers=1, hidden=256, inter=512, vocab=512)
    out = tmp_path / "k3.nzrt"
    st = compress_model(src, out, mantissa_bits=3)
    assert st.streamed
    ck = nzrt.load(out)
    assert ck["model.embed_tokens.weight"].header.mantissa_bits == 3
    assert ck["model.norm.weight"].header.mantissa_bits == 7  # below min_lossy_numel: lossless
    with pytest.raises(ValueError, match="mantissa-bits"):
        compress_model(src, tmp_path / "bad.nzrt", mantissa_bits=9)


def test_renamed_keys_fall_back_to_dense_path(tmp_path):
    src = _llama_dir(tmp_path / "src", True, layers=1, hidden=256, inter=512, vocab=512)
    ts = safetensors_torch.load_file(str(src / "model.safetensors"))
    ts = {k.replace("model.", "transformer.", 1): v for k, v in ts.items()}
    safetensors_torch.save_file(ts, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert compress_transformers_dir(src, tmp_path / "x.nzrt") is None
    assert not (tmp_path / "x.nzrt").exists() and sorted(os.listdir(tmp_path)) == ["src"]


def test_cli_compress_directory_streams_with_line_progress(tmp_path):
    src = _llama_dir(tmp_path / "src", False, layers=3, hidden=256, inter=512, vocab=512)
    out = tmp_path / "o.nzrt"
    code = ("import sys, transformers\n"
            "def no(*a, **k): raise SystemExit('dense load')\n"
            "transformers.AutoModelForCausalLM.from_pretrained = no\n"
            "from nzrt.cli import main\n"
            "sys.argv = ['nzrt', 'compress', sys.argv[1], sys.argv[2]]\n"
            "main()\n")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    r = subprocess.run([sys.executable, "-c", code, str(src), str(out)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("compressing:")]
    assert 5 <= len(lines) <= 11 and lines[-1].startswith("compressing: 100%"), r.stderr
    assert "weight tensors" in r.stdout and "bits/weight" in r.stdout
    assert open_model(str(out)).on_meta


# -- memory: a child process, RSS measured -----------------------------------------------------------
_CHILD = textwrap.dedent("""
    import json, os, sys, threading, time
    import torch, transformers, nzrt
    from nzrt.loading.compress import compress_model

    def status():
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[k] = int(v.split()[0]) * 1024
        return out

    src, small, out = sys.argv[1:4]
    compress_model(small, out + ".warm")          # numba compiled, modules imported
    nzrt.decompress(nzrt.compress(torch.randn(4096).to(torch.bfloat16)))
    peak = {"RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            s = status()
            for k in peak:
                peak[k] = max(peak[k], s[k])
            time.sleep(0.002)

    base = status()
    with open("/proc/self/clear_refs", "w") as f:      # VmHWM := VmRSS now
        f.write("5")
    base = status()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    st = compress_model(src, out)
    stop.set(); th.join()
    end = status()
    print(json.dumps({"base": base, "end": end, "peak": peak, "streamed": st.streamed,
                      "file_bytes": st.file_bytes, "dense_bytes": st.dense_bytes}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_streamed_compress_peak_rss_is_one_tensor(tmp_path):
    """~300 MB of bf16 in nine 32 MiB tensors: the child's peak RSS grows by about one tensor."""
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=4096, num_hidden_layers=1,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=4096,
                                   max_position_embeddings=256, tie_word_embeddings=False,
                                   architectures=["LlamaForCausalLM"], dtype="bfloat16")
    src = tmp_path / "big"
    src.mkdir()
    cfg.save_pretrained(str(src))
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in transformers.LlamaForCausalLM(cfg).named_parameters()}
    g = torch.Generator().manual_seed(4)
    ts = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
    safetensors_torch.save_file(ts, str(src / "model.safetensors"), metadata={"format": "pt"})
    biggest = max(t.numel() * t.element_size() for t in ts.values())
    total = sum(t.numel() * t.element_size() for t in ts.values())
    del ts
    small = _llama_dir(tmp_path / "small", False, layers=1, hidden=256, inter=512, vocab=512)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    r = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(small), str(tmp_path / "o.nzrt")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    growth = res["end"]["VmHWM"] - res["base"]["VmRSS"]
    anon = res["peak"]["RssAnon"] - res["base"]["RssAnon"]
    filemapped = res["peak"]["RssFile"] - res["base"]["RssFile"]
    print(f"\nstreamed compress of {total / 2**20:.0f} MiB ({biggest / 2**20:.0f} MiB largest tensor): "
          f"peak RSS growth {growth / 2**20:.1f} MiB (anon {anon / 2**20:.1f}, file {filemapped / 2**20:.1f})")
    assert res["streamed"] and res["dense_bytes"] == total
    assert growth < 3 * biggest + (64 << 20), res
    assert growth < total / 2, res
    assert filemapped < (32 << 20), res  # no mmap of the source (or the output)
