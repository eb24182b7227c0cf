"""``nzrt compress --fused`` (``compress_model(..., widths=codec.WINDOW4)``): a .nzrt in the window
code, which the fused CPU kernel multiplies from fastest. Lossless like the default file; a
fused session reads it straight from the file's pages by the window code's fast path and gives
the bits of a session that compressed the same weights itself; the default policy gives plain
transformers' logits bit for bit."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nzrt
from nzrt import codec, osmem
from nzrt.format import CompressedTensor
from nzrt.kernels.cpu import fused_w4
from nzrt.loading.compress import compress_model
from nzrt.loading.open_model import open_model
from nzrt.policies import Fused
from nzrt.runtime.handle import handle_of

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib
from test_pretrained import _ids, _plain, _same, _save_llama  # noqa: E402

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.torch")
from typer.testing import CliRunner  # noqa: E402

from nzrt.cli import app  # noqa: E402

runner = CliRunner()
LINEARS = 8  # one layer's seven projections and the (untied) head


def _compress_cli(*args):
    res = runner.invoke(app, ["compress", *map(str, args)])
    assert res.exit_code == 0, (res.output, res.exception)
    return res.output


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("compress_fused")
    src = _save_llama(d / "m", tied=False, layers=1)
    text = _compress_cli(src, d / "fused.nzrt", "--fused")
    assert "window code" in text
    _compress_cli(src, d / "default.nzrt")
    return src, d / "fused.nzrt", d / "default.nzrt"


def _blobs(path) -> list:
    return [v for v in nzrt.load(path).values() if isinstance(v, CompressedTensor)]


def _decoded(path) -> dict:
    lm = open_model(str(path), lazy=True)
    return {n: codec.decompress(ct) for n, ct in lm.compressed.items()}


def test_the_fused_file_is_in_the_window_code_and_decodes_to_the_source_bits(files):
    src, fused, default = files
    blobs = _blobs(fused)
    assert blobs and all(tuple(ct.header.widths) == codec.WINDOW4 and ct.header.lossless for ct in blobs)
    assert any(tuple(ct.header.widths) != codec.WINDOW4 for ct in _blobs(default))  # the flag made it
    assert sum(ct.nbytes for ct in blobs) > sum(ct.nbytes for ct in _blobs(default))  # the larger code
    want = safetensors.load_file(str(src / "model.safetensors"))
    got = _decoded(fused)
    assert set(got) == set(want)
    for name, t in got.items():
        assert _same(t, want[name]), name


def test_inspect_names_the_exponent_code(files):
    _, fused, default = files
    for path, code in ((fused, "window"), (default, "cascade")):
        res = runner.invoke(app, ["inspect", str(path), "--json"])
        assert res.exit_code == 0, res.output
        rows = [r for r in json.loads(res.output)["tensors"] if r["compressed"]]
        assert rows and all(r["code"] == code for r in rows)
    table = runner.invoke(app, ["inspect", str(fused)]).output
    assert f"exponent code: {len(_blobs(fused))} tensors in the window code" in table
    assert "exponent code:" not in runner.invoke(app, ["inspect", str(default)]).output


def test_a_fused_session_reads_the_window_code_from_the_file_pages(files):
    """No dense copy, no re-encoding, no copy of a blob into anonymous memory: each fused Linear
    multiplies from the file's own blob, by the fast path where the CPU has it; the logits are
    those of a session that compressed the weights itself in the same code, and of one reading
    the default file (the fused arithmetic does not depend on the code)."""
    src, fused, default = files
    ids = _ids(n=1)
    logits, summaries = {}, {}
    for name, path, policy in (("file", fused, "fused"), ("default file", default, "fused"),
                               ("itself", src, Fused(widths=codec.WINDOW4))):
        model = nzrt.from_pretrained(path, policy=policy)
        try:
            with torch.no_grad():
                logits[name] = model(ids).logits
            rep = nzrt.report(model)
            summaries[name] = rep.fused
            if name == "file":
                run = handle_of(model)
                fws = run.shared.decoder._fused_weights
                assert len(fws) >= LINEARS
                for key, fw in fws.items():
                    ct = fw.ct
                    assert ct is run.tensors[key].ct and tuple(ct.header.widths) == codec.WINDOW4
                    assert osmem.is_file_backed(ct.data)  # the file's page cache, not a copy
                    assert fw.window == fused_w4.HAS_AVX512BW
                    if fw.window:  # the kernel's streams are views of the mapped blob
                        sm, level0 = fw._w4[:2]
                        blob = ct.data.numpy()
                        assert np.shares_memory(sm, blob) and np.shares_memory(level0, blob)
                assert rep.held["compressed_mapped"] > 0
                assert rep.held["compressed_host"] == rep.held["compressed_device"] == 0
                assert sum(x.decodes for x in rep.layers if "norm" not in x.name) == 0
        finally:
            nzrt.release(model)
    fast = LINEARS if fused_w4.HAS_AVX512BW else 0
    assert f"Linear weights: {fast} by the window code's fast path, {LINEARS - fast} by the general path" \
        in summaries["file"]
    assert f"Linear weights: 0 by the window code's fast path, {LINEARS} by the general path" \
        in summaries["default file"]
    assert _same(logits["file"], logits["itself"])
    assert _same(logits["file"], logits["default file"])


def test_the_default_policy_from_the_fused_file_is_plain_bit_for_bit(files):
    src, fused, _ = files
    ids = _ids()
    plain = _plain(src)
    with torch.no_grad():
        want = plain(ids).logits
    del plain
    model = nzrt.from_pretrained(fused)
    try:
        with torch.no_grad():
            assert _same(model(ids).logits, want)
    finally:
        nzrt.release(model)


def test_a_nzrt_is_compressed_again_into_the_window_code_exactly(files, tmp_path):
    """From a default .nzrt (lossless, and lossy with -k 3): its blobs are re-encoded, not kept,
    at the mantissa bits they hold; without --fused a window-coded file's blobs are kept."""
    src, fused, default = files
    lossy = tmp_path / "lossy.nzrt"
    _compress_cli(src, lossy, "-k", "3")
    for path in (default, lossy):
        out = tmp_path / f"again-{path.name}"
        compress_model(str(path), out, widths=codec.WINDOW4)
        before, after = _blobs(path), _blobs(out)
        assert all(tuple(ct.header.widths) == codec.WINDOW4 for ct in after)
        assert sorted(ct.header.mantissa_bits for ct in after) == sorted(ct.header.mantissa_bits for ct in before)
        want, got = _decoded(path), _decoded(out)
        assert all(_same(got[n], want[n]) for n in want)
    kept = tmp_path / "kept.nzrt"
    compress_model(str(fused), kept)
    assert all(tuple(ct.header.widths) == codec.WINDOW4 for ct in _blobs(kept))


def test_fused_with_mantissa_bits_is_allowed_and_says_what_it_gets(files, tmp_path):
    src, _, _ = files
    out = tmp_path / "lossy-fused.nzrt"
    text = _compress_cli(src, out, "--fused", "-k", "3")
    assert "lossy, 3 mantissa bits; window code" in text and "general path" in text
    blobs = _blobs(out)
    assert all(tuple(ct.header.widths) == codec.WINDOW4 for ct in blobs)
    assert any(ct.header.mantissa_bits == 3 for ct in blobs)


@pytest.mark.parametrize("widths", [(6,), (4, 4, 4, 4, 4), "auto", 4])
def test_a_bad_code_is_one_clear_error_before_any_file(files, tmp_path, widths):
    src, fused, _ = files
    for source in (str(src), str(fused)):
        out = tmp_path / "bad.nzrt"
        with pytest.raises(ValueError, match=r"widths.*WINDOW4"):
            compress_model(source, out, widths=widths)
        assert not out.exists() and not list(tmp_path.iterdir())


def test_a_fused_session_multiplies_a_head_in_row_chunks_from_the_file(tmp_path):
    """A large untied head is stored in row chunks; the fused policy multiplies it chunk by chunk
    from the file's pages (no dense copy of it, nothing re-encoded into memory), and each output
    comes from its own weight row, so the logits are those of a fused session holding the head
    whole in the same code, bit for bit (1 and 4 rows; hidden 1024, an 8192 x 1024 head)."""
    src = _save_llama(tmp_path / "m", tied=False, layers=1, vocab=8192)
    out = tmp_path / "fused.nzrt"
    _compress_cli(src, out, "--fused")
    assert sum(1 for n in nzrt.load(out) if n.startswith("lm_head.weight.__rows__")) >= 2
    whole = nzrt.from_pretrained(src, policy=Fused(widths=codec.WINDOW4))
    chunked = nzrt.from_pretrained(out, policy="fused")
    try:
        run = handle_of(chunked)
        assert sum(1 for u in run.units if u.startswith("lm_head#")) >= 2
        assert not any(u.startswith("lm_head#") for u in handle_of(whole).units)
        for rows in (1, 4):
            ids = _ids(8192, rows)
            with torch.no_grad():
                want, got = whole(ids).logits, chunked(ids).logits
            assert _same(got, want), rows
        rep = nzrt.report(chunked)
        assert rep.held["compressed_device"] == 0 and rep.held["compressed_mapped"] > 0
        assert "0 by the general path" in str(rep)
    finally:
        nzrt.release(whole)
        nzrt.release(chunked)
