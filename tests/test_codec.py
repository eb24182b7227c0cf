"""The codec through its public face: lossless round trips, lossy bounds, bad input."""
import importlib.util
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nzrt
from nzrt.kernels import spec

BACKENDS = ["reference"] + (["numba"] if importlib.util.find_spec("nzrt.kernels.cpu") else [])
INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
POISON = 0x5A5A


def bits(t):
    return t.contiguous().view(INT[t.dtype])


def roundtrip(x, backend, **kw):
    ct = nzrt.compress(x, backend=backend, **kw)
    out = torch.empty(x.shape, dtype=x.dtype)
    bits(out).fill_(POISON)
    nzrt.decode_into(ct, out, backend=backend)
    return ct, out


def all_patterns(dtype):
    return torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_16bit_pattern_roundtrips(backend, dtype):
    x = all_patterns(dtype)
    _, y = roundtrip(x, backend)
    assert torch.equal(bits(x), bits(y))
    # shuffled, so tiles see mixed exponents, and with a small tile
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))]
    _, y = roundtrip(x, backend, tile=1024)
    assert torch.equal(bits(x), bits(y))


FP32_SPECIALS = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45, 1.17e-38,
                 3.4028235e38, -3.4028235e38, 1.0, -2.5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_specials_and_nan_payloads(backend):
    x = torch.tensor(FP32_SPECIALS, dtype=torch.float32)
    payloads = torch.tensor([0x7FC00001, 0x7F800001, -0x00000001, 0x7FFFFFFF, -0x7FFFFF], dtype=torch.int32)
    x = torch.cat([x, payloads.view(torch.float32), torch.randn(5000) * 0.02])
    _, y = roundtrip(x, backend)
    assert torch.equal(bits(x), bits(y))


TILE = 256


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("n", [0, 1, TILE - 1, TILE, TILE + 1, 5 * TILE + 3], ids=lambda n: f"n{n}")
def test_odd_sizes(backend, dtype, n):
    x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.02).to(dtype)
    ct, y = roundtrip(x, backend, tile=TILE)
    assert torch.equal(bits(x), bits(y))
    assert ct.numel() == n and ct.shape == x.shape and ct.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_shaped_inputs(backend):
    base = (torch.randn(64, 48) * 0.05).to(torch.bfloat16)
    for x in (base.t(), base[:, ::3], base[::2, 5:7], base.reshape(4, 16, 48).permute(2, 0, 1)):
        ct = nzrt.compress(x, backend=backend)
        y = nzrt.decompress(ct, backend=backend)
        assert y.shape == x.shape
        assert torch.equal(bits(x.contiguous()), bits(y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_exponent_value(backend):
    x = torch.full((3000,), 1.0, dtype=torch.bfloat16) + torch.arange(3000).remainder(128).to(torch.bfloat16) / 128
    assert len(torch.unique((bits(x).to(torch.int32) >> 7) & 0xFF)) == 1
    ct, y = roundtrip(x, backend)
    assert torch.equal(bits(x), bits(y))
    assert ct.header.widths == (1,) and not ct.header.has_raw


@pytest.mark.parametrize("backend", BACKENDS)
def test_exponents_no_coded_level_covers(backend):
    # a skewed head (so coded levels are worth having) and a long tail of rare exponents
    g = torch.Generator().manual_seed(1)
    head = (torch.randn(20000, generator=g) * 0.02).to(torch.bfloat16)
    tail = torch.tensor([2.0 ** e for e in range(-120, 120, 3)], dtype=torch.bfloat16)
    x = torch.cat([head, tail])[torch.randperm(20000 + len(tail), generator=g)]
    ct, y = roundtrip(x, backend, tile=1024)
    assert ct.header.has_raw and ct.header.widths
    assert torch.equal(bits(x), bits(y))


def test_trained_like_weights_compress_below_11_bits():
    x = (torch.randn(200_000, generator=torch.Generator().manual_seed(2)) * 0.02).to(torch.bfloat16)
    ct = nzrt.compress(x)
    e = ((bits(x).to(torch.int32) >> 7) & 0xFF).numpy()
    p = np.bincount(e, minlength=256) / e.size
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
    assert ct.bits_per_weight <= 8 + entropy + 0.15
    assert ct.nbytes == ct.data.numel() + len(ct.header.to_json())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", range(0, 7))
def test_lossy_bf16_bounds_on_every_pattern(backend, k):
    x = all_patterns(torch.bfloat16)
    ct, y = roundtrip(x, backend, mantissa_bits=k)
    assert ct.header.mantissa_bits == k and not ct.header.lossless
    xf, yf = x.double(), y.double()
    xb, yb = bits(x), bits(y)
    nan = torch.isnan(xf)
    assert torch.equal(xb[nan], yb[nan])  # NaN stays NaN, payload and all
    inf = torch.isinf(xf)
    assert torch.equal(xb[inf], yb[inf])
    finite = ~nan & ~inf
    assert torch.isfinite(yf[finite]).all()  # never rounds to inf
    assert torch.equal(torch.signbit(xf[finite]), torch.signbit(yf[finite]))
    tiny = 2.0 ** -126  # smallest normal bf16: below it the bound is absolute
    err = (yf[finite] - xf[finite]).abs()
    bound = 2.0 ** -(k + 1) * torch.maximum(xf[finite].abs(), torch.tensor(tiny, dtype=torch.float64))
    assert (err <= bound).all()
    # exactly k mantissa bits survive
    assert ((yb[finite].to(torch.int32) & ((1 << (7 - k)) - 1)) == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lossy_rounds_to_nearest_even(backend):
    # 1 + 1/16 with k=3 lies halfway between 1 and 1 + 1/8: ties go to the even mantissa
    x = torch.tensor([1 + 1 / 16, 1 + 3 / 16, 1 + 1 / 16 + 1 / 128, 1.9921875], dtype=torch.bfloat16)
    _, y = roundtrip(x, backend, mantissa_bits=3)
    assert y.float().tolist() == [1.0, 1.25, 1.125, 2.0]  # last one carries into the exponent


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,k", [(torch.float16, 4), (torch.float32, 10)], ids=["fp16-k4", "fp32-k10"])
def test_lossy_other_dtypes_bound(backend, dtype, k):
    x = (torch.randn(5000, generator=torch.Generator().manual_seed(3)) * 0.1).to(dtype)
    _, y = roundtrip(x, backend, mantissa_bits=k)
    tiny = torch.finfo(dtype).tiny
    err = (y.double() - x.double()).abs()
    assert (err <= 2.0 ** -(k + 1) * x.double().abs().clamp_min(tiny)).all()


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(0, 40), min_size=0, max_size=3),
       scale=st.sampled_from([1e-30, 1e-3, 0.02, 1.0, 1e4, 1e30]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       seed=st.integers(0, 2 ** 31 - 1), tile=st.sampled_from([8, 64, 8192]))
def test_hypothesis_random_shapes_and_scales(shape, scale, dtype, seed, tile):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    for backend in BACKENDS:
        ct = nzrt.compress(x, backend=backend, tile=tile)
        y = nzrt.decompress(ct, backend=backend)
        assert y.shape == x.shape and torch.equal(bits(x), bits(y))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, torch.complex64, torch.float64])
def test_unsupported_dtypes_get_a_clear_type_error(dtype):
    with pytest.raises(TypeError, match="bfloat16, float16 and float32"):
        nzrt.compress(torch.zeros(4, dtype=dtype))


def test_bad_arguments():
    x = torch.zeros(8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="mantissa_bits"):
        nzrt.compress(x, mantissa_bits=8)
    with pytest.raises(ValueError, match="unknown backend"):
        nzrt.compress(x, backend="cuda-magic")
    with pytest.raises(TypeError):
        nzrt.compress([1.0, 2.0])
    ct = nzrt.compress(x)
    with pytest.raises(ValueError, match="contiguous"):
        nzrt.decode_into(ct, torch.empty(9, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        nzrt.decode_into(ct, torch.empty(8, dtype=torch.float16))


def test_backend_from_environment(monkeypatch):
    from nzrt import codec
    monkeypatch.setenv("NZRT_BACKEND", "reference")
    assert codec.resolve_backend(None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("NZRT_BACKEND", "nope")
    with pytest.raises(ValueError, match="NZRT_BACKEND"):
        codec.resolve_backend(None, torch.device("cpu"))


def test_compressed_tensor_face():
    x = (torch.randn(300, 70) * 0.02).to(torch.bfloat16)
    ct = nzrt.compress(x)
    assert ct.shape == x.shape and ct.numel() == x.numel() and ct.dtype == torch.bfloat16
    assert math.isclose(ct.bits_per_weight, 8 * ct.nbytes / x.numel())
    assert ct.to("cpu").header is ct.header
    assert "bits/weight" in repr(ct)
    # empty tensors are fine too
    e = nzrt.compress(torch.empty(0, 5, dtype=torch.float16))
    assert nzrt.decompress(e).shape == (0, 5)


# --- tampering ----------------------------------------------------------------------------

def _rebuilt(ct, data=None, **header_changes):
    import dataclasses
    if "crc32" in header_changes:  # an attacker who recomputes the blob CRC recomputes the header's too
        header_changes.setdefault("header_crc32", None)
    h = dataclasses.replace(ct.header, **header_changes)
    return nzrt.CompressedTensor(h, ct.data.clone() if data is None else data)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flipped_byte_is_caught_by_checksum(backend):
    x = (torch.randn(20000) * 0.02).to(torch.bfloat16)
    ct = nzrt.compress(x, tile=1024)
    for section in ("sm", "level0", "level1", "offsets"):
        off, nb = ct.header.sections[section][:2]
        bad = _rebuilt(ct)
        bad.data[off + nb // 2] ^= 0x40
        with pytest.raises(nzrt.FormatError, match="checksum"):
            nzrt.decompress(bad, backend=backend)


def test_truncated_buffer_is_caught_by_bounds():
    ct = nzrt.compress((torch.randn(5000) * 0.02).to(torch.bfloat16))
    with pytest.raises(nzrt.FormatError, match="outside|truncated"):
        nzrt.CompressedTensor(ct.header, ct.data[:-100].clone())


@pytest.mark.parametrize("backend", BACKENDS)
def test_tampered_offsets_with_matching_checksum_never_read_out_of_bounds(backend):
    """An adversary who also fixes the CRC: offsets are still validated before decoding."""
    import zlib
    x = (torch.randn(20000) * 0.02).to(torch.bfloat16)
    ct = nzrt.compress(x, tile=1024)
    off = ct.header.sections["offsets"][0]
    for pos, value in ((off + 4, 0xFF), (off + 4 * ct.header.sections["offsets"][3] * 5, 0x7F)):
        data = ct.data.clone()
        data[pos] = value
        bad = _rebuilt(ct, data=data, crc32=zlib.crc32(data.numpy()))
        with pytest.raises(nzrt.FormatError):
            nzrt.decompress(bad, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tampered_codes_with_matching_checksum_raise_or_decode(backend):
    """Random code bytes: either a FormatError or some output, never a crash."""
    import zlib
    x = (torch.randn(20000) * 0.02).to(torch.bfloat16)
    ct = nzrt.compress(x, tile=1024)
    off, nb = ct.header.sections["level0"][:2]
    rng = np.random.default_rng(0)
    for _ in range(5):
        data = ct.data.clone()
        data[off:off + nb - spec.STREAM_PAD] = torch.from_numpy(rng.integers(0, 256, nb - spec.STREAM_PAD, dtype=np.uint8))
        bad = _rebuilt(ct, data=data, crc32=zlib.crc32(data.numpy()))
        try:
            y = nzrt.decompress(bad, backend=backend)
            assert y.shape == x.shape
        except nzrt.FormatError:
            pass


def test_bad_headers():
    ct = nzrt.compress((torch.randn(100) * 0.02).to(torch.bfloat16))
    import json
    d = json.loads(ct.header.to_json())
    from nzrt.format import Header
    for change in ({"version": 99}, {"dtype": "int8"}, {"tile": 7}, {"widths": [9]},
                   {"mantissa_bits": 12}, {"shape": [-1]}, {"symbols": [300]}):
        with pytest.raises(nzrt.FormatError):
            Header.from_dict({**d, **change})
    with pytest.raises(nzrt.FormatError, match="malformed"):
        Header.from_dict({k: v for k, v in d.items() if k != "shape"})
