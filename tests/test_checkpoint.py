""".nzrt files: round trips, memory mapping, corruption named by tensor, atomic writes, no pickle."""
import json
import os
import struct

import pytest
import torch

import nzrt
from nzrt import checkpoint

INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def bits(t):
    return t.contiguous().view(INT.get(t.dtype, t.dtype))


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "layer.weight": (torch.randn(300, 40, generator=g) * 0.02).to(torch.bfloat16),
        "layer.bias": torch.randn(40, generator=g).to(torch.float16),
        "head": torch.randn(7, 3, generator=g),
        "empty": torch.empty(0, 4, dtype=torch.bfloat16),
    }


def test_roundtrip_compressed_and_dense(tmp_path, tensors):
    path = tmp_path / "m.nzrt"
    stored = {k: nzrt.compress(v) for k, v in tensors.items()}
    stored["position_ids"] = torch.arange(10)
    nzrt.save(path, stored, metadata={"config": {"hidden": 40}})
    loaded = nzrt.load(path)
    assert set(loaded) == set(stored)
    for k, v in tensors.items():
        assert isinstance(loaded[k], nzrt.CompressedTensor)
        assert torch.equal(bits(nzrt.decompress(loaded[k])), bits(v))
        assert loaded[k].header == stored[k].header
    assert torch.equal(loaded["position_ids"], torch.arange(10))
    assert nzrt.load_metadata(path) == {"config": {"hidden": 40}}


def test_load_maps_the_file_without_copying(tmp_path):
    path = tmp_path / "big.nzrt"
    x = (torch.randn(4_000_000) * 0.02).to(torch.bfloat16)
    nzrt.save(path, {"x": nzrt.compress(x), "d": x})
    loaded = nzrt.load(path, verify=False)
    ct, dense = loaded["x"], loaded["d"]
    # both views share one file-backed storage: the bytes were not copied into new buffers
    assert ct.data.untyped_storage().data_ptr() == dense.untyped_storage().data_ptr()
    assert ct.data.untyped_storage().nbytes() == os.path.getsize(path)
    assert torch.equal(bits(nzrt.decompress(ct)), bits(x))


def test_header_is_json_and_no_pickle(tmp_path, tensors):
    path = tmp_path / "m.nzrt"
    nzrt.save(path, tensors)
    raw = path.read_bytes()
    magic, hlen, _, _ = checkpoint.PREFIX.unpack(raw[:checkpoint.PREFIX.size])
    assert magic == checkpoint.MAGIC
    head = json.loads(raw[checkpoint.PREFIX.size:checkpoint.PREFIX.size + hlen])
    assert set(head["tensors"]) == set(tensors)
    for e in head["tensors"].values():
        assert e["offset"] % checkpoint.ALIGN == 0
    assert b"torch._utils" not in raw and b"\x80\x04\x95" not in raw  # no pickle stream


def _corrupt(path, offset, value=0xFF):
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ value]))


def _data_start_and_entries(path):
    raw = path.read_bytes()
    _, hlen, _, _ = checkpoint.PREFIX.unpack(raw[:checkpoint.PREFIX.size])
    head = json.loads(raw[checkpoint.PREFIX.size:checkpoint.PREFIX.size + hlen])
    start = checkpoint._pad(checkpoint.PREFIX.size + hlen)
    return start, head["tensors"]


@pytest.mark.parametrize("name", ["layer.weight", "head"])
def test_corrupted_buffer_error_names_the_tensor(tmp_path, tensors, name):
    path = tmp_path / "m.nzrt"
    nzrt.save(path, {"layer.weight": nzrt.compress(tensors["layer.weight"]), "head": tensors["head"]})
    start, entries = _data_start_and_entries(path)
    _corrupt(path, start + entries[name]["offset"] + 5)
    with pytest.raises(nzrt.FormatError, match=f"'{name}'.*(checksum|corrupt)"):
        nzrt.load(path)


def test_lazy_verify_catches_corruption_on_decode(tmp_path, tensors):
    path = tmp_path / "m.nzrt"
    nzrt.save(path, {"w": nzrt.compress(tensors["layer.weight"])})
    start, entries = _data_start_and_entries(path)
    _corrupt(path, start + 3)
    ct = nzrt.load(path, verify=False)["w"]
    with pytest.raises(nzrt.FormatError, match="checksum"):
        nzrt.decompress(ct)


def test_truncated_file_error_names_the_tensor(tmp_path, tensors):
    path = tmp_path / "m.nzrt"
    nzrt.save(path, {"a": tensors["head"], "w": nzrt.compress(tensors["layer.weight"])})
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 200)
    with pytest.raises(nzrt.FormatError, match="'w'.*truncated"):
        nzrt.load(path)
    with open(path, "r+b") as f:
        f.truncate(10)
    with pytest.raises(nzrt.FormatError, match="too short"):
        nzrt.load(path)


def test_corrupted_header_and_wrong_files(tmp_path, tensors):
    path = tmp_path / "m.nzrt"
    nzrt.save(path, tensors)
    _corrupt(path, checkpoint.PREFIX.size + 10)
    with pytest.raises(nzrt.FormatError, match="header checksum"):
        nzrt.load(path)
    other = tmp_path / "x.nzrt"
    other.write_bytes(b"PK\x03\x04 definitely a zip" + bytes(100))
    with pytest.raises(nzrt.FormatError, match="not a .nzrt file"):
        nzrt.load(other)
    with pytest.raises(FileNotFoundError, match="no such"):
        nzrt.load(tmp_path / "missing.nzrt")


def test_write_is_atomic(tmp_path, tensors):
    path = tmp_path / "m.nzrt"
    nzrt.save(path, {"head": tensors["head"]})
    before = path.read_bytes()

    class Boom:
        pass
    with pytest.raises(TypeError, match="'bad'"):
        nzrt.save(path, {"head": tensors["head"], "bad": Boom()})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.nzrt"]  # no temp file left behind


def test_prefix_layout_is_stable():
    assert checkpoint.PREFIX.size == 24 and struct.calcsize("<8sQII") == 24
