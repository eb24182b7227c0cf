"""The pieces of the FSDP2 path that need no second process: the all-gather frame
(``nzrt.format.frame``), the compressed shard's reads and refused writes
(``nzrt.runtime.shard_tensor``), and the decoder leaving an output's storage resizable (FSDP2
frees and re-grows the unsharded weights nzrt decodes into)."""
import pytest
import torch

from nzrt import codec
from nzrt.format import FormatError, frame
from nzrt.runtime.decoder import Decoder
from nzrt.runtime.errors import ManagedError
from nzrt.runtime.shard_tensor import CompressedShard, ShardWeight

INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _bits(t):
    return t.view(INT[t.dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [0, 1, 4097, 1 << 16])
def test_frame_round_trip_poisoned_buffer(dtype, n):
    t = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.02).to(dtype)
    ct = codec.compress(t)
    need = frame.framed_size(ct)
    buf = torch.full((need + 77,), 0xA5, dtype=torch.uint8)  # poisoned, and longer than needed
    frame.pack_into(ct, buf)
    assert torch.count_nonzero(buf[need:]) == 0, "the padding must be zeros"
    back = frame.unpack(buf)
    assert back.header == ct.header and torch.equal(back.data, ct.data)
    assert torch.equal(_bits(codec.decompress(back)), _bits(t))


def test_every_bf16_pattern_through_a_frame():
    t = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    ct = codec.compress(t)
    buf = torch.empty(frame.framed_size(ct), dtype=torch.uint8)
    frame.pack_into(ct, buf)
    assert torch.equal(_bits(codec.decompress(frame.unpack(buf))), _bits(t))  # NaN payloads, ±0, ±inf


def test_frame_refuses_bad_input():
    ct = codec.compress(torch.randn(3000).bfloat16())
    need = frame.framed_size(ct)
    with pytest.raises(FormatError, match="needs"):
        frame.pack_into(ct, torch.empty(need - 1, dtype=torch.uint8))
    buf = torch.empty(need, dtype=torch.uint8)
    frame.pack_into(ct, buf)
    with pytest.raises(FormatError, match="too short"):
        frame.unpack(buf[:8])
    bad = buf.clone()
    bad[0] ^= 1
    with pytest.raises(FormatError, match="not an nzrt frame"):
        frame.unpack(bad)
    bad = buf.clone()
    bad[8:12] = torch.tensor([255, 255, 255, 127], dtype=torch.uint8)  # header length past the end
    with pytest.raises(FormatError, match="does not fit"):
        frame.unpack(bad)
    bad = buf.clone()
    bad[20] ^= 0x20  # a byte inside the JSON header: its checksum (or its syntax) catches it
    with pytest.raises(FormatError):
        frame.unpack(bad)
    with pytest.raises(FormatError, match="implies"):
        frame.unpack(buf[:need - 16])  # truncated blob
    bad = buf.clone()
    bad[-1] ^= 0xFF  # inside the blob: the blob's CRC-32, at decode
    with pytest.raises(FormatError):
        codec.decompress(frame.unpack(bad))


def test_decode_leaves_the_output_storage_resizable():
    ct = codec.compress(torch.randn(5000).bfloat16())
    out = torch.empty(5000, dtype=torch.bfloat16)
    Decoder(torch.device("cpu"), None, None).decode(ct, out)
    assert out.untyped_storage().resizable()
    out.untyped_storage().resize_(0)  # what FSDP2 does to an unsharded weight after its forward


class _FakeFsdpParam:
    """Only what ShardWeight reads at construction (the rest is FSDP2's, exercised in test_fsdp)."""
    sharded_param = None


def _shard(t):
    dec = Decoder(torch.device("cpu"), None, None)
    w = ShardWeight("layer.weight", _FakeFsdpParam(), dec.compress_lossless(t), dec)
    return w, CompressedShard(w)


def test_compressed_shard_reads_exact_values_and_refuses_writes():
    t = (torch.randn(1024, 1100) * 0.02).bfloat16()
    w, s = _shard(t)
    assert s.shape == t.shape and s.dtype == t.dtype
    assert torch.equal(_bits(s + 0), _bits(t))                      # any op sees the dense values
    assert torch.equal(_bits(s.detach()._weight.dense_copy()), _bits(t))  # detach: the same shard
    assert torch.equal(_bits(s[3:5].clone()), _bits(t[3:5]))
    for write in (lambda: s.add_(1), lambda: s.copy_(t), lambda: torch.add(t, t, out=s), lambda: s.zero_()):
        with pytest.raises(ManagedError, match="cannot be written in place"):
            write()
    assert torch.equal(_bits(w.dense_copy()), _bits(t)), "a refused write must change nothing"
    assert "CompressedShard" in repr(s)


def test_shard_frames_gathered_decode_into_rows_and_outgrown_capacity_is_refused():
    g = torch.Generator().manual_seed(3)
    parts = [(torch.randn(512, 1024, generator=g) * s).bfloat16() for s in (0.02, 1.0)]
    ws = [_shard(p)[0] for p in parts]
    cap = max(w.needed() for w in ws)
    for w in ws:
        w.capacity = cap
    gathered = torch.cat([w.wire() for w in ws])
    out = torch.full((1024, 1024), float("nan"), dtype=torch.bfloat16)  # poisoned
    ws[0].decode_gathered(gathered, out)
    assert torch.equal(_bits(out), _bits(torch.cat(parts)))
    assert ws[0].sent_bytes == cap and ws[0].gathers == 1
    noise = torch.randint(-(1 << 15), 1 << 15, (512, 1024), generator=g, dtype=torch.int32)
    ws[0].store(noise.to(torch.int16).view(torch.bfloat16))  # random bit patterns: every exponent
    assert ws[0].needed() > cap
    with pytest.raises(ManagedError, match="outgrew"):
        ws[0].wire()
