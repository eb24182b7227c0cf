"""The Triton backend under TRITON_INTERPRET=1 (no GPU): bit-identical to the numpy reference.

Everything is compared on integer bit patterns (np.array_equal / torch.equal), never allclose.
Outputs are poisoned with 0x5A5A before decoding so untouched elements show up.
"""
import os

_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module (and its @triton.jit) is imported

import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import nzrt  # noqa: E402
from nzrt.format import CompressedTensor  # noqa: E402
from nzrt.kernels import reference as ref  # noqa: E402
from nzrt.kernels import spec  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _triton_interpreted import _interpreted_triton  # noqa: E402

tg = _interpreted_triton()
from nzrt.kernels.triton import decode as tgd  # noqa: E402



@pytest.fixture(scope="module", autouse=True)
def _interpreter_only_in_this_module():
    """Interpreted kernels while this module runs (modules collected earlier may have removed
    them), and no interpreted kernel module (or flag) left behind for tests on a real GPU."""
    global tg, tgd
    tg = _interpreted_triton()
    tgd = sys.modules["nzrt.kernels.triton.decode"]
    yield
    if _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET
    for name in [m for m in sys.modules if m == "nzrt.kernels.triton" or m.startswith("nzrt.kernels.triton.")]:
        del sys.modules[name]  # the next import (a real GPU's) compiles afresh


BF16, FP16, FP32 = (spec.LAYOUTS[k] for k in ("bfloat16", "float16", "float32"))
POISON = 0x5A5A
INT = {2: torch.int16, 4: torch.int32}
SINT = {2: np.int16, 4: np.int32}


def _poisoned(n, layout):
    fill = POISON if layout.itemsize == 2 else 0x5A5A5A5A
    return torch.full((n,), fill, dtype=INT[layout.itemsize])


def _ct(layout, keep, tile, enc, n):
    widths, has_raw, symbols, sections = enc
    return CompressedTensor.from_sections(
        dict(dtype=layout.name, shape=(n,), mantissa_bits=keep, tile=tile, widths=tuple(widths),
             has_raw=has_raw, symbols=tuple(int(s) for s in symbols)), sections)


def _ref_decode(ct, layout):
    want = np.zeros(ct.numel(), layout.uint)
    ref.decode_into(ct, want)
    return want


def roundtrip(bits: np.ndarray, layout, keep, tile):
    """encode bytes == reference bytes; triton decode == reference decode; returns the ct."""
    bits = np.ascontiguousarray(bits, dtype=layout.uint)
    n = len(bits)
    want = ref.encode(bits, layout, keep, tile)
    got = tg.encode(torch.from_numpy(bits.view(SINT[layout.itemsize])), layout, keep, tile)
    assert got[0] == want[0] and got[1] == want[1]
    assert got[2].dtype == want[2].dtype and np.array_equal(got[2], want[2])
    assert list(got[3]) == list(want[3])  # same sections, same order -> same blob
    for name, arr in want[3].items():
        g = got[3][name]
        assert g.dtype == arr.dtype and g.shape == arr.shape, name
        assert np.array_equal(g, arr), f"section {name} differs"
    ct = _ct(layout, keep, tile, want, n)
    assert _ct(layout, keep, tile, got, n).header.crc32 == ct.header.crc32
    expect = _ref_decode(ct, layout)
    if keep == layout.man_bits:
        assert np.array_equal(expect, bits)  # the reference itself is lossless here
    out = _poisoned(n, layout)
    tg.decode_into(ct, out)
    assert np.array_equal(out.numpy().view(layout.uint), expect)
    return ct


ALL16 = np.arange(1 << 16, dtype=np.uint16)


@pytest.mark.parametrize("layout", [BF16, FP16], ids=["bf16", "fp16"])
def test_all_bit_patterns_lossless(layout):
    roundtrip(ALL16, layout, layout.man_bits, 65536)
    roundtrip(ALL16, layout, layout.man_bits, 8192)  # 8 programs


@pytest.mark.parametrize("keep", [0, 3])
def test_all_bf16_patterns_lossy(keep):
    ct = roundtrip(ALL16, BF16, keep, 65536)
    # NaNs come back with their payload; infinities stay infinities
    out = _poisoned(1 << 16, BF16)
    tg.decode_into(ct, out)
    got = out.numpy().view(np.uint16)
    mag = ALL16 & 0x7FFF
    assert np.array_equal(got[mag > 0x7F80], ALL16[mag > 0x7F80])
    assert np.array_equal(got[mag == 0x7F80], ALL16[mag == 0x7F80])


def test_fp16_lossy_all_patterns():
    roundtrip(ALL16, FP16, 4, 65536)


def _normal(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.02).to(dtype)


@pytest.mark.parametrize("dtype,layout", [(torch.bfloat16, BF16), (torch.float16, FP16),
                                          (torch.float32, FP32)], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("n", [0, 1, 1023, 1025, 3 * 1024 + 5])
def test_random_sizes(dtype, layout, n):
    x = _normal(n, dtype, seed=n)
    bits = x.view(INT[layout.itemsize]).numpy().view(layout.uint)
    roundtrip(bits, layout, layout.man_bits, 1024)


def test_big_tile_several_subblocks():
    # tile larger than one sub-block: the running escape counts carry across sub-blocks
    x = _normal(20000, torch.bfloat16, seed=3)
    bits = x.view(torch.int16).numpy().view(np.uint16)
    old = tg.DECODE_BLOCK
    try:
        tg.DECODE_BLOCK = 2048
        roundtrip(bits, BF16, 7, 8192)
    finally:
        tg.DECODE_BLOCK = old


def test_raw_level_after_coded_levels():
    x = _normal(50000, torch.bfloat16, seed=1)
    bits = x.view(torch.int16).numpy().view(np.uint16).copy()
    rng = np.random.default_rng(1)
    pos = rng.choice(len(bits), 3000, replace=False)
    bits[pos] = (rng.integers(0, 256, 3000) << 7 | rng.integers(0, 128, 3000)).astype(np.uint16)
    ct = roundtrip(bits, BF16, 7, 8192)
    assert ct.header.has_raw and len(ct.header.widths) >= 1


@pytest.mark.parametrize("keep", [0, 3])
def test_lossy_random_with_nan_inf(keep):
    x = _normal(5000, torch.bfloat16, seed=keep)
    bits = x.view(torch.int16).numpy().view(np.uint16).copy()
    specials = np.array([0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0x7F7F, 0xFF7F, 0x0000, 0x8000,
                         0x0001, 0x807F], np.uint16)
    bits[::450][:len(specials)] = specials
    ct = roundtrip(bits, BF16, keep, 2048)
    assert ct.header.sections["patch_idx"][1] == 8 * 3  # three NaNs


def test_fp32_lossy():
    x = _normal(3000, torch.float32, seed=5)
    bits = x.view(torch.int32).numpy().view(np.uint32).copy()
    bits[:4] = [0x7F800000, 0xFFC00001, 0x7F7FFFFF, 0x80000001]
    roundtrip(bits, FP32, 5, 1024)


def test_codec_backend_triton():
    x = _normal(5000, torch.bfloat16, seed=9).reshape(50, 100)
    a = nzrt.compress(x, backend="triton", tile=1024)
    b = nzrt.compress(x, backend="reference", tile=1024)
    assert a.header == b.header and torch.equal(a.data, b.data)
    out = torch.full_like(x, float("nan"))
    nzrt.decode_into(a, out, backend="triton")
    assert torch.equal(out.view(torch.int16), x.view(torch.int16))
    assert torch.equal(nzrt.decompress(a, backend="triton").view(torch.int16), x.view(torch.int16))


def test_decode_many_one_launch_per_signature(monkeypatch):
    tile = 1024
    xs = [_normal(n, torch.bfloat16, seed=n) for n in (3000, 1024, 4100, 777)]
    cts = [nzrt.compress(x, backend="reference", tile=tile) for x in xs]
    # a tensor of another signature (fp16) and a lossy one with NaN patches
    y = _normal(2000, torch.float16, seed=11)
    z = _normal(2500, torch.bfloat16, seed=12)
    z[7] = float("nan")
    z[100] = float("inf")
    cts += [nzrt.compress(y, backend="reference", tile=tile),
            nzrt.compress(z, mantissa_bits=3, backend="reference", tile=tile),
            nzrt.compress(torch.zeros(0, dtype=torch.bfloat16), backend="reference", tile=tile)]
    xs += [y, z, torch.zeros(0, dtype=torch.bfloat16)]
    sigs = {tuple(sorted(tgd._signature(c.header).items())) for c in cts if c.numel()}

    launches = []
    real = tgd._decode_many_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(tgd, "_decode_many_kernel", Spy())
    for attempt in range(2):  # the second call hits the descriptor cache
        launches.clear()
        outs = [_poisoned(c.numel(), c.header.layout) for c in cts] if attempt == 0 else outs
        for o in outs:
            o.fill_(POISON)
        tg.decode_many(cts, outs)
        assert len(launches) == len(sigs)
        for c, o in zip(cts, outs):
            assert np.array_equal(o.numpy().view(c.header.layout.uint), _ref_decode(c, c.header.layout))
    assert len(sigs) < sum(1 for c in cts if c.numel())  # some tensors shared a launch


def test_decode_many_float_outputs_and_views():
    """Outputs may be dense float tensors, and views into one shared buffer."""
    tile = 1024
    xs = [_normal(n, torch.bfloat16, seed=20 + n) for n in (1500, 2048, 9)]
    cts = [nzrt.compress(x, backend="triton", tile=tile) for x in xs]
    buf = torch.full((sum(x.numel() for x in xs) + 8,), float("nan"), dtype=torch.bfloat16)
    outs, pos = [], 8
    for x in xs:
        outs.append(buf[pos:pos + x.numel()])
        pos += x.numel()
    tg.decode_many(cts, outs)
    for x, o in zip(xs, outs):
        assert torch.equal(o.view(torch.int16), x.view(torch.int16))
    assert torch.isnan(buf[:8]).all()  # nothing outside the outputs is written


def test_no_triton_at_nzrt_import():
    import subprocess
    code = ("import sys, nzrt, nzrt.codec, nzrt.format; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert 'nzrt.kernels.triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def _with_exponents(exps: np.ndarray, seed: int) -> np.ndarray:
    """bf16 patterns with the given exponents and random sign/mantissa."""
    rng = np.random.default_rng(seed)
    sm = rng.integers(0, 256, len(exps))
    return (((sm >> 7) << 15) | (np.clip(exps, 0, 255) << 7) | (sm & 127)).astype(np.uint16)


@pytest.mark.parametrize("name", ["dominant", "u12", "u20", "u40", "geo", "geo2"])
def test_level_widths_1_to_5(name):
    """Cascades whose levels are 1, 2, 3, 4 and 5 bits wide (every read path of _read_bits)."""
    rng = np.random.default_rng(len(name))
    exps = {"dominant": np.r_[np.full(8000, 120), rng.integers(100, 140, 2000)],
            "u12": rng.integers(100, 112, 10000), "u20": rng.integers(100, 120, 10000),
            "u40": rng.integers(100, 140, 10000), "geo": 127 - rng.geometric(0.35, 10000),
            "geo2": 127 - rng.geometric(0.15, 10000)}[name]
    exps = rng.permutation(exps)
    roundtrip(_with_exponents(exps, 1), BF16, 7, 4096)


@pytest.mark.parametrize("layout,keep", [(BF16, 1), (FP16, 0), (FP16, 5), (FP32, 0), (FP32, 3),
                                         (FP32, 7), (FP32, 15)],
                         ids=["bf16k1", "fp16k0", "fp16k5", "fp32k0", "fp32k3", "fp32k7", "fp32k15"])
def test_sm_widths(layout, keep):
    """sm streams of 1, 2, 4, 6, 8, 16 bits (fixed-position word, byte and unaligned paths)."""
    x = _normal(3000, {2: torch.bfloat16 if layout is BF16 else torch.float16, 4: torch.float32}[layout.itemsize],
                seed=keep)
    bits = x.view(INT[layout.itemsize]).numpy().view(layout.uint)
    roundtrip(bits, layout, keep, 1024)


def test_unaligned_blob_is_refused():
    ct = nzrt.compress(_normal(100, torch.bfloat16), backend="reference", tile=1024)
    buf = torch.zeros(ct.data.numel() + 16, dtype=torch.uint8)
    buf[1:1 + ct.data.numel()] = ct.data
    moved = CompressedTensor(ct.header, buf[1:1 + ct.data.numel()])
    with pytest.raises(ValueError, match="16-byte aligned"):
        tg.decode_into(moved, torch.zeros(100, dtype=torch.int16))


@pytest.mark.parametrize("tile,block", [(1000, None), (1288, 512), (24, 16)])
def test_tiles_not_a_power_of_two(tile, block):
    """Tiles that are multiples of 8 but not of the sub-block: full sub-blocks + a masked tail."""
    x = _normal(5 * tile + 13, torch.bfloat16, seed=tile)
    bits = x.view(torch.int16).numpy().view(np.uint16)
    old = tg.DECODE_BLOCK
    try:
        if block:
            tg.DECODE_BLOCK = block
        roundtrip(bits, BF16, 7, tile)
        roundtrip(bits, BF16, 2, tile)
    finally:
        tg.DECODE_BLOCK = old


@pytest.mark.parametrize("widths", [(), (3,), (4,), (2, 2, 5), (1, 1, 1, 1)])
def test_forced_cascades_decode_exactly(widths):
    """encode(widths=...) (the bench's bits/speed trade-off): a valid stream, lossless."""
    x = _normal(6000, torch.bfloat16, seed=len(widths))
    bits = x.view(torch.int16).numpy().view(np.uint16)
    w, has_raw, symbols, sections = tg.encode(torch.from_numpy(bits.view(np.int16)), BF16, 7, 2048,
                                              widths=widths)
    assert w == widths
    ct = _ct(BF16, 7, 2048, (w, has_raw, symbols, sections), len(bits))
    assert np.array_equal(_ref_decode(ct, BF16), bits)
    out = _poisoned(len(bits), BF16)
    tg.decode_into(ct, out)
    assert np.array_equal(out.numpy().view(np.uint16), bits)
