"""The numba backend writes exactly the reference's bytes and decodes exactly the reference's bits.

Integers are compared (bit patterns), never floats. Output buffers are poisoned before decoding.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest
import torch

import nzrt
from nzrt.format import CompressedTensor
from nzrt.kernels import cpu as cpu_backend, reference, spec
from nzrt.kernels.spec import FormatError

POISON = 0x5A5A
INT = {2: torch.int16, 4: torch.int32}


def bits_of(t: torch.Tensor) -> np.ndarray:
    lay = spec.LAYOUTS[str(t.dtype).removeprefix("torch.")]
    return t.contiguous().view(INT[lay.itemsize]).reshape(-1).numpy().view(lay.uint)


def as_ct(dtype: str, n: int, keep: int, tile: int, enc) -> CompressedTensor:
    widths, has_raw, symbols, sections = enc
    return CompressedTensor.from_sections(
        dict(dtype=dtype, shape=(n,), mantissa_bits=keep, tile=tile, widths=tuple(widths),
             has_raw=has_raw, symbols=tuple(int(s) for s in symbols)), sections)


def poisoned(n: int, lay) -> np.ndarray:
    return np.full(n, POISON if lay.itemsize == 2 else 0x5A5A5A5A, lay.uint)


def check_same(bits: np.ndarray, dtype: str, keep: int | None = None, tile: int = spec.DEFAULT_TILE):
    """numba encode == reference encode (every section, byte for byte); both decoders agree."""
    lay = spec.LAYOUTS[dtype]
    keep = lay.man_bits if keep is None else keep
    ref = reference.encode(bits, lay, keep, tile)
    got = cpu_backend.encode(bits, lay, keep, tile)
    assert got[0] == ref[0] and got[1] == ref[1]
    assert np.array_equal(got[2], ref[2]) and got[2].dtype == ref[2].dtype
    assert list(got[3]) == list(ref[3]), "section names or order differ"
    for name in ref[3]:
        r, g = ref[3][name], got[3][name]
        assert g.dtype == r.dtype and g.shape == r.shape, name
        assert np.array_equal(g, r), f"section {name} differs"
    ct = as_ct(dtype, len(bits), keep, tile, ref)
    # the blob the numba backend writes in place is the one from_sections lays out, padding
    # included, and its CRC is zlib's
    _, _, _, blob, table, crc = cpu_backend.encode_blob(bits, lay, keep, tile)
    assert table == ct.header.sections
    assert np.array_equal(blob, ct.data.numpy()), "blob differs from from_sections' layout"
    assert crc == zlib.crc32(blob) == ct.header.crc32
    want = poisoned(len(bits), lay)
    reference.decode_into(ct, want)
    out = poisoned(len(bits), lay)
    cpu_backend.decode_into(ct, out)
    assert np.array_equal(out, want)
    if keep == lay.man_bits:
        assert np.array_equal(out, bits)
    return ct, out


def trained_like(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.02).to(dtype)


ALL16 = torch.arange(65536, dtype=torch.int32).to(torch.int16)


# --- the plan ----------------------------------------------------------------------------------

def test_choose_cascade_is_specs():
    rng = np.random.default_rng(1)
    for trial in range(60):
        nsym = int(rng.choice([32, 256]))
        k = int(rng.integers(1, nsym + 1))
        hist = np.zeros(nsym, np.int64)
        idx = rng.choice(nsym, size=k, replace=False)
        scale = 10.0 ** rng.uniform(0, 7)
        hist[idx] = (rng.pareto(rng.uniform(0.3, 3), size=k) * scale).astype(np.int64) + 1
        exp_bits = 5 if nsym == 32 else 8
        tile = int(rng.choice([8, 64, 8192]))
        assert cpu_backend.choose_cascade(hist, exp_bits, tile) == spec.choose_cascade(hist, exp_bits, tile)
    assert cpu_backend.choose_cascade(np.zeros(256, np.int64), 8, 8192) == ((), False)


def test_crc32_is_zlibs():
    rng = np.random.default_rng(3)
    for n in list(range(0, 300)) + [1000, 4096 + 17, 1 << 16]:
        buf = rng.integers(0, 256, n, dtype=np.uint8)
        for start in (0, 1, 0xFFFFFFFF, 0x1234567):
            assert cpu_backend.crc32(buf, start) == zlib.crc32(buf, start), (n, start)
    buf = rng.integers(0, 256, 5000, dtype=np.uint8)
    assert cpu_backend.crc32(buf[3:]) == zlib.crc32(buf[3:].tobytes())  # unaligned start
    buf[1234] ^= 4
    assert cpu_backend.crc32(buf) == zlib.crc32(buf)


# --- exhaustive bit patterns --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_16_bit_pattern(dtype):
    bits = ALL16.numpy().view(np.uint16)
    check_same(bits, dtype)
    check_same(bits, dtype, tile=64)
    # and through the public API, forced onto the numba backend
    t = ALL16.view(getattr(torch, dtype)).reshape(256, 256)
    ct = nzrt.compress(t, backend="numba")
    out = torch.full_like(t, 0).view(torch.int16).fill_(POISON).view(t.dtype)
    nzrt.decode_into(ct, out, backend="numba")
    assert torch.equal(out.view(torch.int16), t.view(torch.int16))


@pytest.mark.parametrize("keep", range(7))
def test_lossy_bf16_every_pattern(keep):
    bits = ALL16.numpy().view(np.uint16)
    ct, out = check_same(bits, "bfloat16", keep=keep)
    assert len(ct.np_sections()["patch_idx"]) > 0  # the NaNs went through the patch list
    # shuffled, so NaN/inf/±0/subnormals sit among normal values in every tile
    perm = np.random.default_rng(keep).permutation(65536)
    check_same(bits[perm], "bfloat16", keep=keep, tile=512)


# --- trained-like tensors, sizes and tiles ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_trained_like_sizes(dtype):
    name = str(dtype).removeprefix("torch.")
    tile = 1024
    for n in (0, 1, 2, 3, 5, 7, 8, 9, tile - 1, tile, tile + 1, 3 * tile + 5):
        check_same(bits_of(trained_like(n, dtype, seed=n)), name, tile=tile)
    check_same(bits_of(trained_like(20000, dtype)), name)  # the default tile
    for tile in (8, 16):
        check_same(bits_of(trained_like(3000, dtype, seed=tile)), name, tile=tile)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_exponent_shapes(dtype):
    name = str(dtype).removeprefix("torch.")
    lay = spec.LAYOUTS[name]
    rng = np.random.default_rng(3)
    # a single exponent value
    one = torch.full((5000,), 0.75, dtype=dtype)
    one[::3] = -0.5 - 0.25 * torch.rand(len(one[::3]))
    ct, _ = check_same(bits_of(one), name, tile=256)
    assert len(ct.header.symbols) == 1
    # exponents spread wide: a raw level holds those no coded level covers
    lo, hi = (-24, 16) if lay.exp_bits == 5 else (-60, 60)
    wide = torch.from_numpy(np.ldexp(rng.uniform(1, 2, 20000), rng.integers(lo, hi, 20000))).to(dtype)
    ct, _ = check_same(bits_of(wide), name, tile=512)
    assert ct.header.has_raw or lay.exp_bits == 5
    # a long tail: most values in a few exponents, a few in many others
    tail = trained_like(40000, torch.float32, seed=5)
    tail[::97] *= torch.from_numpy(np.ldexp(1.0, rng.integers(-20, 20, len(tail[::97]))).astype(np.float32))
    ct, _ = check_same(bits_of(tail.to(dtype)), name, tile=2048)
    assert len(spec.level_widths(ct.header.widths, ct.header.has_raw, lay.exp_bits)) >= 3


def test_float32_specials():
    vals = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1.1754942e-38, 3.4028235e38,
                     -3.4028235e38, 1.0, -2.0], np.float32)
    bits = np.tile(vals.view(np.uint32), 300)
    bits[::7] = 0x7FC12345  # a NaN with a payload
    check_same(bits, "float32", tile=64)
    rng = np.random.default_rng(4)
    check_same(rng.integers(0, 2**32, 10000, dtype=np.uint64).astype(np.uint32), "float32", tile=1024)


def test_lossy_random_bf16_fp16():
    for keep in range(7):
        check_same(bits_of(trained_like(9000, torch.bfloat16, seed=keep)), "bfloat16", keep=keep, tile=1024)
    for keep in range(10):  # every k: 7 once took lossless bf16's byte path
        check_same(bits_of(trained_like(9000, torch.float16, seed=keep)), "float16", keep=keep, tile=1024)


# --- threads -------------------------------------------------------------------------------------

def test_threads_and_concurrent_callers():
    import numba

    t = trained_like(100_000, torch.bfloat16)
    bits = bits_of(t)
    lay = spec.LAYOUTS["bfloat16"]
    prev = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = cpu_backend.encode(bits, lay, 7, 1024)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = cpu_backend.encode(bits, lay, 7, 1024)
    finally:
        numba.set_num_threads(prev)
    for name in one[3]:
        assert np.array_equal(one[3][name], many[3][name])
    ct = as_ct("bfloat16", len(bits), 7, 1024, one)
    errors = []

    def work():
        out = poisoned(len(bits), lay)
        for _ in range(5):
            cpu_backend.decode_into(ct, out)
            if not np.array_equal(out, bits):
                errors.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


# --- tampered buffers ------------------------------------------------------------------------------

def _tampered(ct: CompressedTensor, section: str, rng) -> CompressedTensor:
    blob = ct.data.clone()
    off, nb = ct.header.sections[section][:2]
    for _ in range(int(rng.integers(1, 4))):
        pos = off + int(rng.integers(0, nb))
        blob[pos] ^= int(rng.integers(1, 256))
    return CompressedTensor(ct.header, blob, verified=True)  # skip the checksum: hit the kernel


def test_tampered_streams_raise_or_match_reference():
    rng = np.random.default_rng(7)
    tail = trained_like(6000, torch.float32, seed=9)
    tail[::37] *= 1e6
    for t, tile in ((trained_like(6000, torch.bfloat16, seed=8), 512), (tail.to(torch.bfloat16), 256)):
        ct = nzrt.compress(t, backend="numba", tile=tile)
        levels = [k for k in ct.header.sections if k.startswith("level")]
        lay = spec.LAYOUTS["bfloat16"]
        raised = 0
        for trial in range(120):
            section = ["offsets", *levels][trial % (len(levels) + 1)]
            bad = _tampered(ct, section, rng)
            out = poisoned(t.numel(), lay)
            try:
                cpu_backend.decode_into(bad, out)
            except FormatError:
                raised += 1
                continue
            # no error: then the reference must decode the same bits without error
            want = poisoned(t.numel(), lay)
            reference.decode_into(bad, want)
            assert np.array_equal(out, want), section
        assert raised > 0
        # through the public API the checksum catches any flipped byte
        blob = ct.data.clone()
        blob[ct.header.sections["level0"][0]] ^= 0xFF
        with pytest.raises(FormatError):
            nzrt.decode_into(CompressedTensor(ct.header, blob), torch.empty_like(t), backend="numba")


def test_decode_rejects_escapes_past_offsets_and_unnamed_codes():
    t = trained_like(4096, torch.bfloat16, seed=11)
    ct = nzrt.compress(t, backend="numba", tile=1024)
    sec = ct.np_sections()
    h = ct.header
    lay = spec.LAYOUTS["bfloat16"]
    # every level-0 code an escape: far more escapes than the offsets allow
    blob = ct.data.clone()
    off, nb = h.sections["level0"][:2]
    blob[off:off + nb - spec.STREAM_PAD] = 0xFF
    with pytest.raises(FormatError, match="escapes"):
        cpu_backend.decode_into(CompressedTensor(h, blob, verified=True), poisoned(t.numel(), lay))
    # a symbol table shorter than the codes in use
    fields = dict(dtype=h.dtype, shape=h.shape, mantissa_bits=h.mantissa_bits, tile=h.tile,
                  widths=h.widths, has_raw=h.has_raw, symbols=h.symbols[:1])
    short = CompressedTensor.from_sections(fields, {k: v for k, v in sec.items()})
    with pytest.raises(FormatError, match="names no symbol"):
        cpu_backend.decode_into(short, poisoned(t.numel(), lay))


# --- import stays cheap ---------------------------------------------------------------------------

def test_import_nzrt_does_not_load_numba():
    code = "import sys, nzrt, nzrt.kernels.spec; assert 'numba' not in sys.modules, 'numba imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_portable_paths_without_avx512(tmp_path):
    """The encode paths for CPUs without AVX-512 (compiled in a fresh cache) give the same bytes."""
    code = """
import zlib, numpy as np, torch
from nzrt.kernels import cpu as cpu_backend, reference, spec
assert not cpu_backend._HAS_VBMI2 and not cpu_backend._HAS_VPCLMUL
all16 = np.arange(65536, dtype=np.uint32).astype(np.uint16)
g = torch.Generator().manual_seed(0)
# lossy fp16 at every k (k = 7 once took lossless bf16's byte path) and lossy fp32
cases = [(all16, "bfloat16", 7), (all16, "float16", 10), (all16, "bfloat16", 3),
         *[(all16, "float16", k) for k in range(10)],
         ((torch.randn(5000, generator=g) * 0.02).view(torch.int32).numpy().view(np.uint32), "float32", 7),
         ((torch.randn(20000, generator=g) * 0.02).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), "bfloat16", 7),
         ((torch.randn(5000, generator=g) * 0.02).view(torch.int32).numpy().view(np.uint32), "float32", 23)]
for bits, dtype, keep in cases:
    lay = spec.LAYOUTS[dtype]
    ref = reference.encode(bits, lay, keep, 512)
    got = cpu_backend.encode(bits, lay, keep, 512)
    assert got[:2] == ref[:2] and np.array_equal(got[2], ref[2])
    for name in ref[3]:
        assert np.array_equal(got[3][name], ref[3][name]), (dtype, keep, name)
    blob = cpu_backend.encode_blob(bits, lay, keep, 512)[3]
    assert cpu_backend.crc32(blob) == zlib.crc32(blob)
"""
    env = dict(os.environ, NZRT_NUMBA_NO_AVX512="1", NUMBA_CACHE_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
