"""The numba decoder's path for the 4-bit window code (``kernels/cpu/decode_w4.py``) against the
readable reference decoder: every bf16 bit pattern, odd sizes and tiles, poisoned outputs, and
corrupted streams that must raise, never write out of bounds."""
import numpy as np
import pytest
import torch

from nzrt import codec
from nzrt.format import CompressedTensor
from nzrt.kernels import reference, spec
from nzrt.kernels.cpu import decode_w4
from nzrt.kernels.spec import FormatError

W4 = codec.WINDOW4


def _ref_bits(ct) -> np.ndarray:
    out = np.zeros(ct.numel(), np.uint16)
    reference.decode_into(ct, out)
    return out


def _fast_bits(ct) -> np.ndarray:
    out = np.full(ct.numel(), 0xFFC1, np.uint16)  # poison: a NaN payload no input has
    codec.decode_into(ct, torch.from_numpy(out.view(np.int16)).view(torch.bfloat16), backend="numba")
    return out


def test_every_bf16_pattern_in_every_order():
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for perm in (torch.arange(65536), torch.randperm(65536, generator=torch.Generator().manual_seed(0))):
        ct = codec.compress(every[perm].contiguous(), widths=W4)
        assert decode_w4.applies(ct.header) and ct.header.has_raw
        assert np.array_equal(_fast_bits(ct), every[perm].view(torch.int16).numpy().view(np.uint16))
        assert np.array_equal(_fast_bits(ct), _ref_bits(ct))


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 1001, 70001])
@pytest.mark.parametrize("tile", [8, 1024, 8192])
def test_odd_sizes_and_tiles_match_the_reference(n, tile):
    g = torch.Generator().manual_seed(n + tile)
    w = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    w[:: 97] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, 3e38],
                            dtype=torch.bfloat16).repeat(n // 97 // 7 + 1)[: len(w[:: 97])]
    ct = codec.compress(w, tile=tile, widths=W4)
    assert np.array_equal(_fast_bits(ct), w.view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(_fast_bits(ct), _ref_bits(ct))


def test_only_lossless_bf16_in_the_window_code_takes_the_path():
    x = (torch.randn(4096) * 0.02).to(torch.bfloat16)
    assert decode_w4.applies(codec.compress(x, widths=W4).header)
    assert not decode_w4.applies(codec.compress(x).header)
    assert not decode_w4.applies(codec.compress(x, widths=W4, mantissa_bits=3).header)
    assert not decode_w4.applies(codec.compress(x.to(torch.float16), widths=W4).header)


def _corrupted(ct, edit) -> CompressedTensor:
    data = ct.data.clone()
    c2 = CompressedTensor(ct.header, data, verified=True)
    edit(c2.np_sections())
    return c2


def test_a_code_that_names_no_symbol_raises():
    few = (torch.randn(8192, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    few = torch.where(few.abs() < 2 ** -9, torch.zeros_like(few), few)
    ct = codec.compress(few, tile=1024, widths=W4)
    assert not ct.header.has_raw and len(ct.header.symbols) < 15

    def edit(sec):
        sec["level0"][100] = 0xFF  # code 15 with no raw level

    with pytest.raises(FormatError):
        codec.decode_into(_corrupted(ct, edit), torch.empty(8192, dtype=torch.bfloat16), backend="numba")


def test_more_escapes_than_a_tile_holds_raises():
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    ct = codec.compress(every, tile=1024, widths=W4)

    def edit(sec):  # every code of the first tile an escape: far more than its raw groups hold
        sec["level0"][:512] = 0xFF

    with pytest.raises(FormatError):
        codec.decode_into(_corrupted(ct, edit), torch.empty(65536, dtype=torch.bfloat16), backend="numba")
