""".nzrt files: round trips, memory mapping, corruption named by tensor, atomic writes, no pickle."""
import json
import os
import re
import struct
import zlib

import numpy as np

import pytest
import torch

import nzrt
from nzrt.format import checkpoint

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
    # both view maps of the whole file: the bytes were not copied into new buffers. The compressed
    # blobs' map is read-only (the disk tier gives its pages back keeping the page cache), the dense
    # entries' is writable (they become the model's own tensors)
    from nzrt import osmem
    for t in (ct.data, dense):
        assert t.untyped_storage().nbytes() == os.path.getsize(path)
        assert osmem.is_file_backed(t)
    assert osmem.in_readonly_file_mapping(ct.data) and not osmem.in_readonly_file_mapping(dense)
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


# --- a hostile header: strict parsing, whole-header checks, one exception naming file and tensor

def _rewrite(path, edit=None, text_edit=None, reseal=True):
    """Rewrite ``path``'s header as an adversary would: ``edit(head)`` on the parsed JSON or
    ``text_edit(text)`` on its text, then every CRC recomputed (``reseal``) so only the strict
    checks stand in the way."""
    from nzrt.format import header as H
    raw = path.read_bytes()
    _, hlen, _, _ = checkpoint.PREFIX.unpack(raw[:checkpoint.PREFIX.size])
    data = raw[checkpoint._pad(checkpoint.PREFIX.size + hlen):]
    head = json.loads(raw[checkpoint.PREFIX.size:checkpoint.PREFIX.size + hlen])
    if edit:
        edit(head)
    for name, e in head["tensors"].items() if reseal else ():
        try:
            if e["kind"] == "compressed":
                h = e["header"]
                h["header_crc32"] = zlib.crc32(H.dumps({k: v for k, v in h.items() if k != "header_crc32"}).encode())
                e["crc32"] = checkpoint._entry_crc(name, e)
            else:
                e["crc32"] = zlib.crc32(data[e["offset"]:e["offset"] + e["nbytes"]], checkpoint._entry_crc(name, e))
        except (TypeError, KeyError, ValueError):
            pass  # a field the edit made unusable: left as it is
    text = json.dumps(head, separators=(",", ":"))
    text = text_edit(text) if text_edit else text
    hdr = text.encode()
    start = checkpoint._pad(checkpoint.PREFIX.size + len(hdr))
    path.write_bytes(checkpoint.PREFIX.pack(checkpoint.MAGIC, len(hdr), zlib.crc32(hdr), 0) + hdr
                     + b"\0" * (start - checkpoint.PREFIX.size - len(hdr)) + data)


@pytest.fixture
def saved(tmp_path, tensors):
    path = tmp_path / "m.nzrt"
    nzrt.save(path, {"w": nzrt.compress(tensors["layer.weight"], tile=1024), "head": tensors["head"]})
    return path


def _refused(path, *patterns):
    with pytest.raises(nzrt.FormatError) as info:
        loaded = nzrt.load(path)
        nzrt.decompress(loaded["w"], backend="numba")
    msg = str(info.value)
    assert str(path) in msg, msg
    for p in patterns:
        assert re.search(p, msg), (p, msg)
    return msg


def _codec(key, value):
    return lambda head: head["tensors"]["w"]["header"].__setitem__(key, value)


@pytest.mark.parametrize("edit, why", [
    (_codec("tile", 2**63 - 8), "tile"),  # the overflow that made numba return unwritten memory
    (_codec("tile", 2**24 + 8), "tile"),
    (_codec("tile", 1024.0), "tile must be an integer"),
    (_codec("version", True), "version"),
    (_codec("shape", [-1, 40]), "shape"),
    (_codec("shape", "300x40"), "shape must be a list"),
    (_codec("shape", [40, 300.5]), "shape"),
    (_codec("has_raw", 1), "has_raw must be true or false"),
    (_codec("symbols", [126, 126, 127]), "symbols"),
    (_codec("widths", [2, 9]), "widths"),
    (_codec("mantissa_bits", 6), "sm"),  # consistent type, inconsistent sizes
    (lambda head: head["tensors"]["w"]["header"]["sections"]["sm"].__setitem__(0, 16), "moved or overlapping"),
    (lambda head: head["tensors"]["w"]["header"]["sections"]["level1"].__setitem__(1, 2**40), "level1"),
    (lambda head: head["tensors"]["w"]["header"]["sections"].pop("patch_val"), "sections are"),
    (lambda head: head["tensors"]["w"].__setitem__("offset", 64), "moved or overlapping"),
    (lambda head: head["tensors"]["w"].__setitem__("extra", 1), "unknown field 'extra'"),
])
def test_inconsistent_codec_header_is_refused_whole(saved, edit, why):
    _rewrite(saved, edit)
    _refused(saved, "tensor 'w'", why)


@pytest.mark.parametrize("change, why", [
    ({"nbytes": 0, "shape": [2**31]}, "nbytes 0"),  # was an 8 GiB tensor from a small file
    ({"shape": [3, 8]}, "imply"),
    ({"dtype": "nn"}, "dtype"),
    ({"shape": "abc"}, "shape must be a list"),
    ({"offset": 0}, "moved or overlapping"),
    ({"kind": "pickle"}, "unknown entry kind"),
])
def test_inconsistent_dense_entry_is_refused(saved, change, why):
    _rewrite(saved, lambda head: head["tensors"]["head"].update(change))
    _refused(saved, "tensor 'head'", why)


@pytest.mark.parametrize("text_edit, why", [
    (lambda t: t.replace('"tile":', '"tile":8,"tile":', 1), "duplicate key 'tile'"),
    (lambda t: t.replace('"tile":1024', '"tile":NaN', 1), "NaN"),
    (lambda t: t.replace('"tile":1024', '"tile":Infinity', 1), "Infinity"),
    (lambda t: t.replace('"tile":1024', '"tile":1e999', 1), "overflows"),
    (lambda t: t.replace('"metadata":{', '"metadata":{"x":' + "[" * 100000 + "]" * 100000 + ',"y":0', 1), "nests deeper"),
    (lambda t: t.replace('"metadata":{', '"metadata":{"x":' + "[" * 65 + "]" * 65 + ',"y":0', 1), "nests deeper"),
    (lambda t: t.replace('"format":"nzrt"', '"format":"nzrt","format":"nzrt"', 1), "duplicate key"),
    (lambda t: t[:-1], "not valid JSON"),
])
def test_hostile_json_is_a_formaterror(saved, text_edit, why):
    _rewrite(saved, text_edit=text_edit)
    _refused(saved, why)


def test_codec_header_checksum_covers_its_fields(saved):
    """A consistent but different header (the shape transposed), CRCs of the file fixed but not
    the codec header's own: refused, naming the tensor."""
    def edit(head):
        head["tensors"]["w"]["header"]["shape"] = [40, 300]
        head["tensors"]["w"]["crc32"] = checkpoint._entry_crc("w", head["tensors"]["w"])
    _rewrite(saved, edit, reseal=False)
    _refused(saved, "tensor 'w'", "header checksum")


def test_in_memory_header_change_is_caught_by_its_checksum(tensors):
    import dataclasses
    ct = nzrt.compress(tensors["layer.weight"])
    bad = nzrt.CompressedTensor(dataclasses.replace(ct.header, shape=(40, 300)), ct.data)
    with pytest.raises(nzrt.FormatError, match="header checksum"):
        nzrt.decompress(bad)


def test_entry_checksum_covers_name_and_fields(saved):
    _rewrite(saved, lambda head: head.__setitem__("tensors", {("v" if k == "w" else k): v
                                                             for k, v in head["tensors"].items()}), reseal=False)
    _refused(saved, "tensor 'v'", "entry checksum")


def test_verify_false_still_checks_dense_buffers(saved):
    start, entries = _data_start_and_entries(saved)
    _corrupt(saved, start + entries["head"]["offset"] + 5)
    with pytest.raises(nzrt.FormatError, match=f"{re.escape(str(saved))}: tensor 'head': checksum"):
        nzrt.load(saved, verify=False)


def test_lazy_decode_error_names_file_and_tensor(saved):
    start, entries = _data_start_and_entries(saved)
    _corrupt(saved, start + entries["w"]["offset"] + 3)
    ct = nzrt.load(saved, verify=False)["w"]
    for backend in ("reference", "numba"):
        with pytest.raises(nzrt.FormatError, match=f"{re.escape(str(saved))}: tensor 'w': checksum"):
            nzrt.decompress(ct, backend=backend)


def test_trailing_bytes_and_reserved_prefix_word(saved):
    raw = saved.read_bytes()
    saved.write_bytes(raw + b"\0" * 64)
    _refused(saved, "trailing bytes")
    saved.write_bytes(raw[:20] + b"\1\0\0\0" + raw[24:])
    _refused(saved, "reserved")


def test_older_format_version_is_a_clear_error(saved):
    _rewrite(saved, lambda head: head.__setitem__("version", 1))
    _refused(saved, "version 1", "older nzrt")
    with pytest.raises(nzrt.FormatError, match="older nzrt"):
        nzrt.format.Header.from_dict(dict(json.loads(nzrt.compress(torch.ones(3)).header.to_json()), version=1))


def test_reference_decoder_raises_formaterror_not_indexerror(tensors):
    """Handed a blob whose tables are wrong (its CRC trusted), the reference decoder checks them."""
    x = tensors["head"].clone()
    x[0, 0] = float("nan")
    ct = nzrt.compress(x, mantissa_bits=4, backend="reference")
    off = ct.header.sections["patch_idx"][0]
    data = ct.data.clone()
    data[off:off + 8] = torch.tensor([0xFF] * 7 + [0x7F], dtype=torch.uint8)  # index 2**63 - 1
    bad = nzrt.CompressedTensor(ct.header, data, verified=True, name="x")
    from nzrt.kernels import reference
    with pytest.raises(nzrt.FormatError, match="tensor 'x'.*patch"):
        reference.decode_into(bad, np.zeros(x.numel(), np.uint32))
