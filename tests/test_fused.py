"""The numba fused decode-matmul (``cpu_backend.linear``) is bit-identical to ``fused_reference.linear``,
independent of the thread count, and within the stated error bound of an fp64 result.

Integers are compared (bit patterns), never floats. Output buffers are poisoned before the kernel
writes them, so a row it skipped cannot pass.
"""
from __future__ import annotations

import math

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nzrt
from nzrt.kernels import fused_reference, spec
from nzrt.kernels import cpu as cpu_backend
from nzrt.kernels.cpu import fused as cpu_fused

INT = {2: torch.int16, 4: torch.int32}
POISON = {2: 0x5A5A, 4: 0x5A5A5A5A}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}  # roundoff
TINY = {torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24, torch.float32: 2.0 ** -149}  # least subnormal


def ints(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT[t.element_size()])


def fused(ct, x, bias=None) -> torch.Tensor:
    out = torch.empty((x.shape[0], ct.shape[0]), dtype=x.dtype)
    ints(out).fill_(POISON[out.element_size()])
    y = cpu_backend.linear(ct, x, bias, out=out)
    assert y is out
    return out


def check(ct, x, bias=None, decode=None) -> torch.Tensor:
    ref = fused_reference.linear(ct, x, bias, decode=decode)
    got = fused(ct, x, bias)
    assert ref.dtype == got.dtype == x.dtype and ref.shape == got.shape
    diff = (ints(ref) != ints(got)).nonzero()
    assert len(diff) == 0, f"{len(diff)} outputs differ, first at {diff[0].tolist()}"
    return got


def weights(N, K, dtype, gen, scale=0.05) -> torch.Tensor:
    return (torch.randn(N, K, generator=gen) * scale).to(dtype)


def special(w: torch.Tensor, gen, frac=0.02) -> torch.Tensor:
    """Some weights replaced by NaNs (payloads, signs), infs, subnormals, zeros of both signs,
    the largest finite value."""
    lay = spec.LAYOUTS[str(w.dtype).removeprefix("torch.")]
    tb, mb = lay.total_bits, lay.man_bits
    sign = 1 << (tb - 1)
    inf = lay.inf_bits
    vals = [inf | 1, inf | (1 << (mb - 1)), sign | inf | 3, inf, sign | inf, 1, sign | 5,
            (1 << mb) - 1, 0, sign, inf - 1, sign | (inf - 1)]
    vals = [v - (1 << tb) if v >= 1 << (tb - 1) else v for v in vals]  # as signed ints
    b = ints(w.clone()).reshape(-1)
    pos = torch.randperm(b.numel(), generator=gen)[: max(1, int(frac * b.numel()))]
    pick = torch.randint(len(vals), (len(pos),), generator=gen)
    b[pos] = torch.tensor(vals, dtype=b.dtype)[pick]
    return b.view(w.dtype).reshape(w.shape)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# --- bit identity on small and odd shapes -----------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K,tile", [(1, 1, 8), (1, 17, 8), (3, 5, 8), (7, 33, 24), (13, 100, 64),
                                      (5, 301, 8192), (2, 8197, 1024), (33, 48, 16)])
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_matches_reference(dtype, N, K, tile, rows, gen):
    w = weights(N, K, dtype, gen)
    ct = nzrt.compress(w, tile=tile)
    x = torch.randn(rows, K, generator=gen).to(dtype)
    check(ct, x)
    check(ct, x, torch.randn(N, generator=gen).to(dtype))
    # float32 x: a float32 output, where no final rounding to bf16/fp16 can hide a wrong order
    check(ct, torch.randn(rows, K, generator=gen), torch.randn(N, generator=gen).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_special_weights_and_inputs(dtype, rows, gen):
    N, K = 29, 77
    w = special(weights(N, K, dtype, gen), gen, frac=0.05)
    ct = nzrt.compress(w, tile=40)
    x = torch.randn(rows, K, generator=gen).to(dtype)
    y = check(ct, x)
    assert y.isnan().any() and (~y.isnan()).any()
    x = special(x, gen, frac=0.05)
    check(ct, x, torch.randn(N, generator=gen).to(dtype))
    # rows of weights that are all zeros of either sign: the lanes start at -0.0
    wz = torch.zeros(N, K, dtype=dtype)
    wz[::2] = -0.0
    check(nzrt.compress(wz, tile=64), torch.randn(rows, K, generator=gen).abs().to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_weights_and_overflow(dtype, gen):
    N, K = 11, 70
    tiny = TINY[dtype]
    w = (torch.randint(-40, 40, (N, K), generator=gen).double() * tiny).to(dtype)  # all subnormal
    assert (w != 0).any()
    x = torch.randn(3, K, generator=gen).to(dtype)
    check(nzrt.compress(w, tile=64), x)
    big = torch.full((N, K), torch.finfo(dtype).max / 4, dtype=dtype)  # the sum overflows to inf
    check(nzrt.compress(big, tile=64), torch.ones(2, K, dtype=dtype) * 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_input(dtype, gen):
    w = special(weights(40, 129, dtype, gen), gen)
    ct = nzrt.compress(w, tile=256)
    x = torch.randn(5, 129, generator=gen)
    y = check(ct, x, torch.randn(40, generator=gen).to(dtype))
    assert y.dtype == torch.float32


@pytest.mark.parametrize("dtype,keep", [(torch.bfloat16, 3), (torch.bfloat16, 0), (torch.float16, 4),
                                        (torch.float32, 10)])
def test_lossy_weights(dtype, keep, gen):
    w = special(weights(37, 203, dtype, gen), gen, frac=0.01)
    ct = nzrt.compress(w, mantissa_bits=keep, tile=512)
    assert len(ct.np_sections()["patch_idx"]) > 0  # lossy: NaNs go through the patches
    x = torch.randn(4, 203, generator=gen).to(dtype)
    check(ct, x)
    check(ct, x, torch.randn(37, generator=gen).to(dtype))


def test_output_rounding_matches_reference(gen):
    """The kernel's float32 -> output rounding on its own, over edge values and random bits."""
    edges = [0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, 2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.0001,
             3 * 2.0 ** -26, 2.0 ** -14, 2.0 ** -14 * (1 - 2 ** -11), 1.5 * 2 ** -24, 2.5 * 2 ** -24,
             3.4e38, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-40, 1 + 2 ** -8, 1 + 3 * 2 ** -9]
    z = np.array(edges + [-e for e in edges], np.float32)
    rnd = np.random.default_rng(5).integers(0, 2 ** 32, 200000, dtype=np.uint64).astype(np.uint32)
    z = np.concatenate([z, rnd.view(np.float32)])
    for name, okind in cpu_fused._KIND.items():
        want = fused_reference.round_out(z, name)
        got = np.zeros(len(z), np.int64)
        cpu_fused.round_bits_array(z, okind, got)
        assert np.array_equal(got.astype(want.dtype), want), name
    want = fused_reference.round_out(z, "float16")  # and the fp16 one is IEEE's (numpy's)
    ok = ~np.isnan(z)
    assert np.array_equal(want[ok], z[ok].astype(np.float16).view(np.uint16))


def test_argument_checks(gen):
    ct = nzrt.compress(weights(4, 8, torch.bfloat16, gen))
    with pytest.raises(ValueError):
        cpu_backend.linear(ct, torch.randn(2, 9).bfloat16())
    with pytest.raises(ValueError):
        cpu_backend.linear(ct, torch.randn(2, 8).half())
    with pytest.raises(ValueError):
        cpu_backend.linear(ct, torch.randn(2, 8).bfloat16(), torch.randn(5).bfloat16())
    with pytest.raises(ValueError):
        cpu_backend.linear(ct, torch.randn(2, 8).bfloat16(), out=torch.empty(2, 4))
    with pytest.raises(ValueError):
        cpu_backend.linear(nzrt.compress(torch.randn(8).bfloat16()), torch.randn(2, 8).bfloat16())


# --- thread count ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_thread_count_independent(dtype, gen, monkeypatch):
    N, K, tile = 301, 250, 1024
    monkeypatch.setattr(cpu_fused, "PARALLEL_MIN_WEIGHTS", 1)  # this small weight goes parallel too
    assert len(cpu_fused.chunk_bounds(N, K, tile, 2)) > 2  # the parallel path runs with 2 threads
    ct = nzrt.compress(special(weights(N, K, dtype, gen), gen, 0.001), tile=tile)
    b = torch.randn(N, generator=gen).to(dtype)
    for x in (torch.randn(16, K, generator=gen).to(dtype), torch.randn(3, K, generator=gen)):
        before = numba.get_num_threads()
        try:
            numba.set_num_threads(1)
            one = fused(ct, x, b)
            numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
            two = fused(ct, x, b)
        finally:
            numba.set_num_threads(before)
        assert torch.equal(ints(one), ints(two))
        assert torch.equal(ints(one), ints(fused_reference.linear(ct, x, b)))


# --- real sizes, and the error against an fp64 result -------------------------------------------

def bound(x: torch.Tensor, w: torch.Tensor, b, y64: torch.Tensor, out_dtype) -> torch.Tensor:
    """The stated bound (fused_reference's docstring) on |y - y64|, elementwise."""
    K = x.shape[1]
    m = math.ceil(K / fused_reference.LANES) + 7 + (x.dtype == torch.float32 and w.dtype == torch.float32)
    u = 2.0 ** -24
    gamma = m * u / (1 - m * u) + K * 2.0 ** -53  # + the fp64 result's own error
    S = x.double().abs() @ w.double().abs().T
    if b is not None:
        S = S + b.double().abs()
    acc_err = gamma * S + (K + 5) * 2.0 ** -149  # absolute term: float32 subnormal roundings
    return acc_err + UNIT[out_dtype] * (y64.abs() + acc_err) + TINY[out_dtype] / 2


@pytest.mark.parametrize("N,K", [(2048, 1024), (49152, 576)])
@pytest.mark.parametrize("rows", [1, 16])
def test_real_size_bits_and_error_bound(N, K, rows, gen):
    w = weights(N, K, torch.bfloat16, gen, scale=0.02)
    ct = nzrt.compress(w)
    x = torch.randn(rows, K, generator=gen).bfloat16()
    b = (torch.randn(N, generator=gen) * 0.1).bfloat16()
    y = check(ct, x, b, decode=cpu_backend.decode_into)
    check(ct, x.float(), b, decode=cpu_backend.decode_into)  # float32 out: the sums' bits show
    y64 = F.linear(x.double(), w.double(), b.double())
    err = (y.double() - y64).abs()
    assert (err <= bound(x, w, b, y64, torch.bfloat16)).all()
    # torch's own bf16 result: both round once to bf16, so the errors are of the same size
    terr = (F.linear(x, w, b).double() - y64).abs()
    assert err.mean() <= 1.05 * terr.mean()
    assert err.max() <= 1.5 * terr.max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_error_bound_other_dtypes(dtype, gen):
    N, K = 300, 1000
    w = weights(N, K, dtype, gen, scale=0.02)
    ct = nzrt.compress(w, tile=4096)
    for x in (torch.randn(4, K, generator=gen).to(dtype), torch.randn(4, K, generator=gen)):
        y = check(ct, x)
        y64 = F.linear(x.double(), w.double())
        err = (y.double() - y64).abs()
        assert (err <= bound(x, w, None, y64, x.dtype)).all()
        if x.dtype == torch.float32:  # no output rounding to hide behind: compare the sums
            terr = (F.linear(x, w.float()).double() - y64).abs()
            assert err.mean() <= 2 * terr.mean()


# --- rows: an embedding lookup from the compressed weight ---------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("N,K,tile", [(1000, 77, 1024), (64, 3000, 1024), (300, 64, 8192), (1, 1, 8)])
def test_rows_match_the_decoded_weight(dtype, N, K, tile, gen):
    w = special(weights(N, K, dtype, gen), gen, 0.01)  # NaN payloads (patched values) among them
    ct = nzrt.compress(w, tile=tile)
    fw = cpu_fused.FusedWeight(ct)
    ids = torch.randint(0, N, (3, 5), generator=gen)
    ids[0, 0], ids[-1, -1] = 0, N - 1  # the first and last rows (tile edges)
    got = fw.rows(ids)
    assert got.shape == (3, 5, K) and got.dtype == dtype
    assert torch.equal(ints(got), ints(w[ids]))
    assert fw.rows(torch.zeros(0, dtype=torch.long)).shape == (0, K)
    for bad in (torch.tensor([N]), torch.tensor([-1])):
        with pytest.raises(IndexError):
            fw.rows(bad)
    with pytest.raises(TypeError):
        fw.rows(torch.zeros(2))


def test_fused_weight_reused_matches_one_shot(gen):
    """The prepared object the runtime keeps gives the one-shot function's bits, call after call,
    for row counts that change between calls (its scratch is per call)."""
    w = weights(700, 1100, torch.bfloat16, gen)
    ct = nzrt.compress(w)
    fw = cpu_fused.FusedWeight(ct)
    b = torch.randn(700, generator=gen).bfloat16()
    for rows in (1, 16, 3, 1):
        x = torch.randn(rows, 1100, generator=gen).bfloat16()
        assert torch.equal(ints(fw.linear(x, b)), ints(fused_reference.linear(ct, x, b)))
