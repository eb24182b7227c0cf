"""Fuzz ``.nzrt`` loading: mutate a small checkpoint thousands of ways, check every outcome.

    python tools/fuzz_checkpoint.py --count 100000 --seed 0 [--batch 500] [--timeout 120]

Every mutated file must either load and decode to exactly what was saved (integer views,
bit for bit; ``metadata`` excepted: it is free-form user data) or raise ``FormatError`` whose
message names the file (and the tensor, for a mutation inside one tensor's entry or bytes).
Every mutated blob handed to the decoders with its CRCs recomputed (an adversary's file) must
make the reference and numba decoders agree: both raise ``FormatError`` or both write the same
bits, every one of them (outputs are poisoned twice with different patterns). Batches run in
child processes with a timeout, so a crash (signal) or a hang is counted, not fatal.
The mutation engine (``run_one``) is shared with tests/test_fuzz_checkpoint.py.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

import nzrt
from nzrt.format import checkpoint
from nzrt.format import CompressedTensor, Header

INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
HOSTILE = [None, True, False, 0, -1, 1, 7, 0.5, 2.0, -0.0, 1e308, "x", "", [], {}, [1], [[]],
           {"a": 1}, 2**31, 2**32, 2**63 - 8, 2**63, 2**64, -2**63, 10**30, "NaN", "Infinity"]
_NAN, _INF = float("nan"), float("inf")


def seed_tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(300, 40, generator=g) * 0.02).to(torch.bfloat16)
    w[0, :3] = torch.tensor([float("inf"), -float("inf"), 1e30])
    lossy = torch.randn(50, 20, generator=g)
    lossy[3, 4] = _NAN
    lossy[7, 1] = torch.tensor(-0.0)
    lossy.view(torch.int32)[9, 9] = 0x7FC01234  # a NaN with a payload: a patch
    return {"w": w, "lossy": lossy, "h": torch.randn(33, generator=g).to(torch.float16) * 300,
            "d": torch.randn(7, 3, generator=g), "ids": torch.arange(10), "e": torch.empty(0, 4, dtype=torch.bfloat16)}


def seed_stored(t: dict) -> dict:
    return {"w": nzrt.compress(t["w"], tile=1024, backend="reference"),
            "lossy": nzrt.compress(t["lossy"], mantissa_bits=3, tile=256, backend="reference"),
            "h": nzrt.compress(t["h"], tile=16, backend="reference"), "d": t["d"], "ids": t["ids"],
            "e": nzrt.compress(t["e"], backend="reference")}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT.get(t.dtype, t.dtype))


class Seed:
    """The pristine file's bytes, parsed header and layout; what each tensor decodes to."""

    def __init__(self, workdir: Path):
        self.stored = seed_stored(seed_tensors())
        self.tensors = {n: nzrt.decompress(v, backend="reference") if isinstance(v, CompressedTensor) else v
                        for n, v in self.stored.items()}  # what a load must give (lossy: rounded)
        path = workdir / "seed.nzrt"
        nzrt.save(path, self.stored, metadata={"config": {"hidden": 40, "eps": 1e-5}})
        self.raw = path.read_bytes()
        _, hlen, _, _ = checkpoint.PREFIX.unpack(self.raw[:checkpoint.PREFIX.size])
        self.hlen = hlen
        self.head = json.loads(self.raw[checkpoint.PREFIX.size:checkpoint.PREFIX.size + hlen])
        self.start = checkpoint._pad(checkpoint.PREFIX.size + hlen)
        self.data = self.raw[self.start:]
        self.spans = {n: (e["offset"], e["offset"] + e["nbytes"]) for n, e in self.head["tensors"].items()}
        self.compressed = [n for n, e in self.head["tensors"].items() if e["kind"] == "compressed" and e["nbytes"] > 64]
        self.dense = [n for n, e in self.head["tensors"].items() if e["kind"] == "dense"]


def with_header(text: str, data: bytes, fix_crc: bool = True, crc: int | None = None) -> bytes:
    raw = text.encode()
    start = checkpoint._pad(checkpoint.PREFIX.size + len(raw))
    hcrc = zlib.crc32(raw) if fix_crc else (crc or 0)
    return (checkpoint.PREFIX.pack(checkpoint.MAGIC, len(raw), hcrc, 0) + raw
            + b"\0" * (start - checkpoint.PREFIX.size - len(raw)) + data)


# --- mutations: each returns (file bytes, tensor the mutation lies in or None) -------------

def _nodes(obj, path=()):
    """Every (path, value) of a JSON tree."""
    yield path, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _nodes(v, path + (k,))


def _set(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _hostile(r: random.Random, old):
    if type(old) is int and r.random() < 0.5:
        return r.choice([old + 1, old - 1, old * 2, old + 16, -old, old + 2**32, str(old), float(old), [old]])
    v = r.choice(HOSTILE)
    if v in ("NaN", "Infinity") and r.random() < 0.5:
        return {"NaN": _NAN, "Infinity": _INF}[v]  # written as the bare JSON tokens NaN / Infinity
    return v


def _tensor_of(path):
    return path[1] if len(path) > 1 and path[0] == "tensors" else None


def m_json_field(s: Seed, r: random.Random):
    head = json.loads(json.dumps(s.head))
    nodes = [p for p, _ in _nodes(head) if p and p[0] != "metadata"]
    path = r.choice(nodes)
    old = head
    for k in path:
        old = old[k]
    _set(head, path, _hostile(r, old))
    return with_header(json.dumps(head, separators=(",", ":")), s.data), _tensor_of(path)


def m_json_keys(s: Seed, r: random.Random):
    head = json.loads(json.dumps(s.head))
    objs = [p for p, v in _nodes(head) if isinstance(v, dict) and (not p or p[0] != "metadata")]
    path = r.choice(objs)
    obj = head
    for k in path:
        obj = obj[k]
    if obj and r.random() < 0.6:
        del obj[r.choice(list(obj))]
    else:
        obj[r.choice(["extra", "offset2", "crc", "Shape"])] = r.choice(HOSTILE[:12])
    return with_header(json.dumps(head, separators=(",", ":")), s.data), _tensor_of(path)


def m_dup_key(s: Seed, r: random.Random):
    text = json.dumps(s.head, separators=(",", ":"))
    keys = sorted({k for p, _ in _nodes(s.head) for k in p if isinstance(k, str)})
    key = r.choice(keys)
    at = [i for i in range(len(text)) if text.startswith(f'"{key}":', i)]
    i = r.choice(at)
    j = i + len(key) + 3
    v = json.dumps(r.choice(HOSTILE[:18]))
    if r.random() < 0.5:  # hostile value first, the original last (plain json keeps the last)
        text = text[:i] + f'"{key}":{v},' + text[i:]
    else:  # a copy of the original value, then the hostile one
        text = text[:j] + text[j:].replace(",", f',"{key}":{v},', 1) if "," in text[j:] else text
    return with_header(text, s.data), None


def m_deep_nest(s: Seed, r: random.Random):
    depth = r.choice([30, 63, 65, 200, 1000, 5000, 100000])
    nest = "[" * depth + "]" * depth if r.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth
    text = json.dumps(s.head, separators=(",", ":"))
    where = r.choice(['"metadata":{', '"config":{', '"header":{'])
    text = text.replace(where, where + f'"deep":{nest},', 1)
    return with_header(text, s.data), None


def m_sections(s: Seed, r: random.Random):
    """Moved, overlapping, resized sections (codec headers) and buffers (file entries)."""
    head = json.loads(json.dumps(s.head))
    name = r.choice(s.compressed + s.dense)
    e = head["tensors"][name]
    if e["kind"] == "compressed" and r.random() < 0.7:
        secs = e["header"]["sections"]
        a, b = r.sample(sorted(secs), 2)
        choice = r.randrange(4)
        if choice == 0:
            secs[a][0], secs[b][0] = secs[b][0], secs[a][0]
        elif choice == 1:
            secs[a][0] = secs[b][0] + r.choice([0, 16, -16])
        elif choice == 2:
            secs[a][1] += r.choice([-16, -8, -1, 1, 8, 16, 2**31])
        else:
            secs[a][r.randrange(4)] = _hostile(r, secs[a][0])
    else:
        other = r.choice(list(head["tensors"]))
        choice = r.randrange(3)
        if choice == 0:
            e["offset"], head["tensors"][other]["offset"] = head["tensors"][other]["offset"], e["offset"]
        elif choice == 1:
            e["offset"] = head["tensors"][other]["offset"] + r.choice([0, 64, -64, 1])
        else:
            e["nbytes"] += r.choice([-64, -1, 1, 64, 2**33])
    return with_header(json.dumps(head, separators=(",", ":")), s.data), name


def m_dense(s: Seed, r: random.Random):
    head = json.loads(json.dumps(s.head))
    name = r.choice(s.dense)
    e = head["tensors"][name]
    e.update(r.choice([{"nbytes": 0, "shape": [2**31]}, {"shape": [2**31]}, {"shape": list(reversed(e["shape"]))},
                       {"dtype": "int32" if e["dtype"] == "float32" else "float64"}, {"dtype": "nn"},
                       {"dtype": "Tensor"}, {"shape": "abc"}, {"shape": [-1]}, {"shape": [0.5]},
                       {"shape": e["shape"] + [1]}, {"kind": "compressed"}, {"kind": "pickle"}]))
    return with_header(json.dumps(head, separators=(",", ":")), s.data), name


def m_codec(s: Seed, r: random.Random):
    """Codec header fields with plausible wrong values (tile, widths, symbols, shape, dtype)."""
    head = json.loads(json.dumps(s.head))
    name = r.choice(s.compressed)
    h = head["tensors"][name]["header"]
    field = r.choice(["tile", "widths", "symbols", "shape", "dtype", "mantissa_bits", "has_raw", "version"])
    v = h[field]
    h[field] = r.choice({
        "tile": lambda: [2**63 - 8, 2**62, 2**24 + 8, 2**24, 0, 8, 12, v * 2, v // 2, v + 8],
        "widths": lambda: [v + [1], v[:-1], [9], [0], [v[0] + 1] + v[1:], [True] * len(v), [1] * 5],
        "symbols": lambda: [v[:1] * len(v), v[::-1], v + [255], v[:-1], [300] + v[1:], [-1] + v[1:]],
        "shape": lambda: [v[::-1], [int(np.prod(v))], v + [1], [-1] + v[1:], [v[0] * 2] + v[1:], "abc", [2**40]],
        "dtype": lambda: ["float16", "bfloat16", "float32", "int8", "float64"],
        "mantissa_bits": lambda: [v - 1, v + 1, 0, 23, True],
        "has_raw": lambda: [not v, 1, 0, "true"], "version": lambda: [1, 3, True, 2.0, "2"]}[field]())
    return with_header(json.dumps(head, separators=(",", ":")), s.data), name


def m_header_bytes(s: Seed, r: random.Random):
    raw = bytearray(s.raw[checkpoint.PREFIX.size:checkpoint.PREFIX.size + s.hlen])
    for _ in range(r.choice([1, 1, 2, 4])):
        raw[r.randrange(len(raw))] ^= 1 << r.randrange(8) if r.random() < 0.7 else r.randrange(1, 256)
    text = raw.decode("latin-1")
    if r.random() < 0.85:
        out = checkpoint.PREFIX.pack(checkpoint.MAGIC, len(raw), zlib.crc32(bytes(raw)), 0) + bytes(raw)
        return out + b"\0" * (s.start - len(out)) + s.data, None
    return with_header(text, s.data, fix_crc=False, crc=zlib.crc32(s.raw[24:24 + s.hlen])), None


def m_data_bytes(s: Seed, r: random.Random):
    data = bytearray(s.data)
    name = r.choice(s.compressed + s.dense)
    lo, hi = s.spans[name]
    pos = r.randrange(lo, hi) if r.random() < 0.9 else r.randrange(len(data))
    data[pos] ^= 1 << r.randrange(8) if r.random() < 0.6 else r.randrange(1, 256)
    inside = [n for n, (a, b) in s.spans.items() if a <= pos < b]
    return s.raw[:s.start] + bytes(data), inside[0] if inside else None


def m_truncate(s: Seed, r: random.Random):
    k = r.random()
    if k < 0.5:
        n = r.randrange(s.start, len(s.raw))
        name = next((t for t, (a, b) in s.spans.items() if s.start + b > n), None)
        return s.raw[:n], name
    if k < 0.7:
        return s.raw[:r.randrange(0, s.start)], None
    if k < 0.85:
        return s.raw + bytes(r.randrange(1, 200)), None
    prefix = bytearray(s.raw[:checkpoint.PREFIX.size])
    field = r.choice([(8, 8), (16, 4), (20, 4), (0, 8)])
    prefix[field[0]:field[0] + field[1]] = r.randbytes(field[1])
    return bytes(prefix) + s.raw[checkpoint.PREFIX.size:], None


FILE_KINDS = {"json_field": m_json_field, "json_keys": m_json_keys, "dup_key": m_dup_key,
              "deep_nest": m_deep_nest, "sections": m_sections, "dense": m_dense, "codec": m_codec,
              "header_bytes": m_header_bytes, "data_bytes": m_data_bytes, "truncate": m_truncate}
BLOB_KINDS = ("blob_crc_fixed", "codec_crc_fixed")
KINDS = tuple(FILE_KINDS) + BLOB_KINDS
WEIGHTS = {"blob_crc_fixed": 2, "codec_crc_fixed": 2}


# --- checks ---------------------------------------------------------------------------------

def _decode_twice(ct, backend):
    """Decode into two differently poisoned outputs: both must agree (every value written)."""
    outs = []
    for fill in (0x5A, 0xA5):
        out = torch.empty(ct.shape, dtype=ct.dtype)
        out.view(-1).view(torch.uint8).fill_(fill)
        nzrt.decode_into(ct, out, backend=backend)
        outs.append(out)
    if not torch.equal(bits(outs[0]), bits(outs[1])):
        raise AssertionError(f"{backend} left values unwritten (output depends on the poison)")
    return outs[0]


# errors found before the header is a JSON object: there is no tensor yet to name
FILE_LEVEL = ("header is not valid JSON", "header is not strict JSON", "header nests deeper")


def check_file(s: Seed, path: Path, raw: bytes, tensor: str | None, verify: bool) -> str:
    """'rejected' or 'accepted'; AssertionError on a violation."""
    path.write_bytes(raw)
    try:
        loaded = nzrt.load(path, verify=verify)
        for name, v in loaded.items():
            if isinstance(v, CompressedTensor):
                for backend in ("numba", "reference"):
                    _decode_twice(v, backend)
    except nzrt.FormatError as e:
        msg = str(e)
        assert str(path) in msg, f"error does not name the file: {msg}"
        if tensor is not None and not any(w in msg for w in FILE_LEVEL):
            assert "tensor '" in msg, f"error names no tensor: {msg}"
        return "rejected"
    assert set(loaded) == set(s.tensors), f"accepted with other names: {sorted(loaded)}"
    for name, want in s.tensors.items():
        v = loaded[name]
        got = _decode_twice(v, "numba") if isinstance(v, CompressedTensor) else v
        ref = _decode_twice(v, "reference") if isinstance(v, CompressedTensor) else v
        assert got.dtype == want.dtype and got.shape == want.shape, f"{name}: accepted, changed shape/dtype"
        assert torch.equal(bits(got), bits(want)) and torch.equal(bits(ref), bits(want)), \
            f"{name}: accepted, decodes to other bits"
    return "accepted"


def _reseal(h: Header, data: torch.Tensor, **changes) -> Header:
    h = dataclasses.replace(h, crc32=zlib.crc32(data.numpy()), header_crc32=None, **changes)
    return h


def check_blob(s: Seed, r: random.Random, kind: str) -> str:
    """An adversary's blob (CRCs recomputed): both decoders raise FormatError or agree."""
    name = r.choice(s.compressed)
    ct = s.stored[name]
    data = ct.data.clone()
    changes = {}
    if kind == "blob_crc_fixed":
        for _ in range(r.choice([1, 1, 2, 8])):
            sec = r.choice(ct.header.section_names())
            off, nb = ct.header.sections[sec][:2]
            if nb:
                data[r.randrange(off, off + nb)] ^= r.randrange(1, 256)
    else:
        f = r.choice(["tile", "shape", "symbols", "widths", "mantissa_bits", "has_raw"])
        v = getattr(ct.header, f)
        changes[f] = r.choice({
            "tile": lambda: [2**63 - 8, 2**24 + 8, v * 2, v // 2, v + 8, 8, 0],
            "shape": lambda: [v[::-1], (int(np.prod(v)),), (-1,) + v[1:], ("a",), (2**40,)],
            "symbols": lambda: [v[::-1], v[:1] * len(v), v[:-1], (300,) + v[1:]],
            "widths": lambda: [v + (1,), v[:-1], (9,)], "mantissa_bits": lambda: [v - 1, v + 1],
            "has_raw": lambda: [not v, 1]}[f]())
    try:
        h = _reseal(ct.header, data, **changes)
        bad = CompressedTensor(h, data, source="<fuzz>", name=name)
    except nzrt.FormatError as e:
        assert "<fuzz>: tensor" in str(e), f"error names no tensor: {e}"
        return "rejected"
    results = []
    for backend in ("reference", "numba"):
        bad._verified = False
        try:
            results.append(bits(_decode_twice(bad, backend)))
        except nzrt.FormatError:
            results.append(None)
    if results[0] is None or results[1] is None:
        assert results[0] is None and results[1] is None, \
            f"backends disagree: reference {'raised' if results[0] is None else 'decoded'}, " \
            f"numba {'raised' if results[1] is None else 'decoded'}"
        return "rejected"
    assert torch.equal(results[0], results[1]), "backends decode to different bits"
    return "accepted"


def pick_kind(r: random.Random) -> str:
    return r.choices(KINDS, weights=[WEIGHTS.get(k, 1) for k in KINDS])[0]


def run_one(s: Seed, workdir: Path, seed: int, i: int) -> tuple[str, str]:
    """(mutation kind, 'accepted' | 'rejected'); AssertionError on a violation."""
    r = random.Random(seed * 1_000_003 + i)
    kind = pick_kind(r)
    if kind in BLOB_KINDS:
        return kind, check_blob(s, r, kind)
    raw, tensor = FILE_KINDS[kind](s, r)
    return kind, check_file(s, workdir / f"m{i % 4}.nzrt", raw, tensor, verify=r.random() < 0.8)


# --- CLI: batches in child processes ----------------------------------------------------------

def worker(seed: int, first: int, count: int) -> None:
    counts = collections.Counter()
    failures = []
    with tempfile.TemporaryDirectory() as d:
        s = Seed(Path(d))
        for i in range(first, first + count):
            try:
                kind, outcome = run_one(s, Path(d), seed, i)
            except AssertionError as e:
                kind, outcome = "?", "violation"
                failures.append(f"#{i}: {e}")
            except Exception as e:  # noqa: BLE001 - any other exception is what we hunt
                kind, outcome = "?", f"other:{type(e).__name__}"
                failures.append(f"#{i}: {type(e).__name__}: {e}"[:300])
            counts[f"{kind}|{outcome}"] += 1
    print(json.dumps({"counts": counts, "failures": failures[:20]}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--timeout", type=float, default=300, help="seconds per batch before it is a hang")
    p.add_argument("--worker", nargs=2, type=int, metavar=("FIRST", "COUNT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.seed, *a.worker)
        return 0
    table = collections.Counter()
    failures, crashes, hangs = [], 0, 0
    t0 = time.time()
    for first in range(0, a.count, a.batch):
        n = min(a.batch, a.count - first)
        cmd = [sys.executable, __file__, "--seed", str(a.seed), "--worker", str(first), str(n)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            hangs += 1
            failures.append(f"batch {first}..{first + n}: hang (> {a.timeout} s)")
            continue
        if res.returncode != 0:
            crashes += 1
            failures.append(f"batch {first}..{first + n}: exit {res.returncode}: {res.stderr[-300:]}")
            continue
        out = json.loads(res.stdout.strip().splitlines()[-1])
        table.update(out["counts"])
        failures += out["failures"]
        done = first + n
        print(f"[{time.time() - t0:7.0f} s] {done}/{a.count} files, {len(failures)} failures, "
              f"{crashes} crashed and {hangs} hung batches", flush=True)
    kinds = sorted({k.split("|")[0] for k in table})
    outcomes = sorted({k.split("|")[1] for k in table})
    print(f"\nseed {a.seed}, {a.count} files, {time.time() - t0:.0f} s\n")
    print("| kind | " + " | ".join(outcomes) + " |\n|---|" + "---|" * len(outcomes))
    for k in kinds:
        print(f"| {k} | " + " | ".join(str(table[f'{k}|{o}']) for o in outcomes) + " |")
    print(f"| **all** | " + " | ".join(str(sum(table[f'{k}|{o}'] for k in kinds)) for o in outcomes) + " |")
    print(f"\ncrashed batches: {crashes}, hung batches: {hangs}, violations: {len(failures)}")
    for f in failures[:50]:
        print("  ", f)
    return 1 if failures or crashes or hangs else 0


if __name__ == "__main__":
    sys.exit(main())
